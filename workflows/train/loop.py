"""The loop every Ray Train worker runs, for every stage (``TorchTrainer``'s ``train_loop_per_worker``).

Each step reads a batch of this worker's data shard, computes its stage's loss (from the table of
training stages, ``stages.training.TRAINING_STAGES``) on the usable items, and steps the optimizer and the
EMA; items that could not be decoded are skipped and counted. Nothing crosses workers but DDP's gradients
and, at log steps only, one reduction of the log window's figures (:func:`reduce_window`), whose tensors
live on the worker's device: NCCL has no CPU tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

from stages import latent, training
from stages.checkpoint import load_stage, save_stage
from stages.fsio import join, read_bytes, write_bytes_atomic
from stages.temporal import temporal_parameter_names
from workflows.train.metrics import MetricsLog

if TYPE_CHECKING:
    from workflows.train.spec import TrainJob

STATE_WEIGHTS = "train_state.safetensors"
STILLS = "stills"  # the data set of still images a joint-training run reads beside its clips
STATE_META = "train_state.json"


def train_loop(loop_config: dict) -> None:
    """One worker's run of ``loop_config["job"]`` (a TrainJob): from its last checkpoint if Ray Train
    restarted it, else from the job's initial network; rank 0 logs, checkpoints and writes the stage."""
    import ray.train
    import ray.train.torch

    job: TrainJob = loop_config["job"]
    spec, cfg_t = job.spec, job.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    device = ray.train.torch.get_device()
    gen = torch.Generator().manual_seed(cfg_t.seed * 1000 + rank)

    checkpoint = ray.train.get_checkpoint()
    step = 0
    if checkpoint is None:
        stage_cfg, net = job.initial_network()
        net, ema, opt = _prepare(net, job, device)
        vae = _vae(stage_cfg, device)
    else:
        with checkpoint.as_directory() as d:
            stage_cfg, net = load_stage(d, spec.produces)
            net, ema, opt = _prepare(net, job, device)
            step = _load_state(d, net, ema, opt)
            vae = _vae(stage_cfg, device)  # read while the checkpoint's directory is there
    job.check_memory(net, stage_cfg, device)
    resumed_from = step
    lr_scales = [g["lr_scale"] for g in opt.param_groups]
    params = [p for p in net.parameters() if p.requires_grad]
    checkpointed = getattr(net, "unet", net)  # a VideoUNet's diffusers U-Net, or a LatteVideo itself
    if cfg_t.gradient_checkpointing and hasattr(checkpointed, "enable_gradient_checkpointing"):
        checkpointed.enable_gradient_checkpointing()
    clip = None
    if spec.needs_clip:
        _, clip = load_stage(job.clip or job.output, "clip", device=device)
        clip.requires_grad_(False)
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else net
    loss_ctx = training.LossContext(stage_cfg=stage_cfg, train=cfg_t, generator=gen, clip=clip, vae=vae)

    batches = epoch_batches(ray.train.get_dataset_shard("train"), cfg_t.batch_size, cfg_t.seed * 7919 + rank)
    stills = (epoch_batches(ray.train.get_dataset_shard(STILLS), cfg_t.batch_size * cfg_t.joint_images,
                            cfg_t.seed * 7919 + rank + 1) if uses_stills(job) else None)
    log = MetricsLog(job.run_dir, resumed_from=resumed_from) if rank == 0 else None
    window = Window(device)
    metrics = {"step": step, "loss": float("nan"), "lr": cfg_t.lr, "samples_per_s": float("nan"),
               "skipped_items": 0, "resumed_from": resumed_from}
    while step < cfg_t.max_steps:
        batch = next(batches)
        ok = np.asarray(batch["ok"], dtype=bool)
        window.skipped += int((~ok).sum())
        for g, scale in zip(opt.param_groups, lr_scales):
            g["lr"] = training.lr_at(step, cfg_t) * scale
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg_t.bf16):
            loss = step_loss(model, batch, ok, spec, loss_ctx, step / max(1, cfg_t.max_steps), device,
                             next(stills) if stills is not None else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # DDP averaged the gradients, so every worker sees the same ones: where no worker had a usable item
        # they are all zero, and every worker skips the step alike, without asking the others. (Only a
        # worker with no usable item of its own looks; with one, the average is not zero.)
        if not ok.any() and not any(p.grad is not None and bool(p.grad.any()) for p in params):
            continue
        if cfg_t.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg_t.grad_clip)
        opt.step()
        ema.update(net, step)
        step += 1
        window.add(loss, items=int(ok.sum()))
        metrics.update(step=step, lr=opt.param_groups[0]["lr"])
        if step % cfg_t.log_every == 0 or step == cfg_t.max_steps:
            # The logged loss is the mean over the workers and the steps since the last log line.
            figures = window.reduce(world)
            metrics.update(loss=figures["loss"], samples_per_s=figures["samples_per_s"],
                           skipped_items=metrics["skipped_items"] + figures["skipped_items"])
            if log is not None:
                log.write({k: metrics[k] for k in MetricsLog.FIELDS})
                print(f"[{job.stage}] step {step}/{cfg_t.max_steps}  loss {metrics['loss']:.4f}  "
                      f"lr {metrics['lr']:.2e}  {metrics['samples_per_s']:.1f} samples/s  "
                      f"skipped {metrics['skipped_items']}", flush=True)
        if step % cfg_t.checkpoint_every == 0 or step == cfg_t.max_steps:
            report = dict(metrics)
            if step == cfg_t.max_steps:
                report["probe"] = training.probe(spec.produces, _ema_copy(net, ema))
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    _save_checkpoint(d, spec.produces, stage_cfg, net, ema, opt, step, report, vae)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(report)
    if rank == 0:
        log.close()
        save_stage(job.output, spec.produces, stage_cfg, _ema_copy(net, ema), vae=vae)


