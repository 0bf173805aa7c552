"""One runner per stage, the single shape every way of running the cascade uses.

A runner loads its network in ``__init__`` and maps a batch of rows, ``dict[str, np.ndarray]``, to a
batch with its stage's output columns added (and columns no later stage needs dropped). The in-process
pipeline chains them; the Ray batch job runs each as an actor pool; Serve wraps each in a deployment.

Row columns: ``prompt`` and ``negative_prompt`` (str), ``seed`` (int64), ``fps`` (int64, keyframe rate
D^t is conditioned on), ``steps`` (int64, 0 = each stage's preset value), ``guidance`` (float32, NaN =
the decoder's preset value), ``motion`` (float32 ``b 2``, optional: motion guidance (dy, dx) in frame sizes
per keyframe, NaN = none). Frames cross stages as uint8 ``b 3 f h w``.

Arithmetic: ``dtype`` ``bf16`` runs the network under bfloat16 autocast with its output cast back to float32,
so latents and the scheduler's arithmetic stay float32; ``auto`` (the default) is bf16 on CUDA and fp32
elsewhere. On CUDA float32 matmuls may use TF32 and the networks use channels-last memory; ``compile``
wraps the network in ``torch.compile``. Before each batch a runner checks that the batch fits its device's
free memory (``stages.memory``): SR_l^t then runs a video too long to fit at once in overlapping frame
windows, SR_h lowers its frames per pass; what cannot fit at all is a ``MemoryBudgetError`` naming the stage.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch

from stages import cascade, latent
from stages.checkpoint import load_stage
from stages.config import STAGE_NAMES
from stages.errors import UserError
from stages.memory import HEADROOM, WINDOW_OVERLAP, FrameWindows, check_fits, estimate_bytes, free_bytes, largest_fitting
from stages.inversion import invert_keyframes, load_inversion
from workflows import columns
from workflows.presets import DEFAULT_PRESET, load_preset
from workflows.video import from_uint8, to_uint8

StageProgress = Callable[[str, int, int], None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = ("auto", "fp32", "bf16")
MEMORY_REMEDY = ("lower its batch size (batch_size in pools.yaml, max_batch_size in serve.yaml, --batch-size of "
                 "mav generate) or run it in bf16 (--dtype bf16)")


def network_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``/``fp32``/``bf16`` -> the dtype the network computes in on ``device`` (auto: bf16 on CUDA)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def compute_in(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run ``net``'s forward under ``dtype`` autocast on its device, its tensor output cast back to float32
    (its weights, and whatever the caller keeps, stay float32). float32: ``net`` unchanged."""
    if dtype == torch.float32:
        return net
    forward, device_type = net.forward, next(net.parameters()).device.type

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        return out.float() if torch.is_tensor(out) else out

    net.forward = autocast_forward
    return net


def load_network(stage: str, *, checkpoint: str | None, preset: str, device: torch.device | str):
    """(config, eval-mode network) of ``stage``: from a checkpoint bundle, else freshly built from a preset."""
    if checkpoint:
        return load_stage(checkpoint, stage, device=device)
    cfg = getattr(load_preset(preset), stage)
    return cfg, cascade.build_stage(stage, cfg).to(device).eval()


class StageRunner:
    """Base: ``__call__(batch) -> batch`` under ``torch.inference_mode()``."""

    stage: str = ""
    drops: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        checkpoint: str | None = None,
        preset: str = DEFAULT_PRESET,
        device: str | torch.device | None = None,
        progress: StageProgress | None = None,
        dtype: str = "auto",
        compile: bool = False,
    ) -> None:
        """``dtype``: auto, fp32 or bf16 (see the module's docstring); ``compile``: ``torch.compile`` the network."""
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {self.stage!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = network_dtype(dtype, self.device)
        self.cfg, self.net = load_network(self.stage, checkpoint=checkpoint, preset=preset, device=self.device)
        self.parameter_count = sum(p.numel() for p in self.net.parameters())
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 already
            self.net = self.net.to(memory_format=torch.channels_last)
        compute_in(self.net, self.dtype)
        if compile:
            self.net.compile()
        self.progress = progress

    def memory_needed(self, frames: int, size: int) -> int:
        """Estimated peak bytes of one network pass over ``frames`` frames of ``size``² (all rows together)."""
        unet = getattr(self.net, "cfg", None)
        unet = unet if dataclasses.is_dataclass(unet) and hasattr(unet, "block_out_channels") else None
        return estimate_bytes(self.parameter_count, unet, frames=frames, size=size, dtype=self.dtype)

    def check_memory(self, what: str, frames: int, size: int) -> None:
        """MemoryBudgetError before sampling if a pass over ``frames`` frames of ``size``² cannot fit."""
        check_fits(f"{self.stage}: {what}", self.memory_needed(frames, size), self.device, MEMORY_REMEDY,
                   free=free_bytes(self.device))

    def _progress(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self.stage, step, total)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["seed"])
        with torch.inference_mode():
            parts: dict[str, list] = {}
            # Rows with different step counts cannot share a sampling loop (0: the preset's count).
            for idx, steps in columns.groups(batch["steps"].astype(np.int64)):
                for key, values in self.run(columns.take(batch, idx), int(steps) or None).items():
                    parts.setdefault(key, []).append((idx, values))
        out = {k: v for k, v in batch.items() if k not in self.drops}
        out.update({k: columns.scatter(v, n) for k, v in parts.items()})
        return out

    def run(self, batch: dict[str, np.ndarray], steps: int | None) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _seeds(batch: dict[str, np.ndarray]) -> list[int]:
    return [int(s) for s in batch["seed"]]


