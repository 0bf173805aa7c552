"""Checkpoints: every stage round-trips exactly through a local directory, memory:// and S3; open_clip's
own weight layout loads; bad checkpoints are CheckpointErrors that say what is wrong; nothing is unpickled;
writes are atomic."""

import os
import pickle
import re
import shutil
import uuid

import fsspec
import pytest
import safetensors.torch
import torch
import yaml

from stages.cascade import build_stage
from stages.checkpoint import (
    CheckpointError,
    load_bundle_config,
    load_stage,
    save_bundle,
    save_stage,
)
from stages.config import STAGE_NAMES
from stages.fsio import write_bytes_atomic

UNET_STAGES = ("decoder", "interpolation", "sr_low", "sr_high")


@pytest.fixture(scope="module")
def trained(tiny_config):
    """Every stage with all weights moved off their initial values, as training would: zero-initialised
    layers (temporal attention outputs, fps embedding) become non-zero, and a loader that ignored the
    weights file and rebuilt the network from its seed would be caught."""
    g = torch.Generator().manual_seed(1234)
    nets = {}
    for name in STAGE_NAMES:
        net = build_stage(name, getattr(tiny_config, name)).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        nets[name] = net
    return nets


@torch.inference_mode()
def _outputs(name: str, net, cfg) -> list[torch.Tensor]:
    """The network's outputs on fixed inputs (two samples, two different timesteps)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.tensor([3, 500])
    if name == "clip":
        tokens, _ = net.tokenize(["a red ball bouncing", "a blue square"])
        return list(net.encode_text(tokens))
    if name == "prior":
        d, n = cfg.embed_dim, cfg.num_tokens
        mask = torch.arange(n)[None] < torch.tensor([[5], [9]])
        return [net(rand(2, d), t, text_embeds=rand(2, d), text_hidden=rand(2, n, d), text_mask=mask)]
    if name == "decoder":
        s = cfg.size
        return [net(rand(2, 3, cfg.frames, s, s), t, image_embeds=rand(2, cfg.image_embed_dim), fps=torch.tensor([4.0, 8.0]))]
    if name == "interpolation":
        return [net(rand(2, 3, 3, 8, 8), t, cond_frames=rand(2, 4, 3, 8, 8), image_embeds=rand(2, cfg.image_embed_dim),
                    fps=torch.tensor([8.0, 16.0]))]
    frames = 3 if name == "sr_low" else 1
    s = cfg.out_size
    return [net(rand(2, 3, frames, s, s), t, cond_frames=rand(2, 3, frames, s, s), noise_level=torch.tensor([100.0, 20.0]))]


def assert_same_network(name: str, cfg, saved, loaded) -> None:
    a, b = saved.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for x, y in zip(_outputs(name, saved, cfg), _outputs(name, loaded, cfg), strict=True):
        assert torch.equal(x, y)


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    """A bundle URL on each kind of filesystem users give: a local directory, memory://, S3."""
    if request.param == "local":
        yield str(tmp_path / "bundle")
    elif request.param == "memory":
        url = f"memory://checkpoints-{uuid.uuid4().hex}/tiny"
        yield url
        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path.rsplit("/", 1)[0], recursive=True)
    else:
        yield request.getfixturevalue("s3_bucket") + "/models/tiny"


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_round_trip_is_exact(store, name, trained, tiny_config):
    cfg = getattr(tiny_config, name)
    directory = save_stage(store, name, cfg, trained[name])
    fs, path = fsspec.core.url_to_fs(directory)
    expected = {"config.yaml", "model.safetensors"} | ({"unet2d.json"} if name in UNET_STAGES else set())
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} == expected

    loaded_cfg, loaded = load_stage(store, name)
    assert loaded_cfg == cfg
    assert not loaded.training
    assert_same_network(name, cfg, trained[name], loaded)


def test_bundle_config_round_trip(store, trained, tiny_config):
    save_bundle(store, tiny_config, trained)
    assert load_bundle_config(store) == tiny_config


def test_open_clip_weights_load(tmp_path, trained, tiny_config):
    """A state dict of the open_clip model itself (keys without our ``model.`` prefix) is a valid clip stage."""
    clip = trained["clip"]
    save_stage(str(tmp_path), "clip", tiny_config.clip, clip)
    own = {k: v.contiguous().clone() for k, v in clip.model.state_dict().items()}
    assert not any(k.startswith("model.") for k in own)
    safetensors.torch.save_file(own, str(tmp_path / "clip" / "model.safetensors"))

    _, loaded = load_stage(str(tmp_path), "clip")
    assert_same_network("clip", tiny_config.clip, clip, loaded)


@pytest.fixture
def bundle(tmp_path, tiny_bundle) -> str:
    """A private copy of the tiny bundle, for tests that damage it."""
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    return str(path)


