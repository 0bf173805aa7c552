"""A training job: what to train, from what, into which bundle; checked, then run on Ray Train.

    job = TrainJob(stage="decoder", data=("s3://b/shapes",), output="s3://b/model", config=TrainConfig())
    run_training(job)              # on the connected Ray cluster (workflows.ray_cluster.init_ray)

Ray Train's run state (checkpoints with the optimizer and EMA, for ``resume`` and worker failures) lives
under ``OUTPUT/_train/STAGE`` (:func:`run_dir`), beside the loss log (``workflows.train.metrics``, :func:`read_metrics`).
"""

from __future__ import annotations

import os

import fsspec

from stages.checkpoint import CheckpointError, load_stage_config
from stages.config import ConfigError
from stages.fsio import is_local, join, read_yaml_mapping
from stages.training import TRAINING_STAGES, TrainConfig
from workflows.presets import load_preset
from workflows.train.data import arrow_fs, image_dataset, video_dataset
from workflows.train.loop import STILLS, train_loop, uses_stills
from workflows.train.spec import MAX_VIDEO_FRAMES, TRAIN_DIR, TrainJob, stage_train_config
from workflows.train.metrics import CSV_NAME, read_rows

def read_metrics(output: str, stage: str) -> list[dict]:
    """The loss log of ``stage``'s training run in the bundle ``output``, as rows of floats."""
    return [{k: float(v) for k, v in row.items()} for row in read_rows(join(output, TRAIN_DIR, stage, CSV_NAME))]


def load_train_config(path: str | None, stage: str) -> TrainConfig:
    """``stage``'s TrainConfig from a YAML of its fields, with per-stage fields under ``stages:``
    (:func:`workflows.train.spec.stage_train_config`; unknown keys rejected by name); None: the defaults."""
    if not path:
        return TrainConfig()
    return stage_train_config(read_yaml_mapping(path, ConfigError), stage, path)


def cpus_needed(workers: int, cpus_per_worker: float) -> float:
    """Logical CPUs a local Ray instance needs for the workers plus Ray Data's readers beside them."""
    return workers * cpus_per_worker + 2


def has_run(job: TrainJob) -> bool:
    """Whether ``job``'s run directory holds a checkpoint to resume from."""
    fs, path = fsspec.core.url_to_fs(job.run_dir)
    try:
        return any(os.path.basename(p.rstrip("/")).startswith("checkpoint_") for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def _require_stage(url: str, stage: str, message: str) -> None:
    try:
        load_stage_config(url, stage)
    except CheckpointError as e:
        raise ConfigError(f"{message} ({e})") from None


def check_job(job: TrainJob, *, resume: bool) -> None:
    """Raise ConfigError for a job that cannot start: unknown stage, temporal_only where it does not apply,
    missing CLIP or --init stage, a run that exists without ``resume`` or ``resume`` without one."""
    spec = job.spec
    if job.config.temporal_only and not spec.temporal_only_allowed:
        allowed = ", ".join(name for name, s in TRAINING_STAGES.items() if s.temporal_only_allowed)
        raise ConfigError(f"temporal_only applies to {allowed}, not {job.stage}")
    if job.vae and job.stage != "decoder":
        raise ConfigError(f"--vae applies to decoder, not {job.stage} (decoder-video takes the VAE of --init's D^t; "
                          "↑F reads frames)")
    if job.vae:
        job.preset_config()  # a VAE that cannot be read, or whose latents do not fit the preset's D^t
    if job.config.joint_images and not spec.joint:
        allowed = ", ".join(name for name, s in TRAINING_STAGES.items() if s.joint)
        raise ConfigError(f"joint_images (still images beside every clip) applies to {allowed}, not {job.stage}")
    if spec.needs_clip:
        _require_stage(job.clip or job.output, "clip", f"{job.stage} needs a trained CLIP: train the clip stage "
                       f"into --output first or pass --clip BUNDLE")
    if spec.init is not None:
        if not job.init:
            raise ConfigError(f"{job.stage} starts from a trained {spec.init} stage: pass --init BUNDLE")
        _require_stage(job.init, spec.init, f"--init {job.init} has no usable {spec.init} stage")
    if has_run(job) and not resume:
        raise ConfigError(f"{job.run_dir} already holds a {job.stage} training run: pass --resume to continue it, "
                          f"or choose another --output")
    if resume and not has_run(job):
        raise ConfigError(f"nothing to resume: no {job.stage} training run under {job.run_dir}")


def _datasets(job: TrainJob) -> dict:
    """Ray Train's data sets: ``train`` (the stage's data) and, for joint training, the still images."""
    spec = job.spec
    size = spec.data_size(load_preset(job.preset))
    if spec.video:
        ds = {"train": video_dataset(list(job.data), size, max_frames=MAX_VIDEO_FRAMES)}
    else:
        ds = {"train": image_dataset(list(job.data), size)}
    if uses_stills(job):
        ds[STILLS] = image_dataset(list(job.data), size)
    return {name: d.materialize() if job.config.cache_data else d for name, d in ds.items()}


def _storage(job: TrainJob):
    """(storage_path, storage_filesystem) for Ray Train, through fsspec (same credentials/endpoints)."""
    url = join(job.output, TRAIN_DIR)
    if is_local(url):
        path = fsspec.core.url_to_fs(url)[1]
        os.makedirs(path, exist_ok=True)
        return path, None
    fs, path = arrow_fs(url)
    return path, fs


def run_training(job: TrainJob, *, resume: bool = False, datasets: dict | None = None) -> dict:
    """Train ``job.stage`` on the connected Ray cluster; returns the final metrics. ``datasets``: Ray Data
    sets to train on in place of those read from ``job.data`` (``train``: one clip's rows, for mav tune).

    Raises ConfigError / CheckpointError / DataError for unusable arguments before training starts.
    """
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_job(job, resume=resume)
    DataContext.get_current().enable_progress_bars = False
    datasets = datasets if datasets is not None else _datasets(job)
    storage_path, storage_fs = _storage(job)
    use_gpu = job.gpus_per_worker > 0
    resources = {"CPU": job.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = job.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
        run_config=RunConfig(
            name=job.stage,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})