class TextEncoderRunner(StageRunner):
    """CLIP_text: prompt and negative prompt -> x_e, per-token features, mask (for both)."""

    stage = "clip"

    def run(self, batch, steps):
        prompts = [str(p) for p in batch["prompt"]]
        negatives = [str(p) for p in batch.get("negative_prompt", np.array([""] * len(prompts), dtype=object))]
        unique = list(dict.fromkeys(prompts + negatives))
        enc = cascade.encode_text(self.net, unique)
        pos = [unique.index(p) for p in prompts]
        neg = [unique.index(p) for p in negatives]
        self._progress(1, 1)
        out = {}
        for prefix, rows in (("text", pos), ("neg", neg)):
            out[f"{prefix}_embeds"] = enc["text_embeds"][rows].cpu().numpy().astype(np.float32)
            out[f"{prefix}_hidden"] = enc["text_hidden"][rows].cpu().numpy().astype(np.float16)
            out[f"{prefix}_mask"] = enc["text_mask"][rows].cpu().numpy()
        out["truncated"] = enc["truncated"][pos].numpy()
        return out


# CLIP_text's columns: read by P, and by an unCLIP-conditioned D^t and ↑F (dropped after ↑F).
TEXT_COLUMNS = ("text_embeds", "text_hidden", "text_mask", "neg_embeds", "neg_hidden", "neg_mask")


