"""``mav train``: distributed training of every stage on Ray Train, one shared loop.

    mav train clip          --data s3://b/shapes --output s3://b/model --workers 2
    mav train prior         --data s3://b/shapes --output s3://b/model --workers 2
    mav train decoder       --data s3://b/shapes --output s3://b/model
    mav train sr-low        --data s3://b/shapes --output s3://b/model
    mav train sr-high       --data s3://b/shapes --output s3://b/model
    mav train decoder-video --data s3://b/shapes --output s3://b/model --init s3://b/model
    mav train sr-low-video  --data s3://b/shapes --output s3://b/model --init s3://b/model
    mav train interpolation --data s3://b/shapes --output s3://b/model --init s3://b/model
    mav generate "a red circle" --checkpoint s3://b/model --out circle.mp4

``--output`` is a checkpoint bundle: each stage writes its directory there (``clip/``, ``prior/``,
``decoder/`` ...), in the format every command loads; stages that need CLIP (prior, decoder and the
video stages) read it from ``--clip`` or else from the bundle itself. Ray Train's own run state
(checkpoints with the optimizer and EMA, for ``--resume`` and worker failures) lives under
``--output/_train/<stage>``; the loss log is ``--output/_train/<stage>/metrics.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import fsspec
import numpy as np
import safetensors.torch
import torch

from stages import cascade, training
from stages.checkpoint import CheckpointError, absolute, join, load_stage, save_stage, write_bytes_atomic
from stages.config import FRAME_NOISE_FIELDS, ConfigError, DiffusionConfig, load_yaml
from stages.temporal import temporal_parameter_names
from stages.training import STAGE_OF, TRAIN_STAGES, VIDEO_STAGES, TrainConfig
from workflows.presets import DEFAULT_PRESET, load_preset
from workflows.synth import SPEED

TRAIN_DIR = "_train"
STATE_WEIGHTS = "train_state.safetensors"
STATE_META = "train_state.json"


@dataclass(frozen=True)
class TrainJob:
    stage: str
    data: tuple[str, ...]
    output: str
    config: TrainConfig
    preset: str = DEFAULT_PRESET
    init: str | None = None
    clip: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 3

    def __post_init__(self) -> None:
        # Ray Train's workers run in a directory of their own: a relative local path would name another
        # file there (a preset not found, a checkpoint written where nobody looks), so each is made absolute.
        object.__setattr__(self, "data", tuple(absolute(url) for url in self.data))
        for name in ("output", "init", "clip"):
            if getattr(self, name):
                object.__setattr__(self, name, absolute(getattr(self, name)))
        if self.preset.endswith((".yaml", ".yml")):
            object.__setattr__(self, "preset", absolute(self.preset))


def needs_clip(stage: str) -> bool:
    return stage in ("prior", "decoder", "decoder-video", "interpolation")


def run_dir(job: TrainJob) -> str:
    return join(job.output, TRAIN_DIR, job.stage)


# -- the network a training stage starts from ------------------------------------------------------

def initial_network(job: TrainJob):
    """(stage config, network) a fresh run starts from: built from the preset, or from ``--init``."""
    produced, init_stage = STAGE_OF[job.stage]
    preset = load_preset(job.preset)
    if init_stage is None:
        cfg = getattr(preset, produced)
        if job.stage in ("decoder", "sr-low"):
            # Image training: the 2D network, making independent frames; inflation and the correlation of
            # the frames' noise come with video fine-tuning.
            independent = {k: getattr(DiffusionConfig(), k) for k in FRAME_NOISE_FIELDS}
            cfg = replace(cfg, unet=replace(cfg.unet, temporal=False, temporal_fps=False),
                          diffusion=replace(cfg.diffusion, **independent))
        return cfg, cascade.build_stage(produced, cfg)
    if not job.init:
        raise ConfigError(f"{job.stage} starts from a trained {init_stage} stage: pass --init BUNDLE")
    init_cfg, net = load_stage(job.init, init_stage)
    target = getattr(preset, produced)
    if not net.cfg.temporal:
        net = training.inflate_network(net, kernel=target.unet.temporal_kernel, heads=target.unet.temporal_heads,
                                       fps=target.unet.temporal_fps)
    if job.stage == "interpolation":
        from stages.unet import widen_input

        net = widen_input(net, 4)
        cfg = replace(target, image_embed_dim=init_cfg.image_embed_dim, context_tokens=init_cfg.context_tokens,
                      unet=net.cfg)
        return cfg, net
    diffusion = replace(init_cfg.diffusion, **{k: getattr(target.diffusion, k) for k in FRAME_NOISE_FIELDS})
    return replace(init_cfg, unet=net.cfg, diffusion=diffusion), net


def _load_state(directory: str, net, ema, opt) -> int:
    """Restore raw weights, EMA and optimizer from a training checkpoint; returns its step."""
    state = safetensors.torch.load(_read(join(directory, STATE_WEIGHTS)))
    meta = json.loads(_read(join(directory, STATE_META)).decode())
    net.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    ema.shadow = {k[len("ema."):]: v.float() for k, v in state.items() if k.startswith("ema.")}
    training.optimizer_from_tensors(opt, {k[len("optim."):]: v for k, v in state.items() if k.startswith("optim.")},
                                    meta["optimizer"])
    return int(meta["step"])


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def _save_checkpoint(directory: str, produced: str, cfg, net, ema, opt, step: int, metrics: dict) -> None:
    """The stage directory (EMA weights: what inference loads) plus the training state, in ``directory``."""
    ema_net = _ema_copy(net, ema)
    save_stage(directory, produced, cfg, ema_net)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v.cpu().contiguous().clone() for k, v in ema.shadow.items()})
    opt_tensors, opt_meta = training.optimizer_to_tensors(opt)
    tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
    write_bytes_atomic(join(directory, STATE_WEIGHTS), safetensors.torch.save(tensors))
    meta = {"step": step, "optimizer": opt_meta, "metrics": metrics}
    write_bytes_atomic(join(directory, STATE_META), json.dumps(meta).encode())


def _ema_copy(net, ema):
    import copy

    out = copy.deepcopy(net)
    out.load_state_dict({k: v.to(dtype=out.state_dict()[k].dtype) for k, v in ema.shadow.items()})
    return out.eval()


# -- the loop every worker runs ---------------------------------------------------------------------

def _batches(shard, batch_size: int, seed: int):
    """Endless numpy batches from this worker's data shard (epoch after epoch)."""
    epoch = 0
    while True:
        n = 0
        # Full batches only: every step sees batch_size items (contrastive losses depend on it) and every
        # worker takes the same number of steps per epoch.
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=batch_size * 4, local_shuffle_seed=seed + epoch):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"this worker's data shard holds fewer than batch_size={batch_size} items")
        epoch += 1


