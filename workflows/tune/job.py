"""A tuning run: the source clip's keyframes and condition, D^t fine-tuned on them on Ray Train, the tuned
bundle written.

    settings = run_tune("clip.mp4", "a red circle on a white background", "tuned/", TuneOptions())

on the connected Ray cluster (``workflows.ray_cluster.init_ray``). The bundle: ``decoder/`` from the shared
training loop, a reference to the base bundle for every other stage (``stages.checkpoint.save_reference``),
``inversion.safetensors`` (``stages.inversion``) and ``tune.yaml`` (:class:`TuneSettings`), written last.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from stages import cascade
from stages.checkpoint import load_bundle_config, load_stage, save_reference, save_stage, stage_source
from stages.config import STAGE_NAMES, ConfigError, dump_yaml, load_yaml
from stages.fsio import absolute, join, read_bytes, write_bytes_atomic
from stages.inversion import INVERSION_FILE, invert_keyframes, save_inversion
from stages.training import TrainConfig
from stages.tuning import TRAINABLE, start_tuning, trainable_parameters, tuning_stage
from workflows.outputs import check_writable
from workflows.presets import model_path
from workflows.train import TrainJob, run_training
from workflows.train.spec import TRAIN_DIR
from workflows.tune.source import TuneError, read_clip, sample_keyframes
from workflows.video import from_uint8

SETTINGS_FILE = "tune.yaml"
CONDITIONS = ("frames", "caption")  # the source condition y_e: CLIP image embedding of the keyframes, or P(caption)
ROWS_PER_WORKER = 16  # copies of the one clip in each worker's shard: steps per pass over the data


@dataclass(frozen=True, kw_only=True)
class TuneOptions:
    steps: int = 300                # optimizer steps; 0: no tuning (the base D^t, its source inverted)
    lr: float = 1e-4
    train: str = "queries"          # which parameters of D^t (stages.tuning.TRAINABLE)
    fps: int = 5                    # keyframe rate asked for: the clip is sampled every round(clip fps / fps) frames
    condition: str = "frames"       # the source condition (CONDITIONS)
    seed: int = 0                   # training noise and timesteps; P's sample for the caption condition
    workers: int = 1                # Ray Train workers (data parallel; each sees the clip)
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise TuneError(f"--steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise TuneError(f"--lr must be > 0, got {self.lr}")
        if self.train not in TRAINABLE:
            raise TuneError(f"--train must be one of {', '.join(TRAINABLE)}, got {self.train!r}")
        if not 1 <= self.fps <= 30:
            raise TuneError(f"--fps must be in 1..30, got {self.fps}")
        if self.condition not in CONDITIONS:
            raise TuneError(f"--condition must be one of {', '.join(CONDITIONS)}, got {self.condition!r}")
        if self.workers < 1:
            raise TuneError(f"--workers must be >= 1, got {self.workers}")


@dataclass(frozen=True, kw_only=True)
class TuneSettings:
    """What a tuned bundle was made from and how (``tune.yaml``)."""

    source: str                     # the clip's URL
    caption: str
    base: str                       # the bundle tuned from; every stage but D^t is its
    condition: str                  # the source condition y_e (CONDITIONS)
    frames: tuple[int, ...]         # indices of the clip's frames D^t was tuned on
    fps: float                      # their frame rate, D^t's fps condition
    steps: int
    lr: float
    train: str
    parameters: tuple[str, ...]     # the parameters trained
    seed: int
    workers: int
    inversion_steps: int            # DDIM steps of inversion.safetensors
    loss: float                     # training loss at the last log step
    seconds: float                  # wall time of the tuning (training and inversion)


def load_settings(url: str) -> TuneSettings:
    """The settings of tuned bundle ``url``; TuneError if it is not one."""
    try:
        text = read_bytes(join(url, SETTINGS_FILE)).decode()
    except FileNotFoundError:
        raise TuneError(f"{url} is not a tuned bundle (no {SETTINGS_FILE}): make one with mav tune") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TuneError(f"cannot read {join(url, SETTINGS_FILE)}: {e}") from None
    try:
        return load_yaml(TuneSettings, text, SETTINGS_FILE)
    except ConfigError as e:
        raise TuneError(f"{url}: {e}") from None


@dataclass(frozen=True)
class TuneJob(TrainJob):
    """The shared training loop's job for one tuning run: D^t of ``init`` with sparse-causal attention, under
    the source condition y_e ``image_embeds``, training the parameters ``train`` names."""

    image_embeds: tuple[float, ...] = ()
    train: str = "queries"

    @property
    def spec(self):
        return tuning_stage(torch.tensor(self.image_embeds))

    def initial_network(self):
        return start_tuning(*load_stage(self.init, "decoder"))

    def trainable_parameters(self, net) -> set[str]:
        return set(trainable_parameters(net, self.train))


def source_condition(base: str, condition: str, caption: str, keyframes: np.ndarray, seed: int) -> torch.Tensor:
    """y_e ``1 d`` of the source: the mean of the keyframes' CLIP image embeddings (as D^t is trained on a
    frame's), or P's sample for the caption through CLIP_text."""
    _, clip = load_stage(base, "clip")
    with torch.no_grad():
        if condition == "frames":
            frames = from_uint8(keyframes[None])[0].transpose(0, 1)  # f 3 h w
            y = F.normalize(clip.encode_image(frames).float(), dim=-1).mean(0, keepdim=True)
            return F.normalize(y, dim=-1)
        _, prior = load_stage(base, "prior")
        text, empty = cascade.encode_text(clip, [caption]), cascade.encode_text(clip, [""])
        return cascade.generate_image_embeds(prior, text, empty, [seed]).float()


def _holds_anything(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return any(fs.exists(f"{path.rstrip('/')}/{name}") for name in (SETTINGS_FILE, INVERSION_FILE, "decoder", TRAIN_DIR))


def run_tune(video: str, caption: str, output: str, options: TuneOptions, *, checkpoint: str | None = None,
             log: Callable[[str], None] = print, connect: Callable[[], object] | None = None) -> TuneSettings:
    """Tune D^t of ``checkpoint`` (default: the shipped model) on the clip at ``video`` with its ``caption``,
    into the bundle ``output``, on the connected Ray cluster, or the one ``connect`` starts or joins once the
    inputs are checked. Bad inputs raise a UserError before anything is written."""
    start = time.perf_counter()
    if not caption.strip():
        raise TuneError("--caption is empty: say what the clip shows")
    base = absolute(checkpoint or model_path())
    load_bundle_config(base)
    cfg, net = start_tuning(*load_stage(base, "decoder"))
    if _holds_anything(output):
        raise TuneError(f"{output} already holds a tuned bundle or part of one: choose another --output")
    clip_frames, clip_fps = read_clip(video)
    keyframes, fps, indices = sample_keyframes(video, clip_frames, clip_fps, cfg.frames, cfg.size, options.fps)
    try:
        check_writable(output)
    except Exception as e:  # any filesystem's refusal: permissions, missing bucket, credentials
        raise TuneError(f"cannot write to {output}: {e}") from None
    y = source_condition(base, options.condition, caption, keyframes, options.seed)
    names = trainable_parameters(net, options.train) if options.steps else []
    count = sum(p.numel() for n, p in net.named_parameters() if n in set(names))
    log(f"tuning D^t on {len(indices)} keyframes of {video} (frames {indices[0]}..{indices[-1]} every "
        f"{indices[1] - indices[0] if len(indices) > 1 else 1}, {fps:g} fps, {cfg.size}x{cfg.size}) under the "
        f"{options.condition} condition; " + (f"training {options.train}: {len(names)} tensors, {count} weights"
                                             if options.steps else "no training (--steps 0): inversion only"))
    for name in names:
        log(f"  {name}")

    if options.steps:
        metrics = _train(output, base, cfg, keyframes, fps, y, options, connect)
    else:  # inversion only: the base D^t with sparse-causal attention and DDIM sampling, as start_tuning made it
        save_stage(output, "decoder", cfg, net)
        metrics = {}

    tuned_cfg, tuned = load_stage(output, "decoder")
    with torch.no_grad():
        inversion = invert_keyframes(tuned, tuned_cfg, from_uint8(keyframes[None]), y, fps)
    save_inversion(output, inversion)
    for stage in STAGE_NAMES:
        if stage != "decoder":
            save_reference(output, stage, stage_source(base, stage))
    settings = TuneSettings(source=absolute(video), caption=caption, base=base, condition=options.condition,
                            frames=tuple(indices), fps=fps, steps=options.steps, lr=options.lr, train=options.train,
                            parameters=tuple(names), seed=options.seed, workers=options.workers,
                            inversion_steps=inversion.steps, loss=float(metrics.get("loss", float("nan"))),
                            seconds=round(time.perf_counter() - start, 1))
    write_bytes_atomic(join(output, SETTINGS_FILE), dump_yaml(settings).encode())
    return settings


def _train(output: str, base: str, cfg, keyframes: np.ndarray, fps: float, y: torch.Tensor, options: TuneOptions,
           connect: Callable[[], object] | None) -> dict:
    """D^t of ``base`` tuned on the keyframes under y_e ``y`` on Ray Train into ``output/decoder``; the final
    metrics."""
    if connect is not None:
        connect()
    job = TuneJob(stage="tune", data=(), output=output, init=base,
                  config=TrainConfig(batch_size=1, lr=options.lr, max_steps=options.steps, ema_decay=0.0,
                                     frames=cfg.frames, log_every=max(1, options.steps // 10),
                                     checkpoint_every=options.steps, seed=options.seed, cache_data=True),
                  workers=options.workers, gpus_per_worker=options.gpus_per_worker,
                  image_embeds=tuple(float(v) for v in y[0]), train=options.train)
    metrics = run_training(job, datasets={"train": _clip_rows(keyframes, fps, options.workers)})
    fs, run_dir = fsspec.core.url_to_fs(job.run_dir)
    for checkpoint in fs.glob(f"{run_dir}/checkpoint_*"):  # a run to resume from: nothing resumes a tuning
        fs.rm(checkpoint, recursive=True)
    return metrics


def _clip_rows(keyframes: np.ndarray, fps: float, workers: int):
    """The one clip as rows of a video data set (``workflows.train.data.video_dataset``'s columns), exactly
    D^t's frame count long, so the loop's clip sampling takes all of it at its own fps."""
    import ray.data

    row = {"video": keyframes, "length": keyframes.shape[1], "fps": float(fps), "ok": True}
    return ray.data.from_items([dict(row) for _ in range(ROWS_PER_WORKER * workers)]).materialize()