def _text(batch: dict[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor] | None:
    """The prompt's (``text``) or negative prompt's (``neg``) encoding from a batch's columns, if it has them."""
    if f"{prefix}_embeds" not in batch:
        return None
    return {
        "text_embeds": torch.from_numpy(batch[f"{prefix}_embeds"]).float(),
        "text_hidden": torch.from_numpy(np.asarray(batch[f"{prefix}_hidden"])).float(),
        "text_mask": torch.from_numpy(batch[f"{prefix}_mask"]),
    }


class PriorRunner(StageRunner):
    """P: (x_e, x̂) -> y_e."""

    stage = "prior"

    def run(self, batch, steps):
        y = cascade.generate_image_embeds(
            self.net, _text(batch, "text"), _text(batch, "neg"), _seeds(batch), steps=steps, progress=self._progress
        )
        return {"image_embeds": y.cpu().numpy().astype(np.float32)}


class DecoderRunner(StageRunner):
    """D^t: (y_e, fps) -> keyframes, uint8 ``b 3 frames size size``. A tuned bundle's D^t (``mav tune``) edits
    its source video: it starts from the source's DDIM-inverted noise at the source's fps (``inversion``;
    None: from the seeds' noise). A latent D^t's VAE (``vae``) decodes its latents into the keyframes."""

    stage = "decoder"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vae = latent.load_vae(self.cfg.latent).to(self.device) if self.cfg.latent is not None else None
        self.inversion = load_inversion(kwargs["checkpoint"]) if kwargs.get("checkpoint") else None

    def _inverted_noise(self, steps: int) -> torch.Tensor:
        """The source's x_T for ``steps`` DDIM steps (inverted afresh for a step count it was not inverted at)."""
        if steps != self.inversion.steps:
            inv = self.inversion
            self.inversion = invert_keyframes(self.net, self.cfg, inv.keyframes, inv.image_embeds, inv.fps, steps=steps)
        return self.inversion.noise

    def run(self, batch, steps):
        guidance = np.asarray(batch["guidance"], dtype=np.float32)
        guidance = np.where(np.isnan(guidance), self.cfg.diffusion.guidance, guidance)
        guided = bool((guidance != 1).any())
        self.check_memory(f"a batch of {len(guidance)} videos of {self.cfg.frames} frames at {self.cfg.size}x{self.cfg.size}",
                          len(guidance) * self.cfg.frames * (2 if guided else 1), self.cfg.size)
        motion = batch.get("motion")
        if motion is not None:
            motion = np.asarray(motion, dtype=np.float32).reshape(len(guidance), 2)
            motion = None if np.isnan(motion).all() else torch.from_numpy(motion)
        fps, noise = torch.from_numpy(np.asarray(batch["fps"], dtype=np.float32)), None
        if self.inversion is not None:
            noise = self._inverted_noise(steps or self.cfg.diffusion.steps).expand(len(guidance), -1, -1, -1, -1)
            fps = torch.full_like(fps, self.inversion.fps)
        video = cascade.decode(
            self.net,
            self.cfg,
            torch.from_numpy(batch["image_embeds"]),
            fps,
            _seeds(batch),
            steps=steps,
            guidance=torch.from_numpy(guidance),
            motion=motion,
            progress=self._progress,
            noise=noise,
            text=_text(batch, "text"),
            negative=_text(batch, "neg"),
            vae=self.vae,
        )
        return {"video": to_uint8(video)}


class InterpolationRunner(StageRunner):
    """↑F: keyframes at fps -> (F−1)·skip+1 frames at fps·skip (``video_fps``)."""

    stage = "interpolation"
    drops = ("image_embeds", *TEXT_COLUMNS)

    def run(self, batch, steps):
        b, _, f, h, w = batch["video"].shape
        frames = (f - 1) * self.cfg.skip + 1
        self.check_memory(f"a batch of {b} videos of {frames} frames at {w}x{h}", b * frames, h)
        dtype = next(self.net.parameters()).dtype
        video, out_fps = cascade.interpolate(
            self.net,
            self.cfg,
            from_uint8(batch["video"], dtype),
            torch.from_numpy(batch["image_embeds"]),
            torch.from_numpy(np.asarray(batch["fps"], dtype=np.float32)),
            _seeds(batch),
            steps=steps,
            progress=self._progress,
            text=_text(batch, "text"),
        )
        return {"video": to_uint8(video), "video_fps": out_fps.numpy().astype(np.float32)}


class SuperResolutionRunner(StageRunner):
    """SR_l^t (``sr_low``: spatiotemporal, every frame at once) or SR_h (``sr_high``: frame by frame, with the
    same noise for every frame): low-resolution frames -> high-resolution frames."""

    RESOLVE = {"sr_low": cascade.super_resolve_video, "sr_high": cascade.super_resolve_frames}

    def __init__(self, stage: str, **kwargs) -> None:
        if stage not in self.RESOLVE:
            raise ValueError(f"a super-resolution stage is one of {', '.join(self.RESOLVE)}, got {stage!r}")
        self.stage = stage
        super().__init__(**kwargs)

    def run(self, batch, steps):
        dtype = next(self.net.parameters()).dtype
        net, cfg = self.fitted(*batch["video"].shape[:3])
        video = self.RESOLVE[self.stage](
            net, cfg, from_uint8(batch["video"], dtype), _seeds(batch), steps=steps, progress=self._progress
        )
        return {"video": to_uint8(video)}

    def fitted(self, b: int, c: int, f: int) -> tuple[torch.nn.Module, object]:
        """(network, config) for ``b`` videos of ``f`` frames on this device's free memory: SR_l^t over
        overlapping frame windows (:class:`stages.memory.FrameWindows`) when the whole videos do not fit,
        SR_h with no more frames per pass than fit. Unchanged where everything fits."""
        size = self.cfg.out_size
        budget = HEADROOM * free_bytes(self.device)
        if self.stage == "sr_high":
            what = f"{self.cfg.frame_batch} frames at {size}x{size} per pass"
            if self.memory_needed(self.cfg.frame_batch, size) <= budget:
                return self.net, self.cfg
            n = largest_fitting(lambda n: self.memory_needed(n, size), self.cfg.frame_batch, budget)
            if not n:
                self.check_memory(what, 1, size)
            return self.net, dataclasses.replace(self.cfg, frame_batch=n)
        if self.memory_needed(b * f, size) <= budget:
            return self.net, self.cfg
        window = largest_fitting(lambda n: self.memory_needed(b * n, size), f, budget)
        if window <= WINDOW_OVERLAP:
            self.check_memory(f"a batch of {b} videos in windows of {WINDOW_OVERLAP + 1} frames at {size}x{size}",
                              b * (WINDOW_OVERLAP + 1), size)
        return FrameWindows(self.net, window, min(WINDOW_OVERLAP, window // 2)), self.cfg


RUNNER_OF: dict[str, Callable[..., StageRunner]] = {
    "clip": TextEncoderRunner,
    "prior": PriorRunner,
    "decoder": DecoderRunner,
    "interpolation": InterpolationRunner,
    "sr_low": functools.partial(SuperResolutionRunner, "sr_low"),
    "sr_high": functools.partial(SuperResolutionRunner, "sr_high"),
}
"""Stage name -> its runner's constructor (keywords ``checkpoint``, ``preset``, ``device``, ``progress``), in
cascade order."""

