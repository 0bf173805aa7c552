"""One runner per stage, the single shape every way of running the cascade uses.

A runner loads its network in ``__init__`` and maps a batch of rows, ``dict[str, np.ndarray]``, to a
batch with its stage's output columns added (and columns no later stage needs dropped). The in-process
pipeline chains them; the Ray batch job runs each as an actor pool; Serve wraps each in a deployment.

Row columns: ``prompt`` and ``negative_prompt`` (str), ``seed`` (int64), ``fps`` (int64, keyframe rate
D^t is conditioned on), ``steps`` (int64, 0 = each stage's preset value), ``guidance`` (float32, NaN =
the decoder's preset value), ``motion`` (float32 ``b 2``, optional: motion guidance (dy, dx) in frame sizes
per keyframe, NaN = none). Frames cross stages as uint8 ``b 3 f h w``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from stages import cascade
from stages.checkpoint import load_stage
from stages.config import STAGE_NAMES
from stages.inversion import invert_keyframes, load_inversion
from workflows import columns
from workflows.presets import DEFAULT_PRESET, load_preset
from workflows.video import from_uint8, to_uint8

StageProgress = Callable[[str, int, int], None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    ) -> None:
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"unknown stage {self.stage!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.cfg, self.net = load_network(self.stage, checkpoint=checkpoint, preset=preset, device=self.device)
        self.progress = progress

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


class PriorRunner(StageRunner):
    """P: (x_e, x̂) -> y_e."""

    stage = "prior"
    drops = ("text_embeds", "text_hidden", "text_mask", "neg_embeds", "neg_hidden", "neg_mask")

    def run(self, batch, steps):
        def part(prefix):
            return {
                "text_embeds": torch.from_numpy(batch[f"{prefix}_embeds"]).float(),
                "text_hidden": torch.from_numpy(batch[f"{prefix}_hidden"]).float(),
                "text_mask": torch.from_numpy(batch[f"{prefix}_mask"]),
            }

        y = cascade.generate_image_embeds(
            self.net, part("text"), part("neg"), _seeds(batch), steps=steps, progress=self._progress
        )
        return {"image_embeds": y.cpu().numpy().astype(np.float32)}


class DecoderRunner(StageRunner):
    """D^t: (y_e, fps) -> keyframes, uint8 ``b 3 frames size size``. A tuned bundle's D^t (``mav tune``) edits
    its source video: it starts from the source's DDIM-inverted noise at the source's fps (``inversion``;
    None: from the seeds' noise)."""

    stage = "decoder"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
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
        )
        return {"video": to_uint8(video)}


class InterpolationRunner(StageRunner):
    """↑F: keyframes at fps -> (F−1)·skip+1 frames at fps·skip (``video_fps``)."""

    stage = "interpolation"
    drops = ("image_embeds",)

    def run(self, batch, steps):
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
        video = self.RESOLVE[self.stage](
            self.net, self.cfg, from_uint8(batch["video"], dtype), _seeds(batch), steps=steps, progress=self._progress
        )
        return {"video": to_uint8(video)}


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

