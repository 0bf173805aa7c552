"""`mav train` on Ray Train (2 workers, gloo), data and checkpoints on an S3-compatible server on loopback."""

import dataclasses
import io
import os
import signal
import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stages.checkpoint import load_stage
from stages.config import ConfigError
from stages.temporal import spatial_state_dict, temporal_parameter_names
from stages.training import TrainConfig, probe
from workflows.synth import synth
from workflows.presets import load_preset
from workflows.train import TrainJob, read_metrics, run_training

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
        if stage == "sr-low-video":  # the image SR_l^t, to fine-tune its temporal layers alone below
            only = TrainJob(stage=stage, data=(data,), output=out + "-temporal-only", preset=tiny_preset_file,
                            init=out, workers=2, config=dataclasses.replace(CONFIG, max_steps=6, temporal_only=True))
            results["sr-low-image"] = load_stage(out, "sr_low")[1].state_dict()
            results["temporal-only"] = (only.output, run_training(only))
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


def test_video_stages_were_inflated_and_temporal_only_trains_only_temporal_layers(trained):
    out, results = trained
    cfg, decoder = load_stage(out, "decoder")
    assert cfg.unet.temporal and temporal_parameter_names(decoder)
    _, sr_low = load_stage(results["temporal-only"][0], "sr_low")
    before = results["sr-low-image"]
    after = spatial_state_dict(sr_low)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the 2D weights did not move
    convs = {k: v for k, v in sr_low.state_dict().items() if k.endswith("temporal_conv.weight")}
    assert convs and any(not torch.equal(v, torch.nn.init.dirac_(torch.empty_like(v))) for v in convs.values())


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
    from workflows.train_data import DataError

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
    cfg, _ = load_stage(str(tmp_path / "model"), "clip")
    assert cfg.embed_dim == load_preset(str(tmp_path / "tiny.yaml")).clip.embed_dim
    assert TrainJob(stage="clip", data=("s3://b/x",), output="s3://b/m", config=CONFIG).output == "s3://b/m"


def _train_worker_pids() -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def test_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(ray_session, data, tiny_preset_file, tmp_path):
    out = str(tmp_path / "model")
    cfg = dataclasses.replace(CONFIG, max_steps=40, checkpoint_every=4, log_every=2)
    job = TrainJob(stage="sr-high", data=(data,), output=out, config=cfg, preset=tiny_preset_file, workers=2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(job)))
    thread.start()
    killed = False
    deadline = time.time() + 240
    while time.time() < deadline and thread.is_alive() and not killed:
        try:
            steps = [r["step"] for r in read_metrics(out, "sr-high")]
        except FileNotFoundError:
            steps = []
        if steps and max(steps) >= 10:
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed = True
        time.sleep(0.2)
    thread.join(timeout=300)
    assert killed
    assert result["step"] == 40
    assert 4 <= result["resumed_from"] < 40  # restarted from a checkpoint, not from scratch


def test_frames_share_noise_from_video_fine_tuning_on(tiny_config, tmp_path):
    """The image decoder makes independent frames (ρ = r = 0 whatever the preset says); decoder-video and ↑F
    take the preset's ρ, its sampling ρ and r and its moving noise, and all are saved with their weights."""
    from stages.checkpoint import save_stage
    from stages.config import dump_yaml
    from workflows.train import initial_network

    diffusion = dataclasses.replace(tiny_config.decoder.diffusion, frame_noise_shared=0.4,
                                    sample_frame_noise_shared=0.8, sample_frame_noise_progressive=0.95,
                                    frame_noise_flow=True, sample_frame_noise_drift=(0.01, 0.03))
    preset = dataclasses.replace(
        tiny_config,
        decoder=dataclasses.replace(tiny_config.decoder, diffusion=diffusion),
        interpolation=dataclasses.replace(tiny_config.interpolation,
                                          diffusion=dataclasses.replace(diffusion, sample_frame_noise_drift=())),
    )
    path = tmp_path / "preset.yaml"
    path.write_text(dump_yaml(preset))
    image_cfg, image_net = initial_network(TrainJob(stage="decoder", data=("unused",), output="unused",
                                                    config=CONFIG, preset=str(path)))
    assert image_cfg.diffusion.frame_noise_shared == 0.0 and image_cfg.diffusion.sampling_shared == 0.0
    assert image_cfg.diffusion.sampling_progressive == 0.0 and not image_cfg.diffusion.frame_noise_set
    save_stage(str(tmp_path / "bundle"), "decoder", image_cfg, image_net)
    for stage, produced in (("decoder-video", "decoder"), ("interpolation", "interpolation")):
        cfg, net = initial_network(TrainJob(stage=stage, data=("unused",), output="unused", config=CONFIG,
                                            preset=str(path), init=str(tmp_path / "bundle")))
        save_stage(str(tmp_path / "video"), produced, cfg, net)
        saved = load_stage(str(tmp_path / "video"), produced)[0].diffusion
        assert (saved.frame_noise_shared, saved.sampling_shared, saved.sampling_progressive) == (0.4, 0.8, 0.95), stage
        drift = (0.01, 0.03) if stage == "decoder-video" else ()
        assert (saved.frame_noise_flow, saved.sample_frame_noise_drift) == (True, drift), stage


