"""Configuration of the six Make-A-Video stages.

One frozen dataclass per stage, loaded from YAML with unknown keys rejected by
name, and saved beside the weights of every checkpoint. A preset (``cluster/presets``)
is a YAML mapping with one section per stage.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from stages.errors import UserError
from stages.fsio import parse_yaml_mapping

STAGE_NAMES = ("clip", "prior", "decoder", "interpolation", "sr_low", "sr_high")
FRAME_STAGES = STAGE_NAMES[STAGE_NAMES.index("decoder"):]  # the cascade's stages whose output is frames

SAMPLERS = ("ddim", "dpm++", "unclip")  # unclip: diffusers' UnCLIPScheduler (ancestral, Karlo's step spacing)
VARIANCES = ("fixed", "learned_range")
CLIP_KINDS = ("open_clip", "transformers")
EMBEDDING_SPACES = ("unit", "clip")
CONDITIONINGS_Y = ("image", "unclip")
LOW_RES_CONDITIONS = ("noised", "unclip")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
ATTENTION_MODES = ("full", "sparse_causal")  # stages.attention: the processors of the spatial self-attention


class ConfigError(UserError):
    """A config file or mapping that does not describe a valid stage."""


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    train_timesteps: int = 1000         # T of the forward process q(x_t | x_0)
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers beta schedule name
    prediction_type: str = "epsilon"    # what the network predicts: epsilon, sample (x_0) or v_prediction
    sampler: str = "ddim"               # ddim or dpm++ (both deterministic given the initial noise), or unclip (ancestral)
    steps: int = 25                     # sampling steps
    guidance: float = 1.0               # classifier-free guidance scale w; 1 disables the unconditional pass
    clip_sample: bool = True            # clamp predicted x_0 to [-1, 1] (pixel stages)
    cond_drop_prob: float = 0.1         # training: probability of dropping the condition (for guidance)
    variance: str = "fixed"             # fixed, or learned_range: the network also outputs v, its variance
                                        # exp(v' log β_t + (1 − v') log β̃_t), v' = (v + 1) / 2 (Nichol & Dhariwal, 2021)
    clip_sample_range: float = 1.0      # the range predicted x_0 is clamped to when clip_sample is set

    def __post_init__(self) -> None:
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("variance", self.variance, VARIANCES)
        if self.sampler == "unclip" and (self.beta_schedule != "squaredcos_cap_v2" or self.prediction_type == "v_prediction"):
            raise ConfigError("sampler unclip needs beta_schedule squaredcos_cap_v2 and prediction_type epsilon or sample")
        if self.clip_sample_range <= 0:
            raise ConfigError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_positive("steps", self.steps)
        _check_positive("train_timesteps", self.train_timesteps)
        if self.steps > self.train_timesteps:
            raise ConfigError(f"steps={self.steps} exceeds train_timesteps={self.train_timesteps}")
        if self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0, got {self.guidance}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


# Keys of DiffusionConfig that earlier bundles and presets carried, now FrameNoiseConfig's (old -> new).
_FRAME_NOISE_KEYS = {"frame_noise_shared": "shared", "sample_frame_noise_shared": "sample_shared",
                     "sample_frame_noise_progressive": "sample_progressive"}
# Earlier keys whose meaning is gone: dropped with a notice that says what replaced them.
_RETIRED_KEYS = {
    "frame_noise_progressive": "progressive noise in training was retired (where sampling had no r of its own, "
                               "its r is now frame_noise.sample_progressive); retraining uses independent "
                               "per-frame noise",
    "frame_noise_flow": "training noise that follows a clip's content was retired; sampling is unaffected",
    "sample_frame_noise_drift": "the sampling drift was replaced by motion guidance, a per-prompt option "
                                "(mav generate --motion DY DX); this stage now samples from what it learned",
}
_OFF = (None, 0, 0.0, False, (), [])


def _migrate_diffusion(data: dict, where: str, frames: bool) -> dict:
    """Move an earlier bundle's flat frame-noise keys of ``data['diffusion']`` into ``data['frame_noise']``
    (``frames``: the stage has a frame-noise config) and drop retired ones, each with a notice."""
    diffusion = data.get("diffusion")
    if not isinstance(diffusion, dict) or not set(diffusion) & (set(_FRAME_NOISE_KEYS) | set(_RETIRED_KEYS)):
        return data
    data, diffusion = dict(data), dict(diffusion)
    log = logging.getLogger(__name__)
    moved = {}
    for old, new in _FRAME_NOISE_KEYS.items():
        value = diffusion.pop(old, None)
        if value not in _OFF:
            if not frames:
                raise ConfigError(f"{where}.diffusion.{old}: this stage's noise is not correlated across frames; "
                                  "delete the key")
            moved[new] = value
    training_r = diffusion.get("frame_noise_progressive")
    if frames and training_r not in _OFF and "sample_progressive" not in moved:
        moved["sample_progressive"] = training_r
    for old, what in _RETIRED_KEYS.items():
        if old in diffusion and diffusion.pop(old) not in _OFF:
            log.warning("%s.diffusion.%s: %s", where, old, what)
    data["diffusion"] = diffusion
    if moved:
        if "frame_noise" in data:
            raise ConfigError(f"{where}: both frame_noise and the earlier diffusion.frame_noise_* keys are set; "
                              "keep frame_noise")
        data["frame_noise"] = moved
        log.warning("%s: the earlier diffusion.*frame_noise* keys read as frame_noise: %s (save the config "
                    "again to update it)", where, moved)
    return data


def _migrate_unet(data: dict, where: str) -> dict:
    unet = data.get("unet")
    if isinstance(unet, dict) and "temporal_fps" in unet:
        if unet["temporal_fps"] is not False:
            raise ConfigError(f"{where}.unet.temporal_fps: fps in the temporal layers was retired (the weights "
                              "hold layers no network builds now); retrain the stage without it")
        data = {**data, "unet": {k: v for k, v in unet.items() if k != "temporal_fps"}}
    return data


@dataclass(frozen=True, kw_only=True)
class FrameNoiseConfig:
    """How a video's noise is correlated across its frames (PYoCo's mixed and progressive noise,
    ``stages.noise.frame_noise``): only the stages whose output has frames have one."""

    shared: float = 0.0                 # ρ: share of the noise variance common to all frames (training and sampling)
    sample_shared: float | None = None  # ρ when sampling; None: shared
    sample_progressive: float = 0.0     # r: correlation of neighbouring frames' per-frame parts when sampling

    def __post_init__(self) -> None:
        for name in ("shared", "sample_shared", "sample_progressive"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"frame_noise.{name} must be in [0, 1), got {value}")

    @property
    def sampling_shared(self) -> float:
        """ρ of the initial noise a sample starts from."""
        return self.shared if self.sample_shared is None else self.sample_shared


@dataclass(frozen=True, kw_only=True)
class ClipConfig:
    kind: str = "open_clip"         # open_clip, or transformers: an imported CLIPTextModelWithProjection (+ CLIPTokenizer,
                                    # optional CLIPVisionModelWithProjection) whose sizes are in its own JSON files
    arch: str = "custom"            # an open_clip architecture name (e.g. ViT-B-32), or custom for the sizes below
    embed_dim: int = 64             # joint embedding size d of x_e and y_e
    context_length: int = 77        # BPE tokens per prompt, start and end tokens included
    text_width: int = 64
    text_heads: int = 4
    text_layers: int = 2
    image_size: int = 32            # input size of the image tower
    vision_width: int = 64
    vision_layers: int = 2
    vision_patch_size: int = 8
    vision_head_width: int = 32

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, CLIP_KINDS)

    def open_clip_config(self) -> dict[str, Any]:
        """Keyword arguments for ``open_clip.CLIP``."""
        if self.arch != "custom":
            import open_clip

            cfg = open_clip.get_model_config(self.arch)
            if cfg is None:
                raise ConfigError(f"unknown open_clip architecture {self.arch!r}")
            if "custom_text" in cfg or "hf_model_name" in cfg.get("text_cfg", {}):
                raise ConfigError(f"open_clip architecture {self.arch!r} has a custom text tower; use a CLIP architecture")
            return {k: v for k, v in cfg.items() if k != "custom_text"}
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "patch_size": self.vision_patch_size,
                "head_width": self.vision_head_width,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }

    @property
    def resolved_embed_dim(self) -> int:
        if self.kind == "transformers":
            return self.embed_dim
        return int(self.open_clip_config()["embed_dim"])

    @property
    def resolved_context_length(self) -> int:
        if self.kind == "transformers":
            return self.context_length
        return int(self.open_clip_config()["text_cfg"].get("context_length", 77))


@dataclass(frozen=True, kw_only=True)
class PriorConfig:
    embed_dim: int = 64             # d of x_e and y_e (the CLIP stage's embed_dim)
    num_tokens: int = 77            # text tokens n (the CLIP stage's context_length)
    layers: int = 2                 # transformer blocks of diffusers.PriorTransformer
    heads: int = 2
    head_dim: int = 32
    diffusion: DiffusionConfig = field(
        default_factory=lambda: DiffusionConfig(prediction_type="sample", clip_sample=False, guidance=4.0, steps=10)
    )
    embedding_space: str = "unit"   # unit: x_e in and y_e out at unit norm × √d; clip: raw CLIP embeddings, y_e = x σ + μ
                                    # with the transformer's clip_std, clip_mean (unCLIP)

    def __post_init__(self) -> None:
        _check_choice("embedding_space", self.embedding_space, EMBEDDING_SPACES)

    @staticmethod
    def migrate(data: dict, where: str) -> dict:
        return _migrate_diffusion(data, where, frames=False)


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (32, 64)  # channels per resolution level
    attention: tuple[bool, ...] = (False, True)     # spatial (+ temporal) attention per level
    layers_per_block: int = 1
    attention_head_dim: int = 16
    norm_num_groups: int = 8
    cross_attention_dim: int | None = 64  # context-token width; None builds a UNet2DModel (no cross-attention)
    temporal: bool = True                 # pseudo-3D layers: temporal conv after each 2D conv, temporal attention after each spatial one
    temporal_kernel: int = 3              # 1D temporal conv kernel size (odd)
    temporal_heads: int = 4
    spatial_attention: str = "full"       # spatial self-attention: full (a frame alone) or sparse_causal (frames 0 and i-1)

    def __post_init__(self) -> None:
        _check_choice("spatial_attention", self.spatial_attention, ATTENTION_MODES)
        if len(self.attention) != len(self.block_out_channels):
            raise ConfigError(
                f"attention has {len(self.attention)} entries but block_out_channels has {len(self.block_out_channels)}"
            )
        if self.temporal_kernel % 2 != 1:
            raise ConfigError(f"temporal_kernel must be odd, got {self.temporal_kernel}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"block_out_channels entry {c} is not divisible by norm_num_groups={self.norm_num_groups}")


LATTE_VARIANTS = (1, 2, 3, 4)   # Latte's space–time splits (Sec. 3.2), stages.latte
PATCH_EMBEDDINGS = ("patch", "tubelet")
CONDITIONINGS = ("adaln", "tokens")
TEMPORAL_POSITIONS = ("sincos", "rope")
BACKBONES = ("unet", "latte")


@dataclass(frozen=True, kw_only=True)
class LatteConfig:
    """A Latte video diffusion transformer (Ma et al., 2024), ``stages.latte.LatteVideo``."""

    variant: int = 1                  # 1 spatial and temporal blocks interleaved, 2 all spatial then all temporal,
                                      # 3 spatial then temporal attention in one block, 4 heads split: half space, half time
    width: int = 96                   # token width D (96 and depth 3: about the parameters of the default UNetConfig)
    depth: int = 3                    # spatial blocks; variants 1 and 2 add as many temporal blocks (Latte's layers: 2·depth)
    heads: int = 4                    # attention heads of every block (variant 4: half over space, half over time)
    mlp_ratio: float = 4.0            # MLP hidden width / D
    patch_size: int = 2               # pixels per patch side
    patch_embedding: str = "patch"    # patch: per-frame 2D patches; tubelet: patches spanning `tubelet` frames
    tubelet: int = 2                  # frames per tubelet patch (patch_embedding: tubelet)
    conditioning: str = "adaln"       # adaln: timestep + y_e + fps modulate every block, gates at zero (adaLN-Zero);
                                      # tokens: that vector as an extra token of every sequence
    temporal_position: str = "sincos"  # sincos: absolute, any frame count; rope: rotary (relative), in temporal attention
    temporal: bool = True             # temporal parts built; false: the image model, each frame (tubelet) apart

    def __post_init__(self) -> None:
        if self.variant not in LATTE_VARIANTS:
            raise ConfigError(f"variant must be one of 1, 2, 3, 4; got {self.variant!r}")
        _check_choice("patch_embedding", self.patch_embedding, PATCH_EMBEDDINGS)
        _check_choice("conditioning", self.conditioning, CONDITIONINGS)
        _check_choice("temporal_position", self.temporal_position, TEMPORAL_POSITIONS)
        for name in ("width", "depth", "heads", "patch_size", "tubelet"):
            _check_positive(name, getattr(self, name))
        if self.width % self.heads:
            raise ConfigError(f"heads={self.heads} must divide width={self.width}")
        if (self.width // self.heads) % 2:
            raise ConfigError(f"width / heads = {self.width // self.heads} must be even (sin-cos and rotary positions)")
        if self.variant == 4 and self.heads % 2:
            raise ConfigError(f"variant 4 splits the heads in half between space and time: heads={self.heads} must be even")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def frames_per_token(self) -> int:
        return self.tubelet if self.patch_embedding == "tubelet" else 1


def _check_latte(cfg, size: int | None, frames: int | None, where: str = "") -> None:
    """A stage whose backbone is Latte: its size and frame count must cut into whole patches and tubelets."""
    _check_choice("backbone", cfg.backbone, BACKBONES)
    if cfg.backbone != "latte":
        return
    where = f"{where}: " if where else ""
    if size is not None and size % cfg.latte.patch_size:
        raise ConfigError(f"{where}latte.patch_size={cfg.latte.patch_size} must divide the size {size}")
    k = cfg.latte.frames_per_token
    if frames is not None and frames % k:
        raise ConfigError(f"{where}latte.tubelet={k} must divide the frame count {frames}")


LATENT_ENCODINGS = ("sample", "mean")  # what of the VAE's posterior q(z | x) D^t trains on


@dataclass(frozen=True, kw_only=True)
class LatentConfig:
    """D^t in a VAE's latent space (``stages.latent``), as Latte diffuses: a frozen diffusers AutoencoderKL
    encodes training frames into the latents z D^t learns; D^t's sampled latents are decoded, frame by
    frame, into the keyframes ↑F reads."""

    vae: str = ""                     # the AutoencoderKL's folder (config.json + diffusion_pytorch_model.safetensors): in a
                                      # bundle "vae", the stage directory's copy; in a preset a path or URL (relative: to it)
    channels: int = 4                 # latent channels (the VAE's latent_channels)
    downsample: int = 8               # frame pixels per latent pixel along a side (2^(levels - 1) of the VAE's blocks)
    scaling_factor: float = 0.18215   # z = (E(x) - shift_factor) * scaling_factor, as the VAE's config says
    shift_factor: float = 0.0
    encode: str = "sample"            # training: z drawn from the VAE's posterior (sample), or its mean
    decode_batch: int = 16            # frames per VAE pass (bounds memory)

    def __post_init__(self) -> None:
        if not self.vae:
            raise ConfigError("vae must name the VAE's folder (a diffusers AutoencoderKL saved with "
                              "safetensors)")
        for name in ("channels", "downsample", "decode_batch"):
            _check_positive(name, getattr(self, name))
        if self.downsample & (self.downsample - 1):
            raise ConfigError(f"downsample must be a power of 2 (2^(levels - 1) of the VAE), got {self.downsample}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        _check_choice("encode", self.encode, LATENT_ENCODINGS)


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    frames: int = 16                # frames generated before interpolation
    size: int = 64                  # output height = width, pixels
    image_embed_dim: int = 64       # d of y_e (the CLIP stage's embed_dim)
    context_tokens: int = 4         # y_e projected into this many extra cross-attention tokens
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(guidance=3.0, steps=25))
    frame_noise: FrameNoiseConfig = field(default_factory=FrameNoiseConfig)
    backbone: str = "unet"          # the network: unet (VideoUNet) or latte (LatteVideo, sized by `latte`)
    latte: LatteConfig = field(default_factory=LatteConfig)
    conditioning: str = "image"     # image: y_e alone; unclip: y_e, x_e and the text tokens through UnCLIPTextProjModel
                                    # (stages.unclip), y_e's unconditional value learned
    latent: LatentConfig | None = None  # latent mode: D^t diffuses a VAE's latents (stages.latent); None: pixels

    def __post_init__(self) -> None:
        _check_choice("conditioning", self.conditioning, CONDITIONINGS_Y)
        if self.latent is not None:
            if self.size % self.latent.downsample:
                raise ConfigError(f"latent.downsample={self.latent.downsample} must divide the size {self.size}")
            if self.backbone == "latte" and self.latent_size % self.latte.patch_size:
                raise ConfigError(f"latte.patch_size={self.latte.patch_size} must divide the latent size "
                                  f"{self.latent_size} (size / latent.downsample)")
            if self.diffusion.clip_sample:
                raise ConfigError("latent mode: set diffusion.clip_sample to false (latents are not confined to [-1, 1])")
            if self.conditioning != "image":
                raise ConfigError("latent mode takes conditioning: image (an unCLIP decoder diffuses pixels)")
        _check_latte(self, self.latent_size, self.frames)

    @property
    def channels(self) -> int:
        """Channels of what D^t diffuses: the VAE's latent channels, or 3 (RGB)."""
        return self.latent.channels if self.latent is not None else 3

    @property
    def latent_size(self) -> int:
        """Height = width of what D^t diffuses: size / latent.downsample, or size."""
        return self.size // self.latent.downsample if self.latent is not None else self.size

    @staticmethod
    def migrate(data: dict, where: str) -> dict:
        return _migrate_unet(_migrate_diffusion(data, where, frames=True), where)


