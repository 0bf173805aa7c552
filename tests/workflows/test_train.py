"""`mav train` on Ray Train (2 workers, gloo), data and checkpoints on an S3-compatible server on loopback;
the loop's batches and its reductions on the worker's device; metrics as CSV and TensorBoard events."""

import dataclasses
import io
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.checkpoint import load_stage
from stages.config import ConfigError, FrameNoiseConfig
from stages.temporal import temporal_parameter_names
from stages.training import TrainConfig, probe
from workflows.presets import load_preset
from workflows.shapes.data import synth
from workflows.train import DataError, TrainJob, read_metrics, run_training

pytestmark = pytest.mark.timeout(1800)  # the module fixture trains all eight stages

ORDER = ("clip", "prior", "decoder", "sr-low", "sr-high", "decoder-video", "sr-low-video", "interpolation")
CONFIG = TrainConfig(batch_size=4, lr=1e-3, max_steps=24, log_every=4, checkpoint_every=12, frames=4, ema_decay=0.9)
# Contrastive training of the tiny CLIP collapses to chance (loss log b) at lr 1e-3; at 3e-4 it learns within 48 steps.
# decoder-video also trains its temporal layers at their own rate, under Min-SNR-γ weighting.
STAGE_CONFIG = {"clip": dataclasses.replace(CONFIG, lr=3e-4, max_steps=48, log_every=8, checkpoint_every=24),
                "decoder-video": dataclasses.replace(CONFIG, temporal_lr_scale=3.0, min_snr_gamma=5.0)}


def config_of(stage: str) -> TrainConfig:
    return STAGE_CONFIG.get(stage, CONFIG)


@pytest.fixture(scope="module")
def data(s3_server):
    """Synthetic shapes in S3, plus two corrupt image rows and two corrupt videos (even totals, so that
    Ray Train's equal split across the 2 workers drops none of them)."""
    import boto3

    bucket = f"mav-train-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/shapes"
    synth(root, images=64, videos=6, size=32, frames=40, seed=1)
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [b"not an image", b"\x89PNG\r\n"], "caption": ["broken", "cut"]}), buf)
    with fsspec.open(f"{root}/images/part-99999.parquet", "wb") as f:
        f.write(buf.getvalue())
    for i in range(2):
        with fsspec.open(f"{root}/videos/video-broken-{i}.mp4", "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypmp42 truncated")
    return root


@pytest.fixture(scope="module")
def trained(ray_session, data, tiny_preset_file):
    """Every stage trained in the paper's order into one S3 bundle: {stage: final metrics}."""
    out = data.replace("/shapes", "/model")
    results = {}
    for stage in ORDER:
        init = out if stage in ("decoder-video", "sr-low-video", "interpolation") else None
        job = TrainJob(stage=stage, data=(data,), output=out, config=config_of(stage), preset=tiny_preset_file,
                       init=init, workers=2)
        results[stage] = run_training(job)
    return out, results


def test_every_stage_trains_and_its_loss_goes_down(trained):
    out, results = trained
    for stage in ORDER:
        losses = [r["loss"] for r in read_metrics(out, stage)]
        config = config_of(stage)
        assert len(losses) == config.max_steps // config.log_every, stage
        half = len(losses) // 2
        assert np.mean(losses[half:]) < np.mean(losses[:half]), (stage, losses)
        assert results[stage]["step"] == config.max_steps


def test_corrupt_items_are_skipped_and_counted(trained):
    _, results = trained
    for stage in ORDER:
        assert results[stage]["skipped_items"] >= 1, stage


def test_checkpoints_compute_what_the_trained_networks_computed(trained):
    """Each stage's saved checkpoint reproduces the probe the worker computed on its in-memory EMA network."""
    out, results = trained
    names = {"clip": "clip", "prior": "prior", "decoder-video": "decoder", "interpolation": "interpolation",
             "sr-low-video": "sr_low", "sr-high": "sr_high"}
    for stage, produced in names.items():
        _, net = load_stage(out, produced)
        assert np.allclose(probe(produced, net), results[stage]["probe"], rtol=1e-5, atol=1e-6), stage


def test_trained_bundle_generates_with_mav_generate(trained, tmp_path):
    from workflows.cli import main
    from workflows.video import decode_mp4

    out, _ = trained
    assert main(["generate", "a red circle on a white background", "--checkpoint", out, "--seed", "3",
                 "--out", str(tmp_path / "v.mp4")]) == 0
    frames, fps = decode_mp4((tmp_path / "v.mp4").read_bytes())
    assert frames.shape == (7, 32, 32, 3) and fps == 10.0  # tiny preset: 4 keyframes, skip 2, SR to 32