def _to_float(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32) / 127.5 - 1


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job: TrainJob = loop_config["job"]
    cfg_t = job.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    device = ray.train.torch.get_device()
    produced, _ = STAGE_OF[job.stage]
    gen = torch.Generator().manual_seed(cfg_t.seed * 1000 + rank)

    checkpoint = ray.train.get_checkpoint()
    step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            stage_cfg, net = load_stage(d, produced)
            net = net.to(device).train()
            ema = training.EMA(net, cfg_t.ema_decay)
            params = _trainable(net, job)
            opt = torch.optim.AdamW(_param_groups(net, job), lr=cfg_t.lr, weight_decay=cfg_t.weight_decay)
            lr_scales = [g["lr_scale"] for g in opt.param_groups]
            step = _load_state(d, net, ema, opt)
    else:
        stage_cfg, net = initial_network(job)
        net = net.to(device).train()
        ema = training.EMA(net, cfg_t.ema_decay)
        params = _trainable(net, job)
        opt = torch.optim.AdamW(_param_groups(net, job), lr=cfg_t.lr, weight_decay=cfg_t.weight_decay)
        lr_scales = [g["lr_scale"] for g in opt.param_groups]
    resumed_from = step
    if cfg_t.gradient_checkpointing and hasattr(net, "unet"):
        net.unet.enable_gradient_checkpointing()
    clip = None
    if needs_clip(job.stage):
        _, clip = load_stage(job.clip or job.output, "clip", device=device)
        clip.requires_grad_(False)
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else net

    shard = ray.train.get_dataset_shard("train")
    batches = _batches(shard, cfg_t.batch_size, cfg_t.seed * 7919 + rank)
    log: list[dict] = _read_log(job) if rank == 0 and resumed_from else []
    log = [r for r in log if int(r["step"]) <= resumed_from]
    skipped_total = 0
    seen_total = 0
    window_start = time.perf_counter()
    window_samples = 0
    window_loss: list[float] = []
    last_loss = float("nan")
    while step < cfg_t.max_steps:
        batch = next(batches)
        ok = np.asarray(batch["ok"], dtype=bool)
        skipped = int((~ok).sum())
        counts = torch.tensor([skipped, int(ok.sum())], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        skipped_total += int(counts[0])
        seen_total += int(counts[1])
        if counts[1] == 0:  # no worker has a usable item: every worker skips this step together
            continue
        for g, scale in zip(opt.param_groups, lr_scales):
            g["lr"] = training.lr_at(step, cfg_t) * scale
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg_t.bf16):
            if ok.any():
                loss = _loss(job, stage_cfg, model, clip, batch, ok, device, gen, step)
            else:
                # This worker's batch is all corrupt while others' are not: it still takes part in the
                # step (DDP's collectives must match across workers), contributing a zero gradient.
                loss = _zero_loss(model, job, stage_cfg, batch, device, gen, step, clip)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg_t.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg_t.grad_clip)
        opt.step()
        ema.update(net, step)
        step += 1
        window_samples += int(ok.sum()) * world
        last_loss = float(loss.detach())
        if world > 1:
            t = torch.tensor([last_loss], dtype=torch.float64)
            dist.all_reduce(t)
            last_loss = float(t) / world
        window_loss.append(last_loss)
        at_log = step % cfg_t.log_every == 0 or step == cfg_t.max_steps
        at_ckpt = step % cfg_t.checkpoint_every == 0 or step == cfg_t.max_steps
        metrics = {"step": step, "loss": last_loss, "lr": opt.param_groups[0]["lr"],
                   "skipped_items": skipped_total, "resumed_from": resumed_from}
        if at_log:
            # The logged loss is the mean over the steps since the last log line (less noisy than one step).
            elapsed = time.perf_counter() - window_start
            metrics["loss"] = float(np.mean(window_loss))
            metrics["samples_per_s"] = window_samples / max(elapsed, 1e-9)
            window_start, window_samples, window_loss = time.perf_counter(), 0, []
            if rank == 0:
                log.append({k: metrics[k] for k in ("step", "loss", "lr", "samples_per_s", "skipped_items")})
                _write_log(job, log)
                print(f"[{job.stage}] step {step}/{cfg_t.max_steps}  loss {metrics['loss']:.4f}  "
                      f"lr {metrics['lr']:.2e}  {metrics['samples_per_s']:.1f} samples/s  "
                      f"skipped {skipped_total}", flush=True)
        if at_ckpt:
            if step == cfg_t.max_steps:
                metrics["probe"] = training.probe(produced, _ema_copy(net, ema))
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    _save_checkpoint(d, produced, stage_cfg, net, ema, opt, step, metrics)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
    if rank == 0:
        save_stage(job.output, produced, stage_cfg, _ema_copy(net, ema))