@dataclass(frozen=True, kw_only=True)
class InterpolationConfig:
    skip: int = 5                   # frame skip: F keyframes become (F - 1) * skip + 1 frames
    image_embed_dim: int = 64       # d of y_e (the CLIP stage's embed_dim)
    context_tokens: int = 4
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(guidance=1.0, steps=10))
    frame_noise: FrameNoiseConfig = field(default_factory=FrameNoiseConfig)
    keep_given_frames: bool = True  # output the given frames as they came in; false: ↑F's own rendering of them
    backbone: str = "unet"          # the network: unet (VideoUNet) or latte (LatteVideo, sized by `latte`)
    latte: LatteConfig = field(default_factory=LatteConfig)
    conditioning: str = "image"     # as DecoderConfig.conditioning

    def __post_init__(self) -> None:
        _check_positive("skip", self.skip)
        _check_choice("conditioning", self.conditioning, CONDITIONINGS_Y)
        _check_latte(self, None, None)

    @staticmethod
    def migrate(data: dict, where: str) -> dict:
        return _migrate_unet(_migrate_diffusion(data, where, frames=True), where)


@dataclass(frozen=True, kw_only=True)
class SuperResConfig:
    in_size: int = 64               # input height = width, pixels
    out_size: int = 256             # output height = width, pixels
    noise_level: int = 100          # forward-process timestep the upsampled condition is noised to when sampling
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(cross_attention_dim=None))
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(steps=10))
    low_res: str = "noised"         # the condition: noised (bilinear, noised to noise_level, the level given) or
                                    # unclip (bicubic with antialiasing, clean, as unCLIP's upsamplers take it)
    final_network: bool = False     # a second U-Net for the last sampling step (unCLIP's super_res_last)

    def __post_init__(self) -> None:
        _check_choice("low_res", self.low_res, LOW_RES_CONDITIONS)
        if self.out_size <= self.in_size:
            raise ConfigError(f"out_size={self.out_size} must exceed in_size={self.in_size}")
        if self.unet.cross_attention_dim is not None:
            raise ConfigError("super-resolution networks take no context tokens: set unet.cross_attention_dim to null")
        if not 0 <= self.noise_level < self.diffusion.train_timesteps:
            raise ConfigError(f"noise_level must be in 0..{self.diffusion.train_timesteps - 1}, got {self.noise_level}")