def test_video_stages_were_inflated(trained):
    """(``temporal_only``, which trains the inflated layers alone, is checked on the smoke recipe's D^t.)"""
    out, _ = trained
    for produced in ("decoder", "sr_low", "interpolation"):
        cfg, net = load_stage(out, produced)
        assert cfg.unet.temporal and temporal_parameter_names(net), produced


def test_interpolation_keeps_its_given_frames(trained):
    from stages import cascade

    out, _ = trained
    cfg, net = load_stage(out, "interpolation")
    keys = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    with torch.inference_mode():
        video, fps = cascade.interpolate(net, cfg, keys, torch.randn(1, 32), torch.tensor([5.0]), [0])
    assert torch.equal(video[:, :, :: cfg.skip], keys) and fps.item() == 5.0 * cfg.skip


def test_rerun_needs_resume_and_resume_continues(trained, data, tiny_preset_file):
    out, results = trained
    job = TrainJob(stage="decoder", data=(data,), output=out, config=CONFIG, preset=tiny_preset_file, workers=2)
    with pytest.raises(ConfigError, match="--resume"):
        run_training(job)
    more = dataclasses.replace(job, config=dataclasses.replace(CONFIG, max_steps=CONFIG.max_steps + 4))
    metrics = run_training(more, resume=True)
    assert metrics["resumed_from"] == CONFIG.max_steps and metrics["step"] == CONFIG.max_steps + 4


def test_missing_inputs_are_clear_errors(ray_session, data, tiny_preset_file, tmp_path):
    job = TrainJob(stage="decoder-video", data=(data,), output=str(tmp_path / "m"), config=CONFIG,
                   preset=tiny_preset_file, init=None, clip=None)
    with pytest.raises(ConfigError, match="CLIP"):
        run_training(job)
    job = TrainJob(stage="clip", data=(str(tmp_path / "nothing"),), output=str(tmp_path / "m"), config=CONFIG,
                   preset=tiny_preset_file)
    with pytest.raises(DataError, match="no such file"):
        run_training(job)


def test_relative_local_paths_name_the_callers_files(ray_session, tiny_preset_file, tmp_path, monkeypatch):
    # The workers run in Ray's own directory: relative paths must still mean the caller's data, preset and output.
    monkeypatch.chdir(tmp_path)
    synth("shapes", images=16, videos=2, size=32, frames=8, seed=2)
    (tmp_path / "tiny.yaml").write_text(open(tiny_preset_file).read())
    job = TrainJob(stage="clip", data=("shapes",), output="model", preset="tiny.yaml", workers=1,
                   config=dataclasses.replace(CONFIG, max_steps=2, checkpoint_every=2, log_every=1))
    assert (job.data, job.output, job.preset) == ((str(tmp_path / "shapes"),), str(tmp_path / "model"),
                                                  str(tmp_path / "tiny.yaml"))
    assert run_training(job)["step"] == 2
    events = _events(str(tmp_path / "model" / "_train" / "clip" / "tensorboard"))  # a local output: in place
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    cfg, _ = load_stage(str(tmp_path / "model"), "clip")
    assert cfg.embed_dim == load_preset(str(tmp_path / "tiny.yaml")).clip.embed_dim
    assert TrainJob(stage="clip", data=("s3://b/x",), output="s3://b/m", config=CONFIG).output == "s3://b/m"


def test_frames_share_noise_from_video_fine_tuning_on(tiny_config, tmp_path):
    """The image decoder makes independent frames whatever the preset says; decoder-video and ↑F take the
    preset's frame noise, and both save it with their weights."""
    from stages.checkpoint import save_stage
    from stages.config import dump_yaml

    noise = FrameNoiseConfig(shared=0.4, sample_shared=0.8, sample_progressive=0.95)
    preset = dataclasses.replace(
        tiny_config,
        decoder=dataclasses.replace(tiny_config.decoder, frame_noise=noise),
        interpolation=dataclasses.replace(tiny_config.interpolation, frame_noise=dataclasses.replace(noise, shared=0.3)),
    )
    path = tmp_path / "preset.yaml"
    path.write_text(dump_yaml(preset))
    image_cfg, image_net = TrainJob(stage="decoder", data=("unused",), output="unused", config=CONFIG,
                                    preset=str(path)).initial_network()
    assert image_cfg.frame_noise == FrameNoiseConfig() and not image_cfg.unet.temporal
    save_stage(str(tmp_path / "bundle"), "decoder", image_cfg, image_net)
    for stage, produced in (("decoder-video", "decoder"), ("interpolation", "interpolation")):
        job = TrainJob(stage=stage, data=("unused",), output="unused", config=CONFIG, preset=str(path),
                       init=str(tmp_path / "bundle"))
        cfg, net = job.initial_network()
        save_stage(str(tmp_path / "video"), produced, cfg, net)
        assert load_stage(str(tmp_path / "video"), produced)[0].frame_noise == getattr(preset, produced).frame_noise


