"""Checkpoints: one directory per stage, ``config.yaml`` + ``model.safetensors`` (+ ``unet2d.json``; a latent
D^t's VAE in ``vae/``, as diffusers saves an AutoencoderKL: ``stages.latent``).

A bundle is a directory holding one such directory per stage (clip, prior, decoder, interpolation,
sr_low, sr_high). A stage directory may instead hold only ``reference.yaml`` (``bundle: URL``): the stage
is then that bundle's, read from there, so a bundle that changes one stage (mav tune) copies no other weights. Any fsspec URL works: a local path, ``s3://bucket/prefix``, ``memory://``.
Weights are safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import replace

import fsspec
import safetensors.torch
import torch
import yaml
from torch import nn

from stages.cascade import build_stage
from stages.config import STAGE_CONFIGS, STAGE_NAMES, CascadeConfig, ConfigError, check_chain, dump_yaml, load_yaml
from stages import latent
from stages.errors import UserError
from stages.fsio import absolute, join, parse_yaml_mapping, read_bytes, write_bytes_atomic

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
UNET2D_FILE = "unet2d.json"
REFERENCE_FILE = "reference.yaml"
MAX_REFERENCES = 8  # references followed from one bundle before giving up (a loop)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written; the message names the URL."""


def _state_for_saving(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; copies make every entry its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_stage(url: str, name: str, cfg, module: nn.Module, *, vae: nn.Module | None = None) -> str:
    """Write stage ``name`` under ``url/name``; returns that directory's URL. A latent D^t's VAE goes to its
    ``vae/`` folder (its config then says ``latent.vae: vae``): ``vae``, or else the one at ``cfg.latent.vae``."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
    directory = join(url, name)
    latent_cfg = getattr(cfg, "latent", None)
    if vae is not None and latent_cfg is None:
        raise ValueError(f"a VAE was given, but the {name} stage's config is not in latent mode")
    try:
        if latent_cfg is not None:
            files = latent.vae_files(vae if vae is not None else latent.load_vae(latent_cfg))
            for file, data in files.items():
                write_bytes_atomic(join(directory, latent.VAE_DIR, file), data)
            cfg = replace(cfg, latent=replace(latent_cfg, vae=latent.VAE_DIR))
        write_bytes_atomic(join(directory, WEIGHTS_FILE), safetensors.torch.save(_state_for_saving(module)))
        unet = getattr(module, "unet", None)
        if unet is not None:
            config = {"_class_name": type(unet).__name__, **dict(unet.config)}
            write_bytes_atomic(join(directory, UNET2D_FILE), json.dumps(config, indent=2, default=list).encode())
        config_files = getattr(module, "config_files", None)  # a transformers CLIP's configs and tokenizer
        for file, data in (config_files() if config_files is not None else {}).items():
            write_bytes_atomic(join(directory, file), data)
        write_bytes_atomic(join(directory, CONFIG_FILE), dump_yaml(cfg).encode())
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {directory}: {e}") from None
    return directory


def save_reference(url: str, name: str, bundle: str) -> str:
    """Make stage ``name`` of bundle ``url`` the same stage of ``bundle`` (a relative local path is made
    absolute); returns the reference's URL."""
    path = join(url, name, REFERENCE_FILE)
    try:
        write_bytes_atomic(path, yaml.safe_dump({"bundle": absolute(bundle)}).encode())
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {url}: {path}: {e}") from None
    return path


def stage_source(url: str, name: str) -> str:
    """The bundle holding stage ``name`` of bundle ``url``: ``url`` itself, or where its references lead."""
    seen = [url]
    while True:
        path = join(url, name, REFERENCE_FILE)
        try:
            text = read_bytes(path).decode()
        except FileNotFoundError:
            return url
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read checkpoint {seen[0]}: {path}: {e}") from None
        target = parse_yaml_mapping(text, path, CheckpointError).get("bundle")
        if not isinstance(target, str) or not target:
            raise CheckpointError(f"cannot read checkpoint {seen[0]}: {path} must say 'bundle: URL'")
        if target in seen or len(seen) > MAX_REFERENCES:
            raise CheckpointError(f"cannot read checkpoint {seen[0]}: the {name} stage's references loop "
                                  f"({' -> '.join(seen + [target])})")
        seen.append(target)
        url = target


def load_stage_config(url: str, name: str):
    """The config of stage ``name`` in bundle ``url`` (following a reference to another bundle)."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
    url = stage_source(url, name)
    path = join(url, name, CONFIG_FILE)
    try:
        text = read_bytes(path).decode()
    except FileNotFoundError:
        raise CheckpointError(f"cannot read checkpoint {url}: no {name}/{CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {path}: {e}") from None
    try:
        cfg = load_yaml(STAGE_CONFIGS[name], text, where=name)
    except ConfigError as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {e}") from None
    if getattr(cfg, "latent", None) is not None:  # the VAE's folder, relative to the stage's directory
        cfg = replace(cfg, latent=latent.located(cfg.latent, join(url, name)))
    return cfg


def _unet2d_from_json(text: str) -> nn.Module:
    from diffusers import UNet2DConditionModel, UNet2DModel

    config = json.loads(text)
    classes = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel}
    name = config.get("_class_name")
    if name not in classes:
        raise CheckpointError(f"{UNET2D_FILE}: _class_name must be one of {', '.join(classes)}, got {name!r}")
    return classes[name].from_config(config)


def load_stage(url: str, name: str, *, device: str | torch.device = "cpu") -> tuple[object, nn.Module]:
    """(config, network) of stage ``name`` from bundle ``url`` (following a reference), weights loaded strictly."""
    url = stage_source(url, name) if name in STAGE_NAMES else url
    cfg = load_stage_config(url, name)
    directory = join(url, name)
    unet2d = None
    if name not in ("clip", "prior"):
        try:
            fs, path = fsspec.core.url_to_fs(join(directory, UNET2D_FILE))
            if fs.exists(path):
                unet2d = _unet2d_from_json(read_bytes(join(directory, UNET2D_FILE)).decode())
        except CheckpointError as e:
            raise CheckpointError(f"cannot read checkpoint {url}: {name}/{e}") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read checkpoint {url}: {name}/{UNET2D_FILE}: {e}") from None
        if unet2d is not None:
            _check_unet_matches(url, name, cfg, unet2d)
    try:
        state = safetensors.torch.load(read_bytes(join(directory, WEIGHTS_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"cannot read checkpoint {url}: no {name}/{WEIGHTS_FILE}") from None
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"cannot read checkpoint {url}: {name}/{WEIGHTS_FILE}: {e}") from None
    try:
        module = None if name == "clip" and cfg.kind == "transformers" else build_stage(name, cfg, unet2d=unet2d)
    except ValueError as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {name}/{UNET2D_FILE} does not fit the {name} stage: {e}") from None
    if module is None:
        module = _transformers_clip(url, directory, cfg)
    if name == "clip" and cfg.kind == "open_clip" and state and not next(iter(state)).startswith("model."):
        state = {f"model.{k}": v for k, v in state.items()}  # open_clip's own state-dict layout
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"cannot read checkpoint {url}: {name} weights do not match its config: {' '.join(first[:3])}") from None
    return cfg, module.to(device).eval()


def _transformers_clip(url: str, directory: str, cfg) -> nn.Module:
    """An imported transformers CLIP (stages.unclip), rebuilt from the JSON configs and tokenizer beside its weights."""
    from stages import unclip

    try:
        fs, root = fsspec.core.url_to_fs(directory)
        names = [unclip.TEXT_ENCODER_FILE, unclip.IMAGE_ENCODER_FILE]
        names += [f"{unclip.TOKENIZER_DIR}/{p.rstrip('/').rsplit('/', 1)[-1]}"
                  for p in fs.ls(f"{root}/{unclip.TOKENIZER_DIR}", detail=False)]
        files = {n: read_bytes(join(directory, n)) for n in names if fs.exists(f"{root}/{n}")}
        if unclip.TEXT_ENCODER_FILE not in files:
            raise FileNotFoundError(f"no clip/{unclip.TEXT_ENCODER_FILE}")
        return unclip.TransformersClip.from_files(cfg, files)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {url}: clip: {e}") from None


def _check_unet_matches(url: str, name: str, cfg, unet2d: nn.Module) -> None:
    """config.yaml and unet2d.json must describe the same 2D U-Net."""
    c = unet2d.config
    for key in ("block_out_channels", "layers_per_block", "norm_num_groups"):
        ours, theirs = getattr(cfg.unet, key), c.get(key)
        if (list(ours) if isinstance(ours, tuple) else ours) != (list(theirs) if isinstance(theirs, (tuple, list)) else theirs):
            raise CheckpointError(
                f"cannot read checkpoint {url}: {name}/{CONFIG_FILE} says unet.{key}={ours} but {UNET2D_FILE} has {theirs}"
            )


def save_bundle(url: str, config: CascadeConfig, modules: dict[str, nn.Module]) -> None:
    for name in STAGE_NAMES:
        save_stage(url, name, getattr(config, name), modules[name])


def load_bundle_config(url: str) -> CascadeConfig:
    """The cascade config of a bundle (every stage's config, checked to chain)."""
    configs = {name: load_stage_config(url, name) for name in STAGE_NAMES}
    try:
        check_chain(configs)
        return CascadeConfig(**configs)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {url} does not chain: {e}") from None

