"""Stage presets: YAML files under ``cluster/presets`` (or any path / fsspec URL to such a file), and the
demo model: the checkpoint bundle under ``cluster/models`` that runs when a command names neither."""

from __future__ import annotations

import dataclasses
import os
from importlib import resources

from stages.config import CascadeConfig, ConfigError, from_dict
from stages.fsio import read_yaml_mapping
from stages.latent import located

DEFAULT_PRESET = "cpu"
DEFAULT_MODEL = "shapes"    # cluster/models/shapes: trained by `mav recipe shapes`


def preset_dir() -> str:
    return str(resources.files("cluster") / "presets")


def preset_names() -> list[str]:
    return sorted(p[: -len(".yaml")] for p in os.listdir(preset_dir()) if p.endswith(".yaml"))


def load_preset(name_or_path: str = DEFAULT_PRESET) -> CascadeConfig:
    """A named preset (``cpu``, ``paper``) or a YAML file path/URL -> the cascade config."""
    if name_or_path.endswith((".yaml", ".yml")):
        url = name_or_path
    elif name_or_path in preset_names():
        url = os.path.join(preset_dir(), f"{name_or_path}.yaml")
    else:
        raise ConfigError(f"unknown preset {name_or_path!r}; available: {', '.join(preset_names())} (or a .yaml path)")
    data = read_yaml_mapping(url, ConfigError)
    try:
        preset = from_dict(CascadeConfig, data)
    except ConfigError as e:
        raise ConfigError(f"preset {name_or_path}: {e}") from None
    if preset.decoder.latent is None:
        return preset
    # A latent D^t's VAE folder: a relative path is relative to the preset file.
    base = url.rsplit("/", 1)[0] if "://" in url else os.path.dirname(os.path.abspath(url))
    decoder = dataclasses.replace(preset.decoder, latent=located(preset.decoder.latent, base))
    return dataclasses.replace(preset, decoder=decoder)


def model_path(name: str = DEFAULT_MODEL) -> str:
    """The shipped checkpoint bundle ``name`` (a directory under ``cluster/models``)."""
    return str(resources.files("cluster") / "models" / name)


def choose_model(checkpoint: str | None, preset: str | None) -> tuple[str | None, str]:
    """The ``(checkpoint, preset)`` a command runs, checked: ``checkpoint`` if given; else fresh weights from
    ``preset`` if given; else the shipped demo model. Raises CheckpointError or ConfigError."""
    from stages.checkpoint import load_bundle_config

    if not checkpoint and not preset:
        checkpoint = model_path()
    if checkpoint:
        load_bundle_config(checkpoint)
        return checkpoint, preset or DEFAULT_PRESET
    load_preset(preset)
    return None, preset