# -- what every step reads -----------------------------------------------------------------------

def epoch_batches(shard, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless numpy batches of this worker's data shard, epoch after epoch (reshuffled).

    Full batches only: every worker takes the same number of steps per epoch, as Ray Data's split needs
    (each epoch starts when every worker asks for it), and each step reads ``batch_size`` items.
    """
    epoch = 0
    while True:
        n = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=batch_size * 4, local_shuffle_seed=seed + epoch):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"this worker's data shard holds fewer than batch_size={batch_size} items")
        epoch += 1


def uses_stills(job: TrainJob) -> bool:
    """Whether ``job`` trains still images beside its clips (image–video joint training)."""
    return job.spec.joint and job.config.joint_images > 0


def step_loss(model, batch: dict[str, np.ndarray], ok: np.ndarray, spec: training.TrainingStage,
              loss_ctx: training.LossContext, progress: float, device: torch.device,
              stills: dict[str, np.ndarray] | None = None) -> torch.Tensor:
    """The stage's loss on the batch's usable rows (``ok``), and on the usable ones of ``stills`` (a batch of
    images trained beside the clips). A worker whose rows are all unusable still takes part in the step (DDP's
    collectives must match across workers): its loss is exactly zero, computed through the network's forward
    pass on the rows made readable."""
    if ok.any():
        rows = {k: v[ok] for k, v in batch.items()}
        samples = to_samples(rows, spec, loss_ctx.train, progress, loss_ctx.generator, device)
        if stills is not None and np.asarray(stills["ok"], dtype=bool).any():
            usable = np.asarray(stills["ok"], dtype=bool)
            images = _to_float(torch.from_numpy(np.ascontiguousarray(stills["image"][usable])), device)
            samples = dataclasses.replace(samples, stills=images[:, :, None])
        return spec.loss(model, samples, loss_ctx)
    rows = dict(batch)
    if spec.video:  # undecodable videos are all-zero arrays: give them a usable length and fps
        rows["length"] = np.full(len(ok), batch["video"].shape[2])
        rows["fps"] = np.full(len(ok), 30.0)
    return spec.loss(model, to_samples(rows, spec, loss_ctx.train, progress, loss_ctx.generator, device), loss_ctx) * 0.0


def to_samples(batch: dict[str, np.ndarray], spec: training.TrainingStage, cfg_t: training.TrainConfig,
               progress: float, generator: torch.Generator, device: torch.device) -> training.Samples:
    """Rows of a batch as the loss reads them: images as one-frame videos, videos as clips at fps from the
    schedule at ``progress`` (share of the run done)."""
    if spec.video:
        clips, fps = training.sample_clips(torch.from_numpy(batch["video"]), batch["length"], batch["fps"], progress,
                                           cfg_t, generator)
        return training.Samples(pixels=_to_float(clips, device), fps=fps.to(device))
    images = _to_float(torch.from_numpy(np.ascontiguousarray(batch["image"])), device)
    return training.Samples(pixels=images[:, :, None], fps=torch.zeros(len(images), device=device),
                            captions=tuple(str(c) for c in batch["caption"]))


def _to_float(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] on ``device``."""
    return pixels.to(device=device, dtype=torch.float32) / 127.5 - 1


# -- the log window: summed on the device, reduced across workers at log steps only -----------------

class Window:
    """A log window's figures on this worker: the loss summed on ``device`` (no host sync per step), the
    steps, items and skipped items counted on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float32)
        self.steps = self.items = self.skipped = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, *, items: int) -> None:
        self.loss += loss.detach().float()
        self.steps += 1
        self.items += items

    def reduce(self, world: int) -> dict[str, float]:
        """The window over every worker: mean loss per step, samples/s and skipped items; starts a new one."""
        loss, counts = reduce_window(self.loss, (self.steps, self.items, self.skipped), self.device, world)
        steps, items, skipped = counts.tolist()
        elapsed = time.perf_counter() - self.start
        self._reset()
        return {"loss": float(loss) / max(steps, 1), "samples_per_s": items / max(elapsed, 1e-9),
                "skipped_items": skipped}


def reduce_window(loss: torch.Tensor, counts: Sequence[int], device: torch.device,
                  world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, counts) summed over the ``world`` workers: a float32 scalar and an int64 vector, both on
    ``device``, the worker's training device, as every collective tensor must be (NCCL has no CPU tensors)."""
    loss = loss.detach().to(device=device, dtype=torch.float32).clone()
    counts = torch.tensor(list(counts), dtype=torch.int64, device=device)
    if world > 1:
        dist.all_reduce(loss)
        dist.all_reduce(counts)
    return loss, counts


# -- the network, its optimizer and their state ----------------------------------------------------

def _prepare(net: torch.nn.Module, job: TrainJob, device: torch.device):
    """(network on ``device`` in train mode, its EMA, AdamW over its trainable parameters)."""
    net = net.to(device).train()
    ema = training.EMA(net, job.config.ema_decay)
    if job.config.temporal_only:
        training.freeze_all_but_temporal(net)
    trainable = job.trainable_parameters(net)
    if trainable is not None:  # a job that names the parameters it trains (mav tune)
        for name, p in net.named_parameters():
            p.requires_grad_(name in trainable)
    opt = torch.optim.AdamW(param_groups(net, job), lr=job.config.lr, weight_decay=job.config.weight_decay)
    return net, ema, opt


def param_groups(net: torch.nn.Module, job: TrainJob) -> list[dict]:
    """The trainable parameters, the video stages' temporal layers in a group of their own whose learning
    rate is ``temporal_lr_scale`` times the rest (they start at identity; the spatial layers are trained)."""
    temporal = set(temporal_parameter_names(net)) if job.spec.video else set()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n not in temporal], "lr_scale": 1.0},
              {"params": [p for n, p in named if n in temporal], "lr_scale": job.config.temporal_lr_scale}]
    return [g for g in groups if g["params"]]