def test_video_stages_give_temporal_layers_their_own_learning_rate(tiny_config):
    from stages.unet import VideoUNet
    from workflows.train.loop import param_groups

    unet = tiny_config.decoder.unet
    net = VideoUNet(dataclasses.replace(unet, temporal=True))
    job = TrainJob(stage="decoder-video", data=("unused",), output="unused", preset="unused",
                   config=dataclasses.replace(CONFIG, temporal_lr_scale=4.0))
    spatial, temporal = param_groups(net, job)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in temporal["params"]} == set(temporal_parameter_names(net))
    assert len(spatial["params"]) + len(temporal["params"]) == len(list(net.parameters()))
    assert (spatial["lr_scale"], temporal["lr_scale"]) == (1.0, 4.0)
    # an image stage has no temporal layers: one group at the base rate
    image = TrainJob(stage="decoder", data=("unused",), output="unused", preset="unused", config=job.config)
    assert [g["lr_scale"] for g in param_groups(VideoUNet(dataclasses.replace(unet, temporal=False)), image)] == [1.0]
    with pytest.raises(ConfigError, match="temporal_lr_scale"):
        TrainConfig(temporal_lr_scale=0)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        TrainConfig(min_snr_gamma=-1)


class _Shard:
    """Ray Data's shard interface as the loop reads it: numpy batches of rows, some unusable."""

    def __init__(self, ok: list[bool]) -> None:
        self.ok = np.array(ok)
        self.epochs = 0

    def iter_batches(self, *, batch_size, batch_format, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        self.epochs += 1
        for start in range(0, len(self.ok) - batch_size + 1 if drop_last else len(self.ok), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self.ok)))
            yield {"row": rows, "ok": self.ok[rows]}


def test_workers_take_the_same_steps_per_epoch_whatever_their_unusable_items():
    """Ray Data starts an epoch of a split data set when every worker asks for it: a worker that ran ahead
    into the next epoch while another still trains would wait for it forever."""
    from workflows.train.loop import epoch_batches

    shards = [_Shard([True] * 10), _Shard([True, False, False, True, False, False, False, False, True, True])]
    batches = [epoch_batches(shard, 4, seed=0) for shard in shards]
    for step in range(5):
        assert all(len(next(b)["row"]) == 4 for b in batches)
        assert shards[0].epochs == shards[1].epochs == step // 2 + 1  # two full batches of 10 rows per epoch
    with pytest.raises(RuntimeError, match="fewer than batch_size=4"):
        next(epoch_batches(_Shard([True] * 3), 4, seed=0))


def test_a_batch_with_no_usable_item_gives_an_exactly_zero_loss_through_the_network(tiny_config):
    from stages.training import TRAINING_STAGES, LossContext
    from workflows.train.loop import step_loss

    calls = []

    def network(x_t, t, **cond):
        calls.append(x_t.shape)
        return x_t * 2

    spec = TRAINING_STAGES["sr-low-video"]
    ctx = LossContext(stage_cfg=tiny_config.sr_low, train=CONFIG, generator=torch.Generator().manual_seed(0))
    batch = {"video": np.zeros((2, 3, 6, 16, 16), np.uint8), "length": np.array([0, 0]), "fps": np.array([0.0, 0.0]),
             "ok": np.array([False, False])}
    loss = step_loss(network, batch, batch["ok"], spec, ctx, 0.5, torch.device("cpu"))
    assert float(loss) == 0.0 and calls == [(2, 3, CONFIG.frames, 16, 16)]
    batch["length"], batch["fps"], batch["ok"] = np.array([6, 6]), np.array([30.0, 30.0]), np.array([True, False])
    assert float(step_loss(network, batch, batch["ok"], spec, ctx, 0.5, torch.device("cpu"))) > 0
    assert calls[-1] == (1, 3, CONFIG.frames, 16, 16)  # the usable rows only


