"""The ``tuner`` deployment of ``POST /v1/edits``: Tune-A-Video's one-shot tuning of D^t on an uploaded clip,
the same run as ``mav tune`` (:func:`workflows.tune.run_tune`: the shared training loop on Ray Train, then
DDIM inversion), one tuning per replica at a time.

A tuning writes the clip and its tuned bundle under ``WORK/ID/`` (the app's ``work``); the ingress sends the
edit's rows through the stage deployments, the ``decoder`` deployment loading the tuned D^t from that bundle,
and removes ``WORK/ID/`` when the edit ends. The replica reports the tuning's phase and optimizer step to the
``jobs`` table as it goes (the step from the run's loss log, written at every log step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

from ray import serve

from stages.config import ConfigError, from_dict
from stages.errors import UserError
from stages.fsio import join, write_bytes_atomic

logger = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5                # how often the replica reads the loss log for the step reached


@dataclass(frozen=True, kw_only=True)
class TunerSettings:
    """The ``tuner`` deployment's ``user_config``: the Ray Train workers of one tuning."""

    workers: int = 1                # data-parallel workers (each sees the clip)
    gpus_per_worker: float = 0.0    # 0: CPU

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")


class TuneFailed(Exception):
    """A tuning could not run; the message says why (a clip or setting the tuning refused, or its error)."""


@serve.deployment(max_ongoing_requests=1, max_queued_requests=16, ray_actor_options={"num_cpus": 1})
class Tuner:
    """``tune(edit_id, clip, caption, options) -> {"bundle", "fps", "loss", "seconds", "parameters"}``.

    ``max_ongoing_requests`` stays 1: a replica runs one tuning at a time, and the ingress refuses an edit
    (503) when the ``jobs`` table counts as many tunings running as there are replicas.
    """

    def __init__(self, checkpoint: str | None, preset: str, work: str, store) -> None:
        self.checkpoint, self.preset, self.work, self.store = checkpoint, preset, work, store
        self.settings = TunerSettings()
        self.fresh_base: str | None = None  # a bundle of the preset's fresh weights, made at the first tuning

    def reconfigure(self, user_config: dict | None) -> None:
        self.settings = from_dict(TunerSettings, dict(user_config or {}), where="tuner.user_config")

    async def ready(self) -> dict:
        return {"stage": "tuner", "pid": os.getpid(), **dataclasses.asdict(self.settings)}

    def _base(self) -> str:
        """The bundle tuned from: the app's checkpoint, or the fresh weights its stage deployments build from
        the preset (``stages.cascade.build_stage`` is seeded: the same weights), saved once."""
        if self.checkpoint:
            return self.checkpoint
        if self.fresh_base is None:
            from stages.cascade import build_stage
            from stages.checkpoint import save_bundle
            from stages.config import STAGE_NAMES
            from workflows.presets import load_preset

            config = load_preset(self.preset)
            directory = tempfile.mkdtemp(prefix="mav-tuner-base-")
            save_bundle(directory, config, {name: build_stage(name, getattr(config, name)) for name in STAGE_NAMES})
            self.fresh_base = directory
        return self.fresh_base

    def __del__(self) -> None:
        if getattr(self, "fresh_base", None):
            shutil.rmtree(self.fresh_base, ignore_errors=True)

    async def tune(self, edit_id: str, clip: bytes, caption: str, options: dict) -> dict:
        """Tune D^t on ``clip`` (the file's bytes) with its ``caption`` into ``WORK/edit_id/tuned``;
        ``options``: :class:`workflows.tune.job.TuneOptions` fields (steps, fps, seed). Raises TuneFailed."""
        from workflows.tune.job import TuneOptions, run_tune

        directory = join(self.work, edit_id)
        source, tuned = join(directory, "source.mp4"), join(directory, "tuned")
        await self.store.edit_tuning.remote(edit_id, "preparing")
        try:
            opts = TuneOptions(**options, workers=self.settings.workers,
                               gpus_per_worker=self.settings.gpus_per_worker)
            await asyncio.to_thread(write_bytes_atomic, source, clip)
            base = await asyncio.to_thread(self._base)
        except (UserError, OSError) as e:
            raise TuneFailed(str(e)) from None
        reporter = asyncio.ensure_future(self._report(edit_id, tuned, opts.steps))
        try:
            settings = await asyncio.to_thread(run_tune, source, caption, tuned, opts, checkpoint=base,
                                               log=logger.info)
        except UserError as e:
            raise TuneFailed(str(e)) from None
        except Exception as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise TuneFailed(f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]) from None
        finally:
            reporter.cancel()
        loss = settings.loss if math.isfinite(settings.loss) else None
        await self.store.edit_tuning.remote(edit_id, "done", settings.steps, loss, settings.seconds)
        return {"bundle": tuned, "fps": settings.fps, "loss": loss, "seconds": settings.seconds,
                "parameters": len(settings.parameters)}

    async def _report(self, edit_id: str, tuned: str, steps: int) -> None:
        """The training's phase and step, from its loss log, to the job table as they change."""
        from workflows.train import read_metrics

        seen = None
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            try:
                rows = await asyncio.to_thread(read_metrics, tuned, "tune")
            except (OSError, ValueError, KeyError):  # not written yet, or being rewritten
                rows = []
            step = int(rows[-1]["step"]) if rows else 0
            loss = rows[-1]["loss"] if rows and math.isfinite(rows[-1]["loss"]) else None
            # The loop logs its last step, then saves D^t; run_tune then inverts the keyframes.
            state = ("inverting" if step >= steps else "training", step, loss)
            if state != seen:
                seen = state
                await self.store.edit_tuning.remote(edit_id, *state)