def _load_state(directory: str, net, ema, opt) -> int:
    """Restore raw weights, EMA and optimizer from a training checkpoint; returns its step."""
    state = safetensors.torch.load(read_bytes(join(directory, STATE_WEIGHTS)))
    meta = json.loads(read_bytes(join(directory, STATE_META)).decode())
    net.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    on = {k: v.device for k, v in net.state_dict().items()}
    ema.shadow = {k[len("ema."):]: v.float().to(on[k[len("ema."):]]) for k, v in state.items() if k.startswith("ema.")}
    training.optimizer_from_tensors(opt, {k[len("optim."):]: v for k, v in state.items() if k.startswith("optim.")},
                                    meta["optimizer"])
    return int(meta["step"])


def _save_checkpoint(directory: str, produced: str, cfg, net, ema, opt, step: int, metrics: dict,
                     vae: torch.nn.Module | None = None) -> None:
    """The stage directory (EMA weights: what inference loads; a latent D^t's ``vae``) plus the training
    state, in ``directory``."""
    save_stage(directory, produced, cfg, _ema_copy(net, ema), vae=vae)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v.cpu().contiguous().clone() for k, v in ema.shadow.items()})
    opt_tensors, opt_meta = training.optimizer_to_tensors(opt)
    tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
    write_bytes_atomic(join(directory, STATE_WEIGHTS), safetensors.torch.save(tensors))
    meta = {"step": step, "optimizer": opt_meta, "metrics": metrics}
    write_bytes_atomic(join(directory, STATE_META), json.dumps(meta).encode())


def _vae(stage_cfg, device: torch.device) -> torch.nn.Module | None:
    """A latent D^t's frozen VAE (``stages.latent``) on ``device``; None for every other stage."""
    latent_cfg = getattr(stage_cfg, "latent", None)
    return latent.load_vae(latent_cfg).to(device) if latent_cfg is not None else None


def _ema_copy(net, ema):
    out = copy.deepcopy(net)
    out.load_state_dict({k: v.to(dtype=out.state_dict()[k].dtype) for k, v in ema.shadow.items()})
    return out.eval()
