"""D^t in latent space (``DecoderConfig.latent``), as Latte diffuses: a frozen diffusers ``AutoencoderKL``
around the network.

    training:  z = (E(x) - shift) · scale of every frame x of a clip (E(x): a draw from the VAE's
               posterior q(z | x), or its mean), and D^t's loss on z;
    sampling:  D^t samples z ``b c f h/ds w/ds``; x = D(z / scale + shift), frame by frame, gives the
               keyframes ``b 3 f h w`` that ↑F and the super-resolution stages read as in pixel mode.

(scale, shift: ``LatentConfig.scaling_factor``, ``shift_factor``; ds: ``downsample``.) The VAE is a component
of its own: a stage directory holds it as diffusers saves it (``vae/config.json`` and
``vae/diffusion_pytorch_model.safetensors``, written by ``stages.checkpoint.save_stage``); it is never trained
and never unpickled. Any diffusers AutoencoderKL folder saved with safetensors can be put into a bundle
(``mav train decoder --vae DIR``, or ``latent.vae`` in a preset).
"""

from __future__ import annotations

import json
from dataclasses import replace

import fsspec
import safetensors.torch
import torch
from einops import rearrange
from torch import nn

from stages.config import LatentConfig
from stages.errors import UserError
from stages.fsio import join, read_bytes

VAE_DIR = "vae"   # the VAE's folder inside a stage directory (what ``latent.vae`` says in a bundle)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"  # sharded weights
PICKLED_FILE = "diffusion_pytorch_model.bin"


class VaeError(UserError):
    """A VAE folder that cannot be used: missing, pickled only, not an AutoencoderKL, or not the latent
    space the config describes; the message names the folder."""


def located(cfg: LatentConfig, base: str) -> LatentConfig:
    """``cfg`` with a relative ``vae`` made a location under ``base`` (a stage directory, or a preset's
    folder); a URL or absolute path as given."""
    if "://" in cfg.vae or cfg.vae.startswith("/"):
        return cfg
    return replace(cfg, vae=join(base, cfg.vae))


def read_vae(url: str) -> nn.Module:
    """The AutoencoderKL in the diffusers folder ``url`` (or in ``url/vae``, a pipeline's folder), frozen
    and in eval mode. Weights from safetensors only: a folder with pickled weights alone is refused."""
    from diffusers import AutoencoderKL

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{CONFIG_FILE}") and fs.exists(f"{root}/{VAE_DIR}/{CONFIG_FILE}"):
        url, root = join(url, VAE_DIR), f"{root}/{VAE_DIR}"
    try:
        config = json.loads(read_bytes(join(url, CONFIG_FILE)).decode())
    except FileNotFoundError:
        raise VaeError(f"VAE {url}: no {CONFIG_FILE} (expected a diffusers AutoencoderKL folder)") from None
    except (OSError, ValueError) as e:
        raise VaeError(f"VAE {url}: {CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        name = config.get("_class_name") if isinstance(config, dict) else None
        raise VaeError(f"VAE {url}: {CONFIG_FILE} describes a {name}, not an AutoencoderKL")
    try:
        if fs.exists(f"{root}/{WEIGHTS_FILE}"):
            state = safetensors.torch.load(read_bytes(join(url, WEIGHTS_FILE)))
        elif fs.exists(f"{root}/{INDEX_FILE}"):
            shards = sorted(set(json.loads(read_bytes(join(url, INDEX_FILE)).decode())["weight_map"].values()))
            state = {k: v for shard in shards for k, v in safetensors.torch.load(read_bytes(join(url, shard))).items()}
        elif fs.exists(f"{root}/{PICKLED_FILE}"):
            raise VaeError(f"VAE {url} holds pickled weights only ({PICKLED_FILE}), which are never loaded here: "
                           f"convert them once with diffusers: AutoencoderKL.from_pretrained(DIR).save_pretrained("
                           f"OUT, safe_serialization=True)")
        else:
            raise VaeError(f"VAE {url}: no {WEIGHTS_FILE}")
    except VaeError:
        raise
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise VaeError(f"VAE {url}: cannot read its weights: {e}") from None
    try:
        vae = AutoencoderKL.from_config(config)
        vae.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise VaeError(f"VAE {url}: its weights do not match its {CONFIG_FILE}: {' '.join(first[:2])}") from None
    return vae.requires_grad_(False).eval()


def vae_latent_config(vae: nn.Module, url: str, **fields) -> LatentConfig:
    """The latent space of ``vae`` (read from ``url``) as a LatentConfig: its channels, downsampling,
    scaling and shift factors; ``fields`` set the others (``encode``, ``decode_batch``)."""
    c = vae.config
    return LatentConfig(vae=url, channels=int(c.latent_channels), downsample=2 ** (len(c.block_out_channels) - 1),
                        scaling_factor=float(c.scaling_factor), shift_factor=float(c.shift_factor or 0.0), **fields)


def load_vae(cfg: LatentConfig) -> nn.Module:
    """The frozen VAE at ``cfg.vae``, checked to have the latent space ``cfg`` describes."""
    vae = read_vae(cfg.vae)
    own = vae_latent_config(vae, cfg.vae)
    for name in ("channels", "downsample"):
        if getattr(own, name) != getattr(cfg, name):
            raise VaeError(f"VAE {cfg.vae} has {getattr(own, name)} latent {name}, but the config says "
                           f"latent.{name}={getattr(cfg, name)}")
    return vae


def vae_files(vae: nn.Module) -> dict[str, bytes]:
    """The files of a diffusers AutoencoderKL folder (config and safetensors weights), name -> bytes."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in vae.state_dict().items()}
    return {CONFIG_FILE: vae.to_json_string().encode(), WEIGHTS_FILE: safetensors.torch.save(state)}


def _device_dtype(vae: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode(vae: nn.Module, video: torch.Tensor, cfg: LatentConfig, generator: torch.Generator) -> torch.Tensor:
    """Frames ``b 3 f h w`` in [-1, 1] -> latents z ``b c f h/ds w/ds`` (``cfg.encode``: a posterior draw,
    from ``generator``, or its mean), ``cfg.decode_batch`` frames per VAE pass."""
    device, dtype = _device_dtype(vae)
    b = video.shape[0]
    frames = rearrange(video, "b c f h w -> (b f) c h w").to(device, dtype)
    parts = [vae.encode(chunk).latent_dist for chunk in frames.split(cfg.decode_batch)]
    z = torch.cat([d.mean for d in parts])
    if cfg.encode == "sample":
        std = torch.cat([d.std for d in parts])
        z = z + std * torch.randn(z.shape, generator=generator).to(device, dtype)
    z = (z - cfg.shift_factor) * cfg.scaling_factor
    return rearrange(z, "(b f) c h w -> b c f h w", b=b).to(video.dtype)


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor, cfg: LatentConfig) -> torch.Tensor:
    """Latents z ``b c f h w`` -> frames ``b 3 f (h·ds) (w·ds)`` in [-1, 1], ``cfg.decode_batch`` frames per
    VAE pass."""
    device, dtype = _device_dtype(vae)
    b = latents.shape[0]
    z = rearrange(latents, "b c f h w -> (b f) c h w").to(device, dtype) / cfg.scaling_factor + cfg.shift_factor
    frames = torch.cat([vae.decode(chunk).sample for chunk in z.split(cfg.decode_batch)])
    return rearrange(frames.clamp(-1, 1), "(b f) c h w -> b c f h w", b=b).to(latents.dtype)
