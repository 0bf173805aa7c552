"""``mav import unclip``: a diffusers unCLIP pipeline directory (Karlo's layout) -> a checkpoint bundle.

    mav import unclip /data/karlo-v1-alpha --output s3://bucket/models/karlo-video --verify
    mav import unclip /data/karlo-v1-alpha --output models/karlo-video --sr-high models/my-sr/ --preset paper

The pipeline's components map onto the cascade's stages (docs/unclip.md):

    text_encoder + tokenizer            -> clip     (transformers' CLIP, kept as it is: stages.unclip)
    prior + prior_scheduler             -> prior    (PriorTransformer, its clip_mean/clip_std, sampler unclip)
    decoder + text_proj + scheduler     -> decoder  (D^t: inflated, temporal layers at identity, fps at zero)
    the same, 4 input channels at zero  -> interpolation (↑F)
    super_res_first/last + scheduler    -> sr_low   (SR_l^t: both networks, the last for the final step)
    --sr-high BUNDLE_OR_DIR, or fresh   -> sr_high  (unCLIP has no 256 -> 768 stage)

Everything is read and checked before anything is written: a bad source leaves the output untouched.
Weights are read from safetensors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys

import fsspec
import safetensors.torch
import torch
from torch import nn

from stages import cascade, unclip
from stages.checkpoint import CONFIG_FILE, load_stage, save_stage
from stages.config import (STAGE_NAMES, CascadeConfig, ClipConfig, ConfigError, DecoderConfig, DiffusionConfig,
                           InterpolationConfig, PriorConfig, SRHighConfig, SRLowConfig, UNetConfig)
from stages.errors import UserError
from stages.fsio import join, read_bytes
from stages.unet import widen_input
from workflows.presets import load_preset

log = logging.getLogger(__name__)

# Component -> the classes model_index.json may name for it.
COMPONENTS = {
    "text_encoder": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "prior": ("PriorTransformer",),
    "prior_scheduler": ("UnCLIPScheduler",),
    "decoder": ("UNet2DConditionModel",),
    "text_proj": ("UnCLIPTextProjModel",),
    "decoder_scheduler": ("UnCLIPScheduler",),
    "super_res_first": ("UNet2DModel",),
    "super_res_last": ("UNet2DModel",),
    "super_res_scheduler": ("UnCLIPScheduler",),
}
WEIGHTS = {"text_encoder": "model.safetensors"}  # transformers' name; diffusers' below
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# The PriorTransformer settings stages.prior.PriorNet builds with (the rest are its sizes).
PRIOR_LAYOUT = {"additional_embeddings": 4, "added_emb_type": "prd", "encoder_hid_proj_type": "linear",
                "time_embed_act_fn": "silu", "norm_in_type": None, "embedding_proj_norm_type": None,
                "time_embed_dim": None, "embedding_proj_dim": None, "clip_embed_dim": None}
# unCLIP's sampling defaults (diffusers' UnCLIPPipeline.__call__): steps and guidance per stage.
PRIOR_STEPS, DECODER_STEPS, SR_STEPS = 25, 25, 7
PRIOR_GUIDANCE, DECODER_GUIDANCE = 4.0, 8.0


class UnclipImportError(UserError):
    """A source that is not an importable unCLIP pipeline; the message says what to do."""


# -- reading the source ----------------------------------------------------------------------------


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _json(src: str, *parts: str) -> dict:
    url = join(src, *parts)
    try:
        return json.loads(read_bytes(url))
    except FileNotFoundError:
        raise UnclipImportError(f"{src}: no {'/'.join(parts)}; is this an unCLIP pipeline directory "
                                "(diffusers' save_pretrained layout)?") from None
    except (OSError, ValueError) as e:
        raise UnclipImportError(f"{src}: cannot read {'/'.join(parts)}: {e}") from None


def _state(src: str, component: str) -> dict[str, torch.Tensor]:
    """A component's weights, from safetensors only (one file or shards listed in an index); component
    "": a transformers model's own directory ``src``."""
    name = WEIGHTS.get(component, "model.safetensors" if not component else DIFFUSERS_WEIGHTS)
    url = join(src, component, name)
    try:
        if _exists(url):
            return safetensors.torch.load(read_bytes(url))
        index = url + ".index.json"
        if _exists(index):
            shards = sorted(set(json.loads(read_bytes(index))["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(safetensors.torch.load(read_bytes(join(src, component, shard))))
            return state
        fs, path = fsspec.core.url_to_fs(join(src, component))
        pickled = [p for p in (fs.ls(path, detail=False) if fs.exists(path) else []) if p.endswith((".bin", ".pt", ".ckpt"))]
    except UnclipImportError:
        raise
    except Exception as e:  # safetensors' own error type for a corrupt file
        raise UnclipImportError(f"{src}: cannot read {component}/{name}: {e}") from None
    if pickled:
        raise UnclipImportError(
            f"{src}: {component} has only pickled weights ({pickled[0].rsplit('/', 1)[-1]}), which are never "
            f"unpickled here; convert the pipeline once where you trust the file: UnCLIPPipeline.from_pretrained(SRC)"
            f".save_pretrained(NEW, safe_serialization=True), then import NEW")
    raise UnclipImportError(f"{src}: no {component}/{name}")


def _load(src: str, component: str, module: nn.Module) -> nn.Module:
    """``module`` (built from the component's config) with the component's weights, strictly."""
    state = _state(src, component)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UnclipImportError(f"{src}: {component} weights do not match its config.json: "
                                f"{lines[1] if len(lines) > 1 else lines[0]}") from None
    return module.eval()


def _diffusers_model(src: str, component: str, cls) -> nn.Module:
    config = _json(src, component, "config.json")
    try:
        model = cls.from_config(config)
    except Exception as e:  # diffusers raises several types for a config it cannot build
        raise UnclipImportError(f"{src}: {component}/config.json does not build a {cls.__name__}: {e}") from None
    return _load(src, component, model)


def read_model_index(src: str) -> dict:
    """model_index.json, checked: an UnCLIPPipeline with every component of the expected class."""
    index = _json(src, "model_index.json")
    if index.get("_class_name") != "UnCLIPPipeline":
        raise UnclipImportError(f"{src}: model_index.json describes a {index.get('_class_name')!r}, not an "
                                "UnCLIPPipeline")
    for component, classes in COMPONENTS.items():
        entry = index.get(component)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
            raise UnclipImportError(f"{src}: model_index.json has no {component} component; an unCLIP pipeline "
                                    f"has {', '.join(COMPONENTS)}")
        if entry[1] not in classes:
            raise UnclipImportError(f"{src}: model_index.json names {entry[1]} for {component}; expected "
                                    f"{' or '.join(classes)}")
    return index


def _tokenizer(src: str):
    import os
    import tempfile

    transformers = unclip.require_transformers()
    fs, path = fsspec.core.url_to_fs(join(src, "tokenizer"))
    if not fs.exists(path):
        raise UnclipImportError(f"{src}: no tokenizer directory")
    with tempfile.TemporaryDirectory() as d:
        for p in fs.ls(path, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith((".json", ".txt")):
                with open(os.path.join(d, name), "wb") as f:
                    f.write(fs.cat_file(p))
        try:
            return transformers.CLIPTokenizer.from_pretrained(d)
        except Exception as e:  # transformers' several error types for a tokenizer it cannot read
            raise UnclipImportError(f"{src}: cannot read the tokenizer: {e}") from None


def _scheduler(src: str, component: str, *, steps: int, guidance: float) -> DiffusionConfig:
    c = _json(src, component, "scheduler_config.json")
    try:
        return DiffusionConfig(
            sampler="unclip", train_timesteps=int(c.get("num_train_timesteps", 1000)),
            beta_schedule=c.get("beta_schedule", "squaredcos_cap_v2"), prediction_type=c.get("prediction_type", "epsilon"),
            clip_sample=bool(c.get("clip_sample", True)), clip_sample_range=float(c.get("clip_sample_range", 1.0)),
            variance="learned_range" if c.get("variance_type") == "learned_range" else "fixed", steps=steps,
            guidance=guidance)
    except ConfigError as e:
        raise UnclipImportError(f"{src}: {component}/scheduler_config.json: {e}") from None


def _unet_config(c: dict, *, kernel: int, heads: int, temporal: bool = True) -> UNetConfig:
    """The stage config's description of a diffusers 2D U-Net's config (the network itself is built from
    that config, saved beside the weights as unet2d.json)."""
    channels = tuple(int(x) for x in c["block_out_channels"])
    head_dim = c.get("attention_head_dim") or 8
    head_dim = head_dim[0] if isinstance(head_dim, (list, tuple)) else head_dim
    return UNetConfig(
        block_out_channels=channels, attention=tuple("Attn" in t for t in c["down_block_types"]),
        layers_per_block=int(c["layers_per_block"]), attention_head_dim=int(head_dim),
        norm_num_groups=int(c.get("norm_num_groups") or 32), cross_attention_dim=c.get("cross_attention_dim"),
        temporal=temporal, temporal_kernel=kernel, temporal_heads=math.gcd(heads, *channels))


# -- the bundle --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Imported:
    """A bundle in memory: its config and one network per stage, and what the import had to say."""

    config: CascadeConfig
    modules: dict[str, nn.Module]
    notices: list[str]


def build_bundle(src: str, *, preset: str = "paper", sr_high: str | None = None,
                 image_encoder: str | None = None) -> Imported:
    """Read and check the unCLIP pipeline at ``src`` and map it onto the six stages (nothing is written).

    ``preset`` gives the video settings the image model lacks: keyframes, frame skip, frame noise,
    temporal-layer sizes and a fresh SR_h's. ``sr_high`` is a bundle with an sr_high stage or a diffusers
    UNet2DModel directory (an unCLIP-style upsampler: 6 input channels); None starts SR_h fresh.
    ``image_encoder`` is a transformers CLIPVisionModelWithProjection directory (config.json,
    model.safetensors) kept beside the text encoder: the training stages read y_e of frames through it.
    """
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel

    transformers = unclip.require_transformers()
    read_model_index(src)
    video = load_preset(preset)
    kernel, heads = video.decoder.unet.temporal_kernel, video.decoder.unet.temporal_heads
    notices = []

    # CLIP_text: transformers' own model and tokenizer.
    text_cfg = _json(src, "text_encoder", "config.json")
    try:
        text_model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text_cfg))
    except Exception as e:
        raise UnclipImportError(f"{src}: text_encoder/config.json does not build a CLIPTextModelWithProjection: {e}") from None
    text_model = _load(src, "text_encoder", text_model)
    tokenizer = _tokenizer(src)
    d = int(text_model.config.projection_dim)
    context = int(min(tokenizer.model_max_length, text_model.config.max_position_embeddings))
    clip_cfg = ClipConfig(kind="transformers", embed_dim=d, context_length=context)
    vision = None
    if image_encoder is not None:
        vision_json = _json(image_encoder, "config.json")
        vision_json = vision_json.get("vision_config", vision_json)  # a whole CLIPModel's config holds it
        try:
            vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision_json))
        except Exception as e:
            raise UnclipImportError(f"--image-encoder {image_encoder}: config.json does not build a "
                                    f"CLIPVisionModelWithProjection: {e}") from None
        if vision.config.projection_dim != d:
            raise UnclipImportError(f"--image-encoder {image_encoder}: projection_dim={vision.config.projection_dim}, "
                                    f"but the text encoder's is {d}")
        vision = _load(image_encoder, "", vision)
    clip = unclip.TransformersClip(clip_cfg, text_model, tokenizer, vision)

    # P.
    prior_json = _json(src, "prior", "config.json")
    odd = {k: prior_json.get(k) for k, v in PRIOR_LAYOUT.items() if prior_json.get(k, v) != v}
    if odd:
        raise UnclipImportError(f"{src}: prior/config.json sets {odd}; the prior stage builds PriorTransformer with "
                                f"{PRIOR_LAYOUT}")
    if prior_json.get("embedding_dim") != d or prior_json.get("num_embeddings") != context:
        raise UnclipImportError(f"{src}: the prior's embedding_dim={prior_json.get('embedding_dim')} and num_embeddings="
                                f"{prior_json.get('num_embeddings')} must equal CLIP's projection_dim={d} and context {context}")
    prior_cfg = PriorConfig(embed_dim=d, num_tokens=context, layers=int(prior_json["num_layers"]),
                            heads=int(prior_json["num_attention_heads"]), head_dim=int(prior_json["attention_head_dim"]),
                            diffusion=_scheduler(src, "prior_scheduler", steps=PRIOR_STEPS, guidance=PRIOR_GUIDANCE),
                            embedding_space="clip")
    if text_model.config.hidden_size != d:
        raise UnclipImportError(f"{src}: the text encoder's hidden_size={text_model.config.hidden_size} must equal its "
                                f"projection_dim={d} (the prior reads its hidden states as embeddings of that size)")
    prior = cascade.build_stage("prior", prior_cfg)
    prior.transformer = _diffusers_model(src, "prior", PriorTransformer)

    # D^t: the decoder with its text projection, inflated.
    dec2d = _diffusers_model(src, "decoder", UNet2DConditionModel)
    dc = dec2d.config
    if dc.in_channels != 3 or dc.out_channels not in (3, 6):
        raise UnclipImportError(f"{src}: the decoder takes {dc.in_channels} and gives {dc.out_channels} channels; "
                                "expected 3 and 3 (or 6 with learned variance)")
    proj_json = _json(src, "text_proj", "config.json")
    decoder_diffusion = _scheduler(src, "decoder_scheduler", steps=DECODER_STEPS, guidance=DECODER_GUIDANCE)
    if (dc.out_channels == 6) != (decoder_diffusion.variance == "learned_range"):
        raise UnclipImportError(f"{src}: the decoder gives {dc.out_channels} channels but decoder_scheduler's "
                                f"variance_type is {decoder_diffusion.variance}")
    if proj_json.get("clip_embeddings_dim") != d or proj_json.get("cross_attention_dim") != dc.cross_attention_dim:
        raise UnclipImportError(f"{src}: text_proj/config.json (clip_embeddings_dim={proj_json.get('clip_embeddings_dim')}, "
                                f"cross_attention_dim={proj_json.get('cross_attention_dim')}) does not fit CLIP ({d}) and "
                                f"the decoder ({dc.cross_attention_dim})")
    decoder_cfg = DecoderConfig(
        frames=video.decoder.frames, size=int(dc.sample_size), image_embed_dim=d,
        context_tokens=int(proj_json.get("clip_extra_context_tokens", 4)),
        unet=_unet_config(dict(dc), kernel=kernel, heads=heads), diffusion=decoder_diffusion,
        frame_noise=video.decoder.frame_noise, conditioning="unclip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STAGE_NAMES.index("decoder"))
        decoder = unclip.build_network("decoder", decoder_cfg, dec2d)
    _load(src, "text_proj", decoder.text_proj)

    # ↑F: the decoder with 4 more input channels (masked frames + mask) at zero.
    interpolation = widen_input(decoder, 4)
    interpolation_cfg = InterpolationConfig(
        skip=video.interpolation.skip, image_embed_dim=d, context_tokens=decoder_cfg.context_tokens,
        unet=decoder_cfg.unet, diffusion=dataclasses.replace(decoder_diffusion, guidance=1.0),
        frame_noise=video.interpolation.frame_noise, keep_given_frames=video.interpolation.keep_given_frames,
        conditioning="unclip")

    # SR_l^t: super_res_first for every step but the last, super_res_last for the last.
    first2d = _diffusers_model(src, "super_res_first", UNet2DModel)
    last2d = _diffusers_model(src, "super_res_last", UNet2DModel)
    if dict(first2d.config) != dict(last2d.config):
        raise UnclipImportError(f"{src}: super_res_first and super_res_last differ in config.json; the sr_low stage "
                                "holds two networks of one layout")
    sc = first2d.config
    if sc.in_channels != 6 or sc.out_channels != 3:
        raise UnclipImportError(f"{src}: super_res_first takes {sc.in_channels} and gives {sc.out_channels} channels; "
                                "expected 6 (noisy image + upsampled condition) and 3")
    sr_out = int(sc.sample_size)
    sr_low_cfg = SRLowConfig(
        in_size=decoder_cfg.size, out_size=sr_out, noise_level=0,
        unet=_unet_config(dict(sc), kernel=kernel, heads=heads),
        diffusion=_scheduler(src, "super_res_scheduler", steps=SR_STEPS, guidance=1.0),
        frame_noise=video.sr_low.frame_noise, low_res="unclip", final_network=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(STAGE_NAMES.index("sr_low"))
        sr_low = unclip.build_network("sr_low", sr_low_cfg, first2d, final_unet2d=last2d)

    sr_high_cfg, sr_high_net = _sr_high(src, sr_high, sr_low_cfg, video, kernel, heads, notices)
    try:
        config = CascadeConfig(clip=clip_cfg, prior=prior_cfg, decoder=decoder_cfg, interpolation=interpolation_cfg,
                               sr_low=sr_low_cfg, sr_high=sr_high_cfg)
    except ConfigError as e:
        raise UnclipImportError(f"{src}: the imported stages do not chain: {e}") from None
    modules = {"clip": clip, "prior": prior, "decoder": decoder, "interpolation": interpolation, "sr_low": sr_low,
               "sr_high": sr_high_net}
    return Imported(config=config, modules=modules, notices=notices)


def _sr_high(src, sr_high, sr_low_cfg, video, kernel, heads, notices):
    """SR_h: from a bundle's sr_high stage, from a diffusers UNet2DModel directory, or fresh."""
    from diffusers import UNet2DModel

    size = sr_low_cfg.out_size
    if sr_high is None:
        ratio = video.sr_high.out_size / video.sr_high.in_size
        cfg = dataclasses.replace(video.sr_high, in_size=size, out_size=round(size * ratio))
        notices.append(f"sr_high ({size}² -> {cfg.out_size}²) is freshly initialised: unCLIP has no such stage; train it "
                       f"(mav train sr-high) or import with --sr-high, until then its frames are noise")
        return cfg, cascade.build_stage("sr_high", cfg)
    if _exists(join(sr_high, "sr_high", CONFIG_FILE)):
        cfg, net = load_stage(sr_high, "sr_high")
        if cfg.in_size != size:
            raise UnclipImportError(f"--sr-high {sr_high}: its sr_high takes {cfg.in_size}² frames; the imported "
                                    f"sr_low gives {size}²")
        return cfg, net
    c = _json(sr_high, "config.json")
    if c.get("_class_name") != "UNet2DModel" or c.get("in_channels") != 6 or c.get("out_channels") != 3:
        raise UnclipImportError(f"--sr-high {sr_high}: expected a bundle with an sr_high stage or a diffusers "
                                "UNet2DModel directory taking 6 channels (noisy image + upsampled condition) to 3")
    if int(c.get("sample_size") or 0) <= size:
        raise UnclipImportError(f"--sr-high {sr_high}: its sample_size {c.get('sample_size')} must exceed {size}")
    unet = UNet2DModel.from_config(c)
    state = _state_of_dir(sr_high)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UnclipImportError(f"--sr-high {sr_high}: weights do not match its config.json: "
                                f"{str(e).strip().splitlines()[-1].strip()}") from None
    cfg = SRHighConfig(in_size=size, out_size=int(c["sample_size"]), noise_level=0,
                       unet=_unet_config(c, kernel=kernel, heads=heads, temporal=False),
                       diffusion=sr_low_cfg.diffusion, low_res="unclip", frame_batch=video.sr_high.frame_batch)
    return cfg, cascade.build_stage("sr_high", cfg, unet2d=unet)


def _state_of_dir(directory: str) -> dict[str, torch.Tensor]:
    url = join(directory, DIFFUSERS_WEIGHTS)
    if not _exists(url):
        raise UnclipImportError(f"--sr-high {directory}: no {DIFFUSERS_WEIGHTS} (safetensors weights are required)")
    return safetensors.torch.load(read_bytes(url))


def import_unclip(src: str, output: str, *, preset: str = "paper", sr_high: str | None = None,
                  image_encoder: str | None = None) -> Imported:
    """Build the bundle (:func:`build_bundle`) and, only if that succeeded, write it to ``output``."""
    if _exists(join(output, "clip", CONFIG_FILE)):
        raise UnclipImportError(f"--output {output} already holds a bundle; choose another --output")
    imported = build_bundle(src, preset=preset, sr_high=sr_high, image_encoder=image_encoder)
    for name in STAGE_NAMES:
        save_stage(output, name, getattr(imported.config, name), imported.modules[name])
    return imported


# -- the image-mode check against diffusers itself ------------------------------------------------


def verify(src: str, bundle: str, *, prompt: str = "a photo of a cat", seed: int = 0, steps: int = 3,
           dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """Largest absolute differences between diffusers' UnCLIPPipeline built from ``src``'s components and
    the bundle's cascade in image mode (f = 1, temporal layers idle), both in ``dtype``, for one prompt:
    ``image_embeds`` (P's y_e), ``decoder`` (the 64² image, [-1, 1]), ``sr`` (the SR image, [-1, 1]) and
    ``output`` (the pipeline's returned image, [0, 1], against ours mapped the same way).

    Both start every stage from the same initial noise (drawn here, in float32) and draw every step's
    noise from one generator in the pipeline's order (prior, decoder, upsampler). In float32 the first
    upsampler step, x_0 = (x_T − √(1 − ᾱ_T) ε) / √ᾱ_T with ᾱ_T ≈ 2e−9 (Karlo's schedule), multiplies the
    decoder's round-off by 1/√ᾱ_T wherever x_0 stays inside the clamp: float64 shows the mapping is exact.
    ``src`` must be a local directory (from_pretrained reads it).
    """
    import diffusers
    from diffusers import UnCLIPPipeline
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    transformers = unclip.require_transformers()
    if "://" in src and not src.startswith("file://"):
        raise UnclipImportError(f"--verify needs the pipeline in a local directory, not {src}")
    # Each component by its own class's from_pretrained (diffusers records text_proj's library as
    # "diffusers", where UnCLIPPipeline.from_pretrained cannot find it again), then the pipeline itself.
    index = read_model_index(src)
    libraries = {"diffusers": diffusers, "transformers": transformers}
    components = {}
    for name in COMPONENTS:
        cls = UnCLIPTextProjModel if name == "text_proj" else getattr(libraries[index[name][0]], index[name][1])
        components[name] = cls.from_pretrained(src, subfolder=name)
    pipe = UnCLIPPipeline(**components).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, torch.Tensor] = {}

    def record(name, step):
        def wrapped(*args, **kwargs):
            out = step(*args, **kwargs)
            seen[name] = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            return out
        return wrapped

    pipe.text_proj.register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__("image_embeds", kwargs["image_embeddings"]), with_kwargs=True)
    pipe.decoder_scheduler.step = record("decoder", pipe.decoder_scheduler.step)
    pipe.super_res_scheduler.step = record("sr", pipe.super_res_scheduler.step)

    loaded = {name: load_stage(bundle, name) for name in ("clip", "prior", "decoder", "sr_low")}
    d, size, big = loaded["prior"][1].embed_dim, loaded["decoder"][0].size, loaded["sr_low"][0].out_size
    init = torch.Generator().manual_seed(seed)
    noise = {"prior": torch.randn(1, d, generator=init), "decoder": torch.randn(1, 3, size, size, generator=init),
             "sr": torch.randn(1, 3, big, big, generator=init)}
    reference = pipe(prompt, generator=torch.Generator().manual_seed(seed + 1), prior_num_inference_steps=steps,
                     decoder_num_inference_steps=steps, super_res_num_inference_steps=steps,
                     prior_guidance_scale=loaded["prior"][0].diffusion.guidance,
                     decoder_guidance_scale=loaded["decoder"][0].diffusion.guidance,
                     prior_latents=noise["prior"].to(dtype), decoder_latents=noise["decoder"].to(dtype),
                     super_res_latents=noise["sr"].to(dtype), output_type="np").images

    ours = run_image_mode(loaded, prompt, noise, generator=torch.Generator().manual_seed(seed + 1), steps=steps,
                          dtype=dtype)
    out = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    mine = (ours["sr"].double() * 0.5 + 0.5).clamp(0, 1)
    return {
        "image_embeds": float((seen["image_embeds"] - ours["image_embeds"]).abs().max()),
        "decoder": float((seen["decoder"].clamp(-1, 1) - ours["decoder"].clamp(-1, 1)).abs().max()),
        "sr": float((seen["sr"] - ours["sr"]).abs().max()),
        "output": float((out - mine).abs().max()),
    }


def _encode(clip: nn.Module, prompt: str) -> dict[str, torch.Tensor]:
    """cascade.encode_text in the CLIP's own precision (the runners hand float32 on)."""
    tokens, _ = clip.tokenize([prompt])
    embeds, hidden, mask = clip.encode_text(tokens)
    return {"text_embeds": embeds, "text_hidden": hidden, "text_mask": mask}


def run_image_mode(loaded: dict, prompt: str, noise: dict[str, torch.Tensor], *, generator: torch.Generator,
                   steps: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The bundle's P -> D -> SR_l (``loaded``: stage -> (config, network)) on one prompt as an image
    (f = 1) in ``dtype``, each stage from ``noise[stage]`` and every step's noise from ``generator`` in
    unCLIP's order: y_e ``1 d``, the decoder's image and the SR image ``1 3 h w``."""
    clip, prior = (loaded[k][1].to(dtype) for k in ("clip", "prior"))
    (dcfg, decoder), (scfg, sr) = loaded["decoder"], loaded["sr_low"]
    decoder, sr = decoder.to(dtype), sr.to(dtype)
    gens = [generator]
    with torch.inference_mode():
        text, negative = _encode(clip, prompt), _encode(clip, "")
        y = cascade.generate_image_embeds(prior, text, negative, [0], steps=steps, generators=gens, noise=noise["prior"])
        image = cascade.decode(decoder, dataclasses.replace(dcfg, frames=1), y, torch.zeros(1), [0], steps=steps,
                               text=text, negative=negative, generators=gens, noise=noise["decoder"][:, :, None])
        high = cascade.super_resolve_video(sr, scfg, image, [0], steps=steps, generators=gens,
                                           noise=noise["sr"][:, :, None])
    return {"image_embeds": y, "decoder": image[:, :, 0], "sr": high[:, :, 0]}


# -- the command ----------------------------------------------------------------------------------

VERIFY_TOLERANCE = 1e-6  # largest difference allowed, in float64; a wrong mapping differs by far more


def add_parser(sub) -> None:
    imp = sub.add_parser("import", help="import a pretrained model into a checkpoint bundle")
    kinds = imp.add_subparsers(dest="kind", required=True, metavar="KIND")
    p = kinds.add_parser("unclip", help="a diffusers unCLIP pipeline directory (Karlo's layout)")
    p.add_argument("src", metavar="SRC", help="the pipeline directory/URL (model_index.json and component folders)")
    p.add_argument("--output", required=True, metavar="BUNDLE", help="the checkpoint bundle to write (directory/URL)")
    p.add_argument("--sr-high", metavar="BUNDLE_OR_DIR",
                   help="SR_h from a bundle's sr_high stage or a diffusers UNet2DModel directory (default: fresh)")
    p.add_argument("--image-encoder", metavar="DIR",
                   help="a transformers CLIPVisionModelWithProjection directory matching the text encoder (Karlo: "
                        "openai/clip-vit-large-patch14), kept for training the video stages (inference needs none)")
    p.add_argument("--preset", default="paper",
                   help="video settings (keyframes, frame skip, frame noise, temporal layers, a fresh SR_h's sizes) "
                        "from this preset name or YAML path (default paper)")
    p.add_argument("--verify", action="store_true",
                   help="then check the bundle in image mode against diffusers' UnCLIPPipeline on SRC (local SRC)")
    p.add_argument("--verify-steps", type=int, default=3, help="sampling steps per stage of the check (default 3)")
    p.set_defaults(func=cmd_import_unclip)


def cmd_import_unclip(args: argparse.Namespace) -> int:
    if args.verify_steps < 2:
        raise UnclipImportError("--verify-steps must be >= 2 (UnCLIPScheduler spaces at least two steps)")
    imported = import_unclip(args.src, args.output, preset=args.preset, sr_high=args.sr_high,
                             image_encoder=args.image_encoder)
    c = imported.config
    print(f"wrote {args.output}: decoder {c.decoder.size}² ({c.decoder.frames} keyframes), ↑F skip "
          f"{c.interpolation.skip}, sr_low {c.sr_low.in_size}² -> {c.sr_low.out_size}², sr_high {c.sr_high.in_size}² -> "
          f"{c.sr_high.out_size}²", file=sys.stderr)
    for notice in imported.notices:
        print(f"notice: {notice}", file=sys.stderr)
    if not args.verify:
        return 0
    diffs = verify(args.src, args.output, steps=args.verify_steps)  # float64: only round-off may remain
    print("image-mode check against diffusers' UnCLIPPipeline, largest absolute difference: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()), file=sys.stderr)
    worst = max(diffs.values())
    if worst > VERIFY_TOLERANCE:
        raise UnclipImportError(f"the imported bundle differs from diffusers' pipeline by {worst:.2e} "
                                f"(more than {VERIFY_TOLERANCE:g}); the import is not faithful")
    print("check passed", file=sys.stderr)
    return 0

