"""What a training run is: the stage, its data, the bundle it writes, its config and resources.

Shared by the job runner (``workflows.train.job``) and the loop every worker runs (``workflows.train.loop``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from stages.checkpoint import load_stage
from stages.config import ConfigError, from_dict
from stages.fsio import absolute, join
from stages.latent import read_vae, vae_latent_config
from stages.memory import check_fits, estimate_bytes
from stages.training import TRAINING_STAGES, VIDEOS, TrainConfig, TrainingStage, start_network, training_stage
from workflows.presets import DEFAULT_PRESET, load_preset

TRAIN_DIR = "_train"
MAX_VIDEO_FRAMES = 256  # frames of a training video decoded (clips are sampled from them)
PER_STAGE = "stages"    # the section of a training config file that sets fields for one training stage


def stage_train_config(data: dict, stage: str, where: str) -> TrainConfig:
    """A training config file's mapping -> ``stage``'s TrainConfig: the common fields, then those its own
    entry under ``stages:`` sets (e.g. ``stages: {sr-low-video: {batch_size: 1}}``). Every entry is checked,
    so a mistake in another stage's entry is found now, not when that stage trains."""
    data = dict(data)
    sections = data.pop(PER_STAGE, None) or {}
    if not isinstance(sections, dict):
        raise ConfigError(f"{where}: {PER_STAGE}: expected a mapping of training stage to fields")
    unknown = sorted(set(sections) - set(TRAINING_STAGES))
    if unknown:
        raise ConfigError(f"{where}: {PER_STAGE}: unknown training stage {unknown[0]!r}; expected one of "
                          f"{', '.join(TRAINING_STAGES)}")
    configs = {}
    for name in {*sections, stage}:
        own = sections.get(name) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{where}: {PER_STAGE}.{name}: expected a mapping of fields")
        configs[name] = from_dict(TrainConfig, {**data, **own}, f"{where} ({PER_STAGE}.{name})" if own else where)
    return configs[stage]


@dataclass(frozen=True)
class TrainJob:
    stage: str                      # a training stage (stages.training.TRAINING_STAGES)
    data: tuple[str, ...]           # data roots, directories, files or globs (local or fsspec URLs)
    output: str                     # the checkpoint bundle the stage is written into
    config: TrainConfig
    preset: str = DEFAULT_PRESET    # preset name or YAML path: the network sizes
    init: str | None = None         # bundle holding the stage this one starts from
    clip: str | None = None         # bundle holding the CLIP stage (default: output)
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    vae: str | None = None          # decoder: a diffusers AutoencoderKL folder; D^t then diffuses its latents

    def __post_init__(self) -> None:
        # Ray Train's workers run in a directory of their own: a relative local path would name another
        # file there (a preset not found, a checkpoint written where nobody looks), so each is made absolute.
        object.__setattr__(self, "data", tuple(absolute(url) for url in self.data))
        for name in ("output", "init", "clip", "vae"):
            if getattr(self, name):
                object.__setattr__(self, name, absolute(getattr(self, name)))
        if self.preset.endswith((".yaml", ".yml")):
            object.__setattr__(self, "preset", absolute(self.preset))

    @property
    def spec(self) -> TrainingStage:
        return training_stage(self.stage)

    @property
    def run_dir(self) -> str:
        return join(self.output, TRAIN_DIR, self.stage)

    def trainable_parameters(self, net) -> set[str] | None:
        """Names of the only parameters of ``net`` to train; None: as the config says (``temporal_only``)."""
        return None

    def check_memory(self, net: torch.nn.Module, stage_cfg, device: torch.device) -> None:
        """MemoryBudgetError before the first step if a worker's batch, with the weights, gradients, Adam
        and EMA, cannot fit on ``device`` (an estimate from the config, ``stages.memory``)."""
        cfg, spec = self.config, self.spec
        frames = cfg.frames if spec.data == VIDEOS else 1
        size = spec.data_size(load_preset(self.preset))
        unet = getattr(stage_cfg, "unet", None) if getattr(stage_cfg, "backbone", "unet") == "unet" else None
        need = estimate_bytes(sum(p.numel() for p in net.parameters()), unet, frames=cfg.batch_size * frames,
                              size=size, training=True, gradient_checkpointing=cfg.gradient_checkpointing,
                              dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        check_fits(f"training {self.stage} at batch_size {cfg.batch_size} ({frames} frames of {size}x{size} each)",
                   need, device, f"lower batch_size for this stage (the training config's stages: {{{self.stage}: "
                   "{batch_size: N}}), or set gradient_checkpointing / bf16")

    def initial_network(self):
        """(stage config, network) a fresh run starts from: built from the preset (with ``vae``: D^t in its
        latent space), or from ``init``."""
        spec = self.spec
        init = load_stage(self.init, spec.init) if spec.init and self.init else None
        return start_network(spec, self.preset_config(), init)

    def preset_config(self):
        """The preset; with ``vae``, its D^t in that VAE's latent space (sizes from the VAE's config,
        ``diffusion.clip_sample`` off: latents are not confined to [-1, 1])."""
        preset = load_preset(self.preset)
        if not self.vae:
            return preset
        decoder = preset.decoder
        try:
            decoder = replace(decoder, latent=vae_latent_config(read_vae(self.vae), self.vae),
                              diffusion=replace(decoder.diffusion, clip_sample=False))
        except ConfigError as e:
            raise ConfigError(f"--vae {self.vae} with preset {self.preset}: {e}") from None
        return replace(preset, decoder=decoder)
