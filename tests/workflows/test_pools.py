"""Per-stage actor pools from YAML: defaults for stages left out, errors that name the stage and key, the
shipped file, and the cluster manifests that point at it."""

import json
import os

import pytest
import yaml

from stages.config import ConfigError
from workflows.pools import PoolConfig, load_pools, parse_pools

@pytest.mark.parametrize(
    "text, match",
    [
        ("decoderr: {actors: 1}", "unknown stage 'decoderr'"),
        ("decoder: {actorz: 1}", "unknown key 'decoder.actorz'"),
        ("decoder: {actors: {min: 3, max: 2}}", "min <= max"),
        ("decoder: {actors: {min: 2, max: 4, initial: 5}}", "min <= initial <= max"),
        ("decoder: {actors: {min: 1, start: 2}}", "unknown key 'decoder.actors.start'; expected min, max, initial"),
        ("decoder: {gpus: -1}", "gpus and cpus must be >= 0"),
        ("decoder: {batch_size: 0}", "batch_size must be >= 1"),
        ("decoder: {actors: two}", "decoder.actors: expected an integer"),
        ("decoder: [1, 2", "pools: invalid YAML at line 1"),
        ("[decoder]", "pools: expected a mapping, got list"),
    ],
)
def test_pools_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_pools(text)


def test_default_pools_file_and_one_stage_change():
    pools = load_pools()
    assert set(pools) == {"clip", "prior", "decoder", "interpolation", "sr_low", "sr_high", "writer"}
    changed = parse_pools("decoder: {actors: 3, gpus: 0.5, batch_size: 8}")
    assert changed["decoder"] == PoolConfig(min_actors=3, max_actors=3, gpus=0.5, batch_size=8)
    assert changed["sr_low"] == PoolConfig()  # other stages keep their defaults
    planned = parse_pools("sr_high: {actors: {min: 1, max: 6, initial: 3}}")["sr_high"]
    assert (planned.min_actors, planned.start_actors, planned.max_actors) == (1, 3, 6)
    assert changed["decoder"].start_actors == 3   # without initial a pool starts at min


def test_cluster_manifests_name_the_pools_file():
    here = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")
    names = ["ray-cluster-aws.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob-batch.yaml"]
    for name in names:
        with open(os.path.join(here, name)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        assert docs, name
        assert "cluster/pools.yaml" in json.dumps(docs), name


def test_a_pools_file_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}/missing.yaml: no such file"):
        load_pools(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("writer: {cpus: lots}\n")
    with pytest.raises(ConfigError, match=f"{tmp_path}/bad.yaml: writer.cpus: expected a number, got 'lots'"):
        load_pools(str(tmp_path / "bad.yaml"))