def test_video_stages_give_temporal_layers_their_own_learning_rate(tiny_config):
    from stages.unet import VideoUNet
    from workflows.train import _param_groups

    unet = tiny_config.decoder.unet
    net = VideoUNet(dataclasses.replace(unet, temporal=True))
    job = TrainJob(stage="decoder-video", data=("unused",), output="unused", preset="unused",
                   config=dataclasses.replace(CONFIG, temporal_lr_scale=4.0))
    spatial, temporal = _param_groups(net, job)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in temporal["params"]} == set(temporal_parameter_names(net))
    assert len(spatial["params"]) + len(temporal["params"]) == len(list(net.parameters()))
    assert (spatial["lr_scale"], temporal["lr_scale"]) == (1.0, 4.0)
    # an image stage has no temporal layers: one group at the base rate
    image = TrainJob(stage="decoder", data=("unused",), output="unused", preset="unused", config=job.config)
    assert [g["lr_scale"] for g in _param_groups(VideoUNet(dataclasses.replace(unet, temporal=False)), image)] == [1.0]
    with pytest.raises(ConfigError, match="temporal_lr_scale"):
        TrainConfig(temporal_lr_scale=0)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        TrainConfig(min_snr_gamma=-1)


def test_fps_reaches_the_temporal_layers_from_video_fine_tuning_on(tiny_config, tmp_path):
    """With the preset's ``temporal_fps``, the image decoder is a plain 2D network; decoder-video inflates it
    with fps-reading temporal layers that start as no-ops, and ↑F inherits them from D^t."""
    from stages.checkpoint import save_stage
    from stages.config import dump_yaml
    from workflows.train import initial_network

    unet = dataclasses.replace(tiny_config.decoder.unet, temporal_fps=True)
    preset = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, unet=unet))
    path = tmp_path / "preset.yaml"
    path.write_text(dump_yaml(preset))
    job = dict(data=("unused",), output="unused", config=CONFIG, preset=str(path))
    image_cfg, image_net = initial_network(TrainJob(stage="decoder", **job))
    assert not image_cfg.unet.temporal and not image_cfg.unet.temporal_fps
    save_stage(str(tmp_path / "image"), "decoder", image_cfg, image_net)
    cfg, net = initial_network(TrainJob(stage="decoder-video", init=str(tmp_path / "image"), **job))
    assert cfg.unet.temporal_fps and any(".temporal_fps." in n for n in temporal_parameter_names(net))
    x = torch.randn(1, 3, 4, 8, 8)
    kw = {"image_embeds": torch.randn(1, 32), "fps": torch.tensor([6.0])}
    with torch.no_grad():
        frames = torch.cat([image_net.eval()(x[:, :, i : i + 1], torch.tensor([500]), **kw) for i in range(4)], 2)
        assert (net.eval()(x, torch.tensor([500]), **kw) - frames).abs().max() < 1e-5
    save_stage(str(tmp_path / "video"), "decoder", cfg, net)
    interp_cfg, _ = initial_network(TrainJob(stage="interpolation", init=str(tmp_path / "video"), **job))
    assert interp_cfg.unet.temporal_fps
