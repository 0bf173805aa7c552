"""Stage presets: YAML files under ``cluster/presets`` (or any path / fsspec URL to such a file)."""

from __future__ import annotations

import os
from importlib import resources

import fsspec

from stages.config import CascadeConfig, ConfigError, load_yaml

DEFAULT_PRESET = "cpu"


def preset_dir() -> str:
    return str(resources.files("cluster") / "presets")


def preset_names() -> list[str]:
    return sorted(p[: -len(".yaml")] for p in os.listdir(preset_dir()) if p.endswith(".yaml"))


def load_preset(name_or_path: str = DEFAULT_PRESET) -> CascadeConfig:
    """A named preset (``cpu``, ``paper``) or a YAML file path/URL -> the cascade config."""
    if name_or_path.endswith((".yaml", ".yml")):
        try:
            with fsspec.open(name_or_path, "r") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read preset {name_or_path}: {e}") from None
        return load_yaml(CascadeConfig, text, where="")
    if name_or_path not in preset_names():
        raise ConfigError(f"unknown preset {name_or_path!r}; available: {', '.join(preset_names())} (or a .yaml path)")
    with open(os.path.join(preset_dir(), f"{name_or_path}.yaml")) as f:
        return load_yaml(CascadeConfig, f.read(), where="")