def _trainable(net, job: TrainJob) -> list:
    if job.config.temporal_only:
        if job.stage not in ("decoder-video", "sr-low-video"):
            raise ConfigError("temporal_only applies to decoder-video and sr-low-video")
        training.freeze_all_but_temporal(net)
    return [p for p in net.parameters() if p.requires_grad]


def _param_groups(net, job: TrainJob) -> list[dict]:
    """The trainable parameters, the video stages' temporal layers in a group of their own whose learning
    rate is ``temporal_lr_scale`` times the rest (they start at identity; the spatial layers are trained)."""
    temporal = set(temporal_parameter_names(net)) if job.stage in VIDEO_STAGES else set()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n not in temporal], "lr_scale": 1.0},
              {"params": [p for n, p in named if n in temporal], "lr_scale": job.config.temporal_lr_scale}]
    return [g for g in groups if g["params"]]


def _zero_loss(model, job, stage_cfg, batch, device, gen, step, clip) -> torch.Tensor:
    """A loss of exactly zero computed through the network's forward pass on the (unusable) batch."""
    ok = np.ones(len(batch["ok"]), dtype=bool)
    batch = dict(batch)
    if "length" in batch:  # undecodable videos are all-zero arrays: give them a usable length and fps
        batch["length"] = np.full(len(ok), batch["video"].shape[2])
        batch["fps"] = np.full(len(ok), 30.0)
    return _loss(job, stage_cfg, model, clip, batch, ok, device, gen, step) * 0.0


