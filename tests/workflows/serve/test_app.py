"""The application builder, as ``serve run`` / ``serve deploy`` call it (no Ray needed)."""

import pytest

from stages.config import ConfigError


def test_builder_checks_args_and_deployment_names(tiny_preset_file):
    from workflows.serve import build_app, build_application, parse_app_args

    with pytest.raises(ConfigError, match="presett"):
        build_app({"presett": "cpu"})
    with pytest.raises(ConfigError, match="decodr"):
        build_application(parse_app_args({}), {"decodr": {"num_replicas": 2}})
    app = build_app({"preset": tiny_preset_file})
    assert type(app).__name__ == "Application"


def test_the_apps_dtype_reaches_every_stage_deployment(tiny_preset_file):
    from workflows.serve import build_app

    with pytest.raises(ConfigError, match="dtype"):
        build_app({"preset": tiny_preset_file, "dtype": "fp16"})
    app = build_app({"preset": tiny_preset_file, "dtype": "bf16"})
    stages = app._bound_deployment.init_args[0]
    assert stages and {bound._bound_deployment.init_args[-1] for bound in stages.values()} == {"bf16"}