def _edit_config(bundle: str, stage: str, **changes) -> None:
    path = os.path.join(bundle, stage, "config.yaml")
    with open(path) as f:
        data = yaml.safe_load(f)
    for key, value in changes.items():
        section = data
        *parents, leaf = key.split("__")
        for p in parents:
            section = section[p]
        section[leaf] = value
    with open(path, "w") as f:
        yaml.safe_dump(data, f)


def test_missing_checkpoint(tmp_path, bundle):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(missing)}: no clip/config.yaml"):
        load_bundle_config(missing)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(missing)}: no decoder/config.yaml"):
        load_stage(missing, "decoder")
    os.remove(os.path.join(bundle, "sr_low", "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(bundle)}: no sr_low/model.safetensors"):
        load_stage(bundle, "sr_low")


def test_missing_bucket(s3_server):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/models/tiny"
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(url)}"):
        load_bundle_config(url)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"\x00" * 7, id="garbage"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:8] + b"{not json" + data[17:], id="bad-header"),
    ],
)
def test_corrupt_weights(bundle, damage):
    path = os.path.join(bundle, "decoder", "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(bundle)}: decoder/model.safetensors: "):
        load_stage(bundle, "decoder")


def test_unknown_config_key_is_named(bundle):
    _edit_config(bundle, "decoder", colour="red")
    with pytest.raises(CheckpointError, match=r"unknown config key 'decoder\.colour'"):
        load_stage(bundle, "decoder")
    _edit_config(bundle, "sr_low", unet__chanels=[8, 16])
    with pytest.raises(CheckpointError, match=r"unknown config key 'sr_low\.unet\.chanels'"):
        load_stage(bundle, "sr_low")


def test_invalid_config_yaml(bundle):
    with open(os.path.join(bundle, "prior", "config.yaml"), "w") as f:
        f.write("layers: [1, 2\n")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(bundle)}: prior: invalid YAML"):
        load_stage(bundle, "prior")


@pytest.mark.parametrize(
    "stage, changes, detail",
    [
        ("prior", {"layers": 2}, "Missing key"),
        ("clip", {"text_layers": 2}, "Missing key"),
        ("decoder", {"context_tokens": 2}, "size mismatch for image_tokens.weight"),
        ("sr_low", {"unet__temporal_kernel": 5}, "size mismatch"),
    ],
)
def test_weights_that_do_not_match_the_config(bundle, stage, changes, detail):
    _edit_config(bundle, stage, **changes)
    with pytest.raises(CheckpointError, match=f"{stage} weights do not match its config: .*{detail}") as e:
        load_stage(bundle, stage)
    assert bundle in str(e.value) and "\n" not in str(e.value)


def test_stages_that_do_not_chain(bundle):
    _edit_config(bundle, "sr_low", in_size=4)
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(bundle)} does not chain: sr_low.in_size=4 must equal decoder.size=8"):
        load_bundle_config(bundle)


def test_nothing_is_unpickled(monkeypatch, tiny_bundle, tiny_config):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint read unpickled something")

    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    assert load_bundle_config(tiny_bundle) == tiny_config
    for name in STAGE_NAMES:
        cfg, net = load_stage(tiny_bundle, name)
        assert cfg == getattr(tiny_config, name) and isinstance(net, torch.nn.Module)


def _tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def test_saving_leaves_exactly_the_checkpoint_files(tmp_path, trained, tiny_config):
    save_bundle(str(tmp_path), tiny_config, trained)
    save_bundle(str(tmp_path), tiny_config, trained)  # overwriting is also clean
    expected = {f"{s}/{f}" for s in STAGE_NAMES for f in ("config.yaml", "model.safetensors")}
    expected |= {f"{s}/unet2d.json" for s in UNET_STAGES}
    assert _tree(tmp_path) == expected


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, trained, tiny_config):
    target = tmp_path / "video.mp4"
    write_bytes_atomic(str(target), b"old")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert _tree(tmp_path) == {"video.mp4"}

    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {re.escape(str(tmp_path / 'bundle' / 'prior'))}: .*No space left"):
        save_stage(str(tmp_path / "bundle"), "prior", tiny_config.prior, trained["prior"])
    assert _tree(tmp_path) == {"video.mp4"}


def test_saving_under_a_regular_file_is_a_checkpoint_error(tmp_path, trained, tiny_config):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {re.escape(str(tmp_path / 'file' / 'prior'))}"):
        save_stage(str(tmp_path / "file"), "prior", tiny_config.prior, trained["prior"])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """Atomic writes go through a private temporary file; the result has the permissions a plain open() gives."""
    old = os.umask(umask)
    try:
        write_bytes_atomic(str(tmp_path / "a" / "file.bin"), b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a" / "file.bin").st_mode & 0o777 == mode


@pytest.mark.parametrize("text", ["{not json", '{"_class_name": "UNet2DModel", "in_channels": 3}'],
                         ids=["invalid-json", "wrong-network"])
def test_bad_unet2d_json(bundle, text):
    with open(os.path.join(bundle, "decoder", "unet2d.json"), "w") as f:
        f.write(text)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(bundle)}: decoder/.*unet2d.json"):
        load_stage(bundle, "decoder")