def _loss(job: TrainJob, stage_cfg, model, clip, batch, ok, device, gen, step) -> torch.Tensor:
    cfg_t = job.config
    stage = job.stage
    net = model.module if hasattr(model, "module") else model
    diffusion = stage_cfg.diffusion if hasattr(stage_cfg, "diffusion") else None
    snr = cfg_t.min_snr_gamma
    if stage in ("clip", "prior", "decoder", "sr-low", "sr-high"):
        images = _to_float(batch["image"][ok], device)
        if stage == "clip":
            tokens, _ = net.tokenize([str(c) for c in batch["caption"][ok]])
            return training.clip_loss(model, training.downsample(images, net.model.visual.image_size[0]
                                                                 if isinstance(net.model.visual.image_size, tuple)
                                                                 else net.model.visual.image_size),
                                      tokens.to(device))
        if stage == "prior":
            return training.prior_loss(model, clip, images, [str(c) for c in batch["caption"][ok]], diffusion, gen, snr)
        if stage == "decoder":
            x = training.downsample(images, stage_cfg.size)[:, :, None]
            fps = torch.zeros(len(x), device=device)
            return training.decoder_loss(model, clip, x, fps, diffusion, gen, snr)
        x = training.downsample(images, stage_cfg.out_size)[:, :, None]
        return training.sr_loss(model, stage_cfg.in_size, x, cfg_t.noise_aug_max, diffusion, gen, snr)
    # video stages: sample clips at fps from the schedule
    progress = step / max(1, cfg_t.max_steps)
    videos = batch["video"][ok]
    fps_target = training.sample_fps(progress, len(videos), cfg_t, gen)
    clips, fps = [], []
    for v, n, src, f in zip(videos, batch["length"][ok], batch["fps"][ok], fps_target.tolist()):
        c, actual = training.sample_clip(torch.from_numpy(v), int(n), float(src), f, cfg_t.frames, gen)
        clips.append(c)
        fps.append(actual)
    x = torch.stack(clips).to(device=device, dtype=torch.float32) / 127.5 - 1
    size = stage_cfg.out_size if stage == "sr-low-video" else _decoder_size(job)
    if x.shape[-1] != size:
        b, f = x.shape[0], x.shape[2]
        frames = training.downsample(x.transpose(1, 2).reshape(b * f, 3, x.shape[-2], x.shape[-1]), size)
        x = frames.reshape(b, f, 3, size, size).transpose(1, 2)
    fps_t = torch.tensor(fps, device=device, dtype=torch.float32)
    if stage == "decoder-video":
        return training.decoder_loss(model, clip, x, fps_t, diffusion, gen, snr)
    if stage == "sr-low-video":
        return training.sr_loss(model, stage_cfg.in_size, x, cfg_t.noise_aug_max, diffusion, gen, snr)
    known = torch.stack([training.interpolation_mask(x.shape[2], cfg_t, gen) for _ in range(len(x))]).to(device)
    return training.interpolation_loss(model, clip, x, fps_t, known, diffusion, gen, snr)


def _decoder_size(job: TrainJob) -> int:
    return load_preset(job.preset).decoder.size


def _log_url(job: TrainJob) -> str:
    return join(run_dir(job), "metrics.csv")