def test_log_reductions_hand_collectives_only_tensors_on_the_training_device(monkeypatch):
    """NCCL, the process group of GPU workers, has no CPU tensors: every tensor the loop all-reduces must live
    on the device the worker trains on (here the meta device stands in for a GPU), as float32 or int64."""
    import torch.distributed as dist

    from workflows.train.loop import reduce_window

    handed = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **kw: handed.append((tensor.device, tensor.dtype)))
    device = torch.device("meta")
    loss, counts = reduce_window(torch.zeros((), device=device), (3, 12, 1), device, world=2)
    assert handed == [(device, torch.float32), (device, torch.int64)]
    assert (loss.device, counts.device) == (device, device)
    handed.clear()
    loss, counts = reduce_window(torch.tensor(6.0), (3, 12, 1), torch.device("cpu"), world=1)  # one worker: no collective
    assert not handed and float(loss) == 6.0 and counts.tolist() == [3, 12, 1]


def _events(log_dir: str):
    """TensorBoard's reading of the event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return events


def test_metrics_go_to_tensorboard_beside_the_csv_of_a_remote_output(trained, tmp_path):
    """An s3:// output gets its TensorBoard events under OUTPUT/_train/STAGE/tensorboard, as its metrics.csv."""
    out, _ = trained
    fs, path = fsspec.core.url_to_fs(f"{out}/_train/decoder/tensorboard")
    fs.get(path, str(tmp_path / "tb"), recursive=True)
    rows = read_metrics(out, "decoder")
    events = _events(str(tmp_path / "tb"))
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "train/samples_per_s", "train/skipped_items"}
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [int(r["step"]) for r in rows]
    assert np.allclose([e.value for e in logged], [r["loss"] for r in rows], rtol=1e-5)


def test_temporal_only_and_worker_counts_are_checked_before_training(tmp_path):
    from workflows.cli import main

    job = TrainJob(stage="decoder", data=(str(tmp_path),), output=str(tmp_path / "m"),
                   config=dataclasses.replace(CONFIG, temporal_only=True))
    with pytest.raises(ConfigError, match="temporal_only applies to decoder-video, sr-low-video, not decoder"):
        run_training(job)
    assert main(["train", "decoder", "--data", str(tmp_path), "--output", str(tmp_path / "m"), "--workers", "0"]) == 2


def test_a_latte_decoder_trains_on_images_then_on_clips_with_still_images_beside_them(ray_session, data, tmp_path):
    """mav train decoder and decoder-video (joint image–video training) of a tiny Latte D^t on 2 workers."""
    from importlib import resources

    from stages.cascade import build_stage
    from stages.checkpoint import save_stage
    from stages.latte import LatteVideo

    preset = str(resources.files("cluster") / "presets" / "tiny-latte.yaml")
    clip_bundle = str(tmp_path / "clip")  # fresh CLIP weights: the decoder's loss only reads y_e through it
    save_stage(clip_bundle, "clip", load_preset(preset).clip, build_stage("clip", load_preset(preset).clip))
    out = data.replace("/shapes", "/latte")
    short = dataclasses.replace(CONFIG, max_steps=2, log_every=2, checkpoint_every=2)
    image = run_training(TrainJob(stage="decoder", data=(data,), output=out, config=short, preset=preset,
                                  clip=clip_bundle, workers=2))
    cfg, net = load_stage(out, "decoder")
    assert isinstance(net, LatteVideo) and cfg.backbone == "latte" and not cfg.latte.temporal
    assert np.allclose(probe("decoder", net), image["probe"], rtol=1e-5, atol=1e-6)
    joint = dataclasses.replace(short, joint_images=2)
    video = run_training(TrainJob(stage="decoder-video", data=(data,), output=out, config=joint, preset=preset,
                                  clip=clip_bundle, init=out, workers=2))
    cfg, net = load_stage(out, "decoder")
    assert cfg.latte.temporal and temporal_parameter_names(net) and np.isfinite(video["loss"])
    assert np.allclose(probe("decoder", net), video["probe"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="joint_images .* applies to decoder-video, not interpolation"):
        run_training(TrainJob(stage="interpolation", data=(data,), output=out, config=joint, preset=preset,
                              clip=clip_bundle, init=out))
