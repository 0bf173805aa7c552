"""The application's configuration: cluster/serve.yaml, the KubeRay manifest embedding it, the app's args and
the fitting of GPU requests to a cluster without GPUs (no Ray needed)."""

import os

import pytest
import yaml

from stages.config import STAGE_NAMES, ConfigError

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")


def test_serve_config_file_and_kuberay_manifest_agree():
    from ray.serve.schema import ServeDeploySchema

    from workflows.serve import default_config_file, load_serve_config, parse_app_args

    with open(default_config_file()) as f:
        config = yaml.safe_load(f)
    ServeDeploySchema.model_validate(config)
    loaded = load_serve_config()
    assert set(loaded.overrides) == {*STAGE_NAMES, "encoder", "tuner", "jobs", "api"}
    assert loaded.overrides["tuner"]["max_ongoing_requests"] == 1  # one tuning per replica
    for stage in STAGE_NAMES:
        opts = loaded.overrides[stage]
        assert "num_replicas" in opts or "autoscaling_config" in opts, stage
        assert {"num_cpus", "num_gpus"} <= set(opts["ray_actor_options"]), stage
        assert {"max_ongoing_requests", "max_queued_requests", "user_config"} <= set(opts), stage
        assert opts["max_ongoing_requests"] >= opts["user_config"]["max_batch_size"], stage
    parse_app_args(loaded.args)
    with open(os.path.join(ROOT, "cluster", "kuberay-rayservice.yaml")) as f:
        service = yaml.safe_load(f)
    assert service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded["applications"] == config["applications"]


def test_the_import_path_names_the_application_builder():
    import importlib

    from workflows.serve import build_app, load_serve_config
    from workflows.serve.config import IMPORT_PATH

    module, attr = IMPORT_PATH.split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    assert load_serve_config().name == "mav"


def test_app_args_are_checked_by_name():
    from workflows.serve import parse_app_args

    assert parse_app_args({"preset": "paper", "output": "s3://b/v"}).output == "s3://b/v"
    for args, name in (({"presett": "cpu"}, "presett"), ({"max_active_jobs": 0}, "max_active_jobs"),
                       ({"max_active_jobs": "many"}, "max_active_jobs"), ({"retry_after_s": 0}, "retry_after_s")):
        with pytest.raises(ConfigError, match=name):
            parse_app_args(args)


def test_config_is_fitted_to_a_cluster_without_gpus():
    from workflows.serve import cpus_needed, fit_to_cluster, load_serve_config

    overrides = load_serve_config().overrides
    fitted, notices = fit_to_cluster(overrides, {"CPU": 2.0})
    assert all(not (o.get("ray_actor_options") or {}).get("num_gpus") for o in fitted.values())
    assert overrides["tuner"]["user_config"]["gpus_per_worker"] > 0 == fitted["tuner"]["user_config"]["gpus_per_worker"]
    assert notices == ["the cluster has no GPUs; dropped from the requests of "
                       "clip, prior, decoder, interpolation, sr_low, sr_high, tuner (its tuning's workers)"]
    same, none = fit_to_cluster(overrides, {"CPU": 8.0, "GPU": 4.0, **{r: 1.0 for o in overrides.values()
                                for r in (o.get("ray_actor_options") or {}).get("resources", {})}})
    assert same == overrides and none == []
    assert cpus_needed(overrides) >= len(STAGE_NAMES) * min(
        o["ray_actor_options"]["num_cpus"] for n, o in overrides.items() if n in STAGE_NAMES)


def test_custom_resources_the_cluster_lacks_are_dropped():
    from workflows.serve import cpus_needed, fit_to_cluster

    overrides = {"decoder": {"ray_actor_options": {"num_cpus": 2, "resources": {"a100": 1, "fast_disk": 1}}},
                 "sr_high": {"autoscaling_config": {"min_replicas": 3}, "ray_actor_options": {"num_cpus": 1}}}
    fitted, notices = fit_to_cluster(overrides, {"CPU": 4.0, "fast_disk": 2.0})
    assert fitted["decoder"]["ray_actor_options"]["resources"] == {"fast_disk": 1}
    assert notices == ["the cluster has no resource 'a100'; dropped from the requests of decoder"]
    # 2 (decoder) + 3 replicas x 1 (sr_high) + 1 each for the four stages, the encoder and the tuner left at the
    # code's default + one tuning's Ray Train worker and its data readers (workflows.train.cpus_needed: 1 + 2)
    assert cpus_needed(overrides) == 2 + 3 + 4 + 1 + 1 + 3


@pytest.mark.parametrize("text,message", [
    ("applications:\n  - name: x\n    import_path: somewhere:else\n", "workflows.serve:build_app"),
    ("applications: [", "invalid YAML"),
    ("- a list\n", "expected a mapping"),
    ("applications:\n  - name: x\n    import_path: workflows.serve:build_app\n    deployments: 3\n", "deployments"),
])
def test_bad_serve_config_files_are_refused_naming_the_file(tmp_path, text, message):
    from workflows.serve import load_serve_config

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_serve_config(str(bad))
    assert str(bad) in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_serve_config(str(tmp_path / "missing.yaml"))