def _write_log(job: TrainJob, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "samples_per_s", "skipped_items"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(_log_url(job), buf.getvalue().encode())


def _read_log(job: TrainJob) -> list[dict]:
    try:
        with fsspec.open(_log_url(job), "r") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def read_metrics(output: str, stage: str) -> list[dict]:
    """The loss log of a training run, as rows of floats."""
    with fsspec.open(join(output, TRAIN_DIR, stage, "metrics.csv"), "r") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# -- the driver -----------------------------------------------------------------------------------

def _data_size(job: TrainJob, preset) -> tuple[str, int]:
    if job.stage in VIDEO_STAGES:
        size = preset.sr_low.out_size if job.stage == "sr-low-video" else preset.decoder.size
        return "video", size
    if job.stage == "clip":
        return "image", preset.clip.image_size if preset.clip.arch == "custom" else 224
    if job.stage == "prior":
        return "image", preset.clip.image_size if preset.clip.arch == "custom" else 224
    if job.stage == "decoder":
        return "image", preset.decoder.size
    if job.stage == "sr-low":
        return "image", preset.sr_low.out_size
    return "image", preset.sr_high.out_size


def _storage(job: TrainJob):
    """(storage_path, storage_filesystem) for Ray Train, through fsspec (same credentials/endpoints)."""
    import pyarrow.fs as pafs

    fs, path = fsspec.core.url_to_fs(join(job.output, TRAIN_DIR))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        return os.path.abspath(path), None
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def has_run(job: TrainJob) -> bool:
    fs, path = fsspec.core.url_to_fs(run_dir(job))
    try:
        return any(os.path.basename(p.rstrip("/")).startswith("checkpoint_") for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def run_training(job: TrainJob, *, resume: bool = False) -> dict:
    """Train ``job.stage`` on the connected Ray cluster; returns the final metrics.

    Raises ConfigError / CheckpointError / DataError for unusable arguments before training starts.
    """
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workflows.train_data import image_dataset, video_dataset

    if job.stage not in TRAIN_STAGES:
        raise ConfigError(f"unknown stage {job.stage!r}; expected one of {', '.join(TRAIN_STAGES)}")
    preset = load_preset(job.preset)
    if needs_clip(job.stage):
        load_stage_config_or_fail(job.clip or job.output, "clip", f"{job.stage} needs a trained CLIP: train the clip "
                                  f"stage into --output first or pass --clip BUNDLE")
    if STAGE_OF[job.stage][1] is not None:
        if not job.init:
            raise ConfigError(f"{job.stage} starts from a trained {STAGE_OF[job.stage][1]} stage: pass --init BUNDLE")
        load_stage_config_or_fail(job.init, STAGE_OF[job.stage][1], f"--init {job.init} has no usable "
                                  f"{STAGE_OF[job.stage][1]} stage")
    if has_run(job) and not resume:
        raise ConfigError(f"{run_dir(job)} already holds a {job.stage} training run: pass --resume to continue it, "
                          f"or choose another --output")
    if resume and not has_run(job):
        raise ConfigError(f"nothing to resume: no {job.stage} training run under {run_dir(job)}")
    DataContext.get_current().enable_progress_bars = False
    kind, size = _data_size(job, preset)
    if kind == "image":
        ds = image_dataset(list(job.data), size)
    else:
        ds = video_dataset(list(job.data), size, max_frames=256)
    if job.config.cache_data:
        ds = ds.materialize()
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
        datasets={"train": ds},
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


def load_stage_config_or_fail(url: str, stage: str, message: str) -> None:
    from stages.checkpoint import load_stage_config

    try:
        load_stage_config(url, stage)
    except CheckpointError as e:
        raise ConfigError(f"{message} ({e})") from None


def load_train_config(path: str | None) -> TrainConfig:
    if not path:
        return TrainConfig()
    try:
        with fsspec.open(path, "r") as f:
            return load_yaml(TrainConfig, f.read(), where=path)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def init_ray_for_training(address: str | None, workers: int, cpus: float, gpus: float) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(workers * cpus)) + 2), include_dashboard=False, **kwargs)