@dataclass(frozen=True, kw_only=True)
class SRLowConfig(SuperResConfig):
    """SR_l^t: spatiotemporal super-resolution."""

    frame_noise: FrameNoiseConfig = field(default_factory=FrameNoiseConfig)

    @staticmethod
    def migrate(data: dict, where: str) -> dict:
        return _migrate_unet(_migrate_diffusion(data, where, frames=True), where)


@dataclass(frozen=True, kw_only=True)
class SRHighConfig(SuperResConfig):
    """SR_h: spatial super-resolution, one frame at a time with shared noise."""

    in_size: int = 256
    out_size: int = 768
    frame_batch: int = 16           # frames per forward pass (bounds memory; results do not depend on it)
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(cross_attention_dim=None, temporal=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unet.temporal:
            raise ConfigError("sr_high is spatial-only: set unet.temporal to false")
        _check_positive("frame_batch", self.frame_batch)

    @staticmethod
    def migrate(data: dict, where: str) -> dict:
        return _migrate_unet(_migrate_diffusion(data, where, frames=False), where)


STAGE_CONFIGS: dict[str, type] = {
    "clip": ClipConfig,
    "prior": PriorConfig,
    "decoder": DecoderConfig,
    "interpolation": InterpolationConfig,
    "sr_low": SRLowConfig,
    "sr_high": SRHighConfig,
}


@dataclass(frozen=True, kw_only=True)
class CascadeConfig:
    """All six stages; sizes must chain: decoder -> interpolation -> sr_low -> sr_high."""

    clip: ClipConfig = field(default_factory=ClipConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    sr_low: SRLowConfig = field(default_factory=SRLowConfig)
    sr_high: SRHighConfig = field(default_factory=SRHighConfig)

    def __post_init__(self) -> None:
        check_chain({name: getattr(self, name) for name in STAGE_NAMES})

    @property
    def output_frames(self) -> int:
        return (self.decoder.frames - 1) * self.interpolation.skip + 1


def check_chain(configs: dict[str, Any]) -> None:
    """Raise ConfigError if stage configs do not fit together (embedding sizes, resolutions)."""
    d = configs["clip"].resolved_embed_dim
    n = configs["clip"].resolved_context_length
    for key, value in (
        ("prior.embed_dim", configs["prior"].embed_dim),
        ("decoder.image_embed_dim", configs["decoder"].image_embed_dim),
        ("interpolation.image_embed_dim", configs["interpolation"].image_embed_dim),
    ):
        if value != d:
            raise ConfigError(f"{key}={value} must equal the CLIP embedding size {d}")
    if configs["prior"].num_tokens != n:
        raise ConfigError(f"prior.num_tokens={configs['prior'].num_tokens} must equal the CLIP context length {n}")
    for name in ("decoder", "interpolation"):
        cad = configs[name].unet.cross_attention_dim
        if configs[name].backbone == "unet" and cad is None:
            raise ConfigError(f"{name}.unet.cross_attention_dim must be set (y_e enters as context tokens)")
    decoder = configs["decoder"]
    _check_latte(configs["interpolation"], decoder.size, (decoder.frames - 1) * configs["interpolation"].skip + 1,
                 "interpolation")
    if configs["sr_low"].in_size != configs["decoder"].size:
        raise ConfigError(
            f"sr_low.in_size={configs['sr_low'].in_size} must equal decoder.size={configs['decoder'].size}"
        )
    if configs["sr_high"].in_size != configs["sr_low"].out_size:
        raise ConfigError(
            f"sr_high.in_size={configs['sr_high'].in_size} must equal sr_low.out_size={configs['sr_low'].out_size}"
        )
    if d <= 0:
        raise ConfigError(f"clip embedding size must be positive, got {d}")


T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError naming the key.

    Keys left out keep the value of ``base`` (default: the class defaults), also inside nested sections.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    migrate = getattr(cls, "migrate", None)
    if migrate is not None:  # keys of earlier layouts, read into today's or refused with what to do
        data = migrate(data, where or cls.__name__)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; expected one of: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        kwargs[name] = _convert(hints[name], value, key, default)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _convert(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise ConfigError(f"{key}: null is not allowed")
        return _convert(args[0], value, key, default)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, base=default if isinstance(default, tp) else None)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, _) = typing.get_args(tp)
        return tuple(_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML-friendly mapping of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def load_yaml(cls: type[T], text: str, where: str = "") -> T:
    """Config ``cls`` from YAML ``text``; ConfigError naming ``where`` (and the key) if it is not one."""
    return from_dict(cls, parse_yaml_mapping(text, where or cls.__name__, ConfigError), where)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