def add_parsers(sub) -> None:
    """The ``mav train`` and ``mav data synth`` subcommands."""
    tr = sub.add_parser("train", help="train one stage on Ray Train (paper recipe order: " + " -> ".join(
        ("clip", "prior", "decoder", "sr-low", "sr-high", "decoder-video", "sr-low-video", "interpolation")) + ")")
    tr.add_argument("stage", choices=TRAIN_STAGES)
    tr.add_argument("--data", nargs="+", required=True, metavar="URL",
                    help="training data: synthetic-data roots, directories, files or globs (local or fsspec URLs)")
    tr.add_argument("--output", required=True, metavar="URL", help="checkpoint bundle the stage is written into")
    tr.add_argument("--config", help="training config YAML (fields of stages.training.TrainConfig)")
    tr.add_argument("--preset", default=DEFAULT_PRESET, help="stage preset giving the network sizes (default cpu)")
    tr.add_argument("--workers", type=int, default=1, help="data-parallel workers (default 1)")
    tr.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU with gloo)")
    tr.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker, also its thread count")
    tr.add_argument("--max-steps", type=int, help="optimizer steps (overrides the config's max_steps)")
    tr.add_argument("--resume", action="store_true", help="continue this stage's run under --output")
    tr.add_argument("--init", metavar="URL", help="bundle to start from (video stages and interpolation)")
    tr.add_argument("--clip", metavar="URL", help="bundle holding the CLIP stage (default: --output)")
    tr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    tr.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data utilities")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    syn = dsub.add_parser("synth", help="write the synthetic shapes data set")
    syn.add_argument("--out", required=True, metavar="URL")
    syn.add_argument("--images", type=int, default=1000, help="captioned still images (default 1000)")
    syn.add_argument("--videos", type=int, default=100, help="uncaptioned videos (default 100)")
    syn.add_argument("--size", type=int, default=64, help="image and video size in pixels (default 64)")
    syn.add_argument("--frames", type=int, default=96, help="frames per video, at 30 fps (default 96)")
    syn.add_argument("--speed", type=float, nargs=2, default=list(SPEED), metavar=("LOW", "HIGH"),
                     help=f"the shapes' speeds, frame widths per second (default {SPEED[0]:g} {SPEED[1]:g})")
    syn.add_argument("--format", default="parquet", choices=("parquet", "tar"), help="image shard format")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--holdout", nargs="*", default=[], metavar="'COLOUR SHAPE'",
                     help="colour×shape pairs left out of the captioned images (e.g. 'red triangle')")
    syn.set_defaults(func=cmd_synth)


def cmd_train(args) -> int:
    from workflows.errors import EXIT_USAGE, CliError
    from workflows.train_data import DataError

    try:
        cfg = load_train_config(args.config)
        if args.max_steps is not None:
            cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
        if args.workers < 1:
            raise ConfigError("--workers must be >= 1")
        load_preset(args.preset)
    except (ConfigError, ValueError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    job = TrainJob(stage=args.stage, data=tuple(args.data), output=args.output, config=cfg, preset=args.preset,
                   init=args.init, clip=args.clip, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                   cpus_per_worker=args.cpus_per_worker)
    init_ray_for_training(args.address, args.workers, args.cpus_per_worker, args.gpus_per_worker)
    start = time.perf_counter()
    try:
        metrics = run_training(job, resume=args.resume)
    except (ConfigError, CheckpointError, DataError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    print(f"[{args.stage}] done: {int(metrics.get('step', 0))} steps in {time.perf_counter() - start:.0f}s, "
          f"final loss {metrics.get('loss', float('nan')):.4f}, {int(metrics.get('skipped_items', 0))} items skipped; "
          f"wrote {join(args.output, STAGE_OF[args.stage][0])}", file=sys.stderr)
    return 0


def cmd_synth(args) -> int:
    from workflows.errors import CliError
    from workflows.synth import parse_holdout, synth

    if args.images < 0 or args.videos < 0:
        raise CliError("--images and --videos must be >= 0")

    def progress(kind: str, done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"{kind}: {done}/{total}", file=sys.stderr)

    try:
        written = synth(args.out, images=args.images, videos=args.videos, size=args.size, frames=args.frames,
                        fmt=args.format, seed=args.seed, holdout=parse_holdout(args.holdout), speed=args.speed,
                        progress=progress)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(f"wrote {written['images']} images and {written['videos']} videos under {args.out}", file=sys.stderr)
    return 0

