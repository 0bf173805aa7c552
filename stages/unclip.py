"""The parts of an imported unCLIP cascade (DALL-E 2; Karlo's diffusers layout) that the stages hold.

* :class:`TransformersClip`: CLIP_text as unCLIP was trained with it, transformers'
  ``CLIPTextModelWithProjection`` and ``CLIPTokenizer`` behind the interface of :class:`stages.clip.ClipModel`
  (``tokenize``, ``encode_text``; ``encode_image`` when a ``CLIPVisionModelWithProjection`` was imported
  beside it). x_e is the projected end-token feature (``text_embeds``); the per-token features the prior
  and the decoder read are the unprojected last hidden states, as unCLIP's pipeline passes them.
* :func:`text_proj`: diffusers' ``UnCLIPTextProjModel`` sized for a decoder: it turns (y_e, x_e, text
  tokens) into the decoder's additive timestep embedding and its context (DALL-E 2, Sec. 2.1).
* :class:`FinalStepUNet`: unCLIP's two super-resolution networks as one network, ``super_res_last`` for
  the final sampling step (t = 0) and ``super_res_first`` for every other.

transformers is an optional dependency (``pip install -e '.[unclip]'``), imported only here.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from stages.config import ClipConfig
from stages.errors import UserError
from stages.unet import VideoUNet

TEXT_ENCODER_FILE = "text_encoder.json"
IMAGE_ENCODER_FILE = "image_encoder.json"
TOKENIZER_DIR = "tokenizer"
# OpenAI CLIP's image normalisation (CLIPImageProcessor's defaults, and open_clip's for OpenAI weights).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TransformersMissing(UserError):
    """An unCLIP bundle or import without the optional transformers package."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise TransformersMissing("this needs the transformers package: pip install -e '.[unclip]'") from None
    return transformers


def text_proj(*, clip_dim: int, time_embed_dim: int, cross_attention_dim: int, tokens: int) -> nn.Module:
    """A fresh ``UnCLIPTextProjModel``: y_e and x_e (``clip_dim``) into the timestep embedding, y_e into
    ``tokens`` context tokens beside the projected, normalised text tokens."""
    require_transformers()  # diffusers' unCLIP package imports it
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    return UnCLIPTextProjModel(clip_extra_context_tokens=tokens, clip_embeddings_dim=clip_dim,
                               time_embed_dim=time_embed_dim, cross_attention_dim=cross_attention_dim)


class TransformersClip(nn.Module):
    """CLIP_text from transformers (and, optionally, the image tower used in training)."""

    def __init__(self, cfg: ClipConfig, text: nn.Module, tokenizer, vision: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = text
        self.vision = vision
        self.tokenizer = tokenizer
        self.context_length = cfg.context_length
        self.embed_dim = int(text.config.projection_dim)

    @classmethod
    def from_files(cls, cfg: ClipConfig, files: dict[str, bytes]) -> TransformersClip:
        """Build (weights not loaded) from the JSON configs and tokenizer files of a bundle's clip stage,
        ``files`` keyed by their name in it (:meth:`config_files`)."""
        transformers = require_transformers()
        text_cfg = transformers.CLIPTextConfig(**json.loads(files[TEXT_ENCODER_FILE]))
        text = transformers.CLIPTextModelWithProjection(text_cfg)
        vision = None
        if IMAGE_ENCODER_FILE in files:
            vision_cfg = transformers.CLIPVisionConfig(**json.loads(files[IMAGE_ENCODER_FILE]))
            vision = transformers.CLIPVisionModelWithProjection(vision_cfg)
        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                if name.startswith(TOKENIZER_DIR + "/"):
                    with open(os.path.join(d, os.path.basename(name)), "wb") as f:
                        f.write(data)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(d)
        return cls(cfg, text.eval(), tokenizer, vision.eval() if vision is not None else None)

    def config_files(self) -> dict[str, bytes]:
        """The files besides the weights that rebuild this module: configs and the tokenizer."""
        files = {TEXT_ENCODER_FILE: self.text.config.to_json_string().encode()}
        if self.vision is not None:
            files[IMAGE_ENCODER_FILE] = self.vision.config.to_json_string().encode()
        with tempfile.TemporaryDirectory() as d:
            self.tokenizer.save_pretrained(d)
            for name in sorted(os.listdir(d)):
                with open(os.path.join(d, name), "rb") as f:
                    files[f"{TOKENIZER_DIR}/{name}"] = f.read()
        return files

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Prompts -> x̂ as ``b n`` token ids (the tokenizer's start, BPE, end and padding) and whether each was cut."""
        n = self.context_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        truncated = [len(row) > n for row in self.tokenizer(prompts).input_ids]
        return ids, truncated

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x̂ ``b n`` -> (x_e ``b d``, the last hidden states ``b n w``, token mask ``b n``: up to the first end token)."""
        out = self.text(input_ids=tokens)
        eos = (tokens == self.tokenizer.eos_token_id).int().argmax(dim=-1)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eos[:, None]
        return out.text_embeds, out.last_hidden_state, mask

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``b 3 h w`` in [-1, 1] -> y_e ``b d`` (unnormalised, as unCLIP's prior is trained on it)."""
        if self.vision is None:
            raise UserError("this CLIP stage is text-only (imported from an unCLIP pipeline): training a stage that "
                            "reads y_e of images needs CLIP's image tower; import with --image-encoder DIR")
        size = self.vision.config.image_size
        x = (images + 1) / 2
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return self.vision(pixel_values=(x - mean) / std).image_embeds


class FinalStepUNet(nn.Module):
    """Two super-resolution networks as one: ``last`` predicts at t = 0 (unCLIP's final sampling step,
    ``super_res_last``), ``first`` at every other t (``super_res_first``). Both take the same inputs."""

    def __init__(self, first: VideoUNet, last: VideoUNet) -> None:
        super().__init__()
        self.first = first
        self.last = last

    # What code reading a VideoUNet asks of a stage's network, answered by ``first`` (both are alike).
    cfg = property(lambda self: self.first.cfg)
    unet = property(lambda self: self.first.unet)
    cond_channels = property(lambda self: self.first.cond_channels)
    image_proj = property(lambda self: self.first.image_proj)
    fps_embed = property(lambda self: self.first.fps_embed)
    noise_level_embed = property(lambda self: self.first.noise_level_embed)
    temporal = property(lambda self: self.first.temporal)

    def set_temporal(self, enabled: bool) -> None:
        self.first.set_temporal(enabled)
        self.last.set_temporal(enabled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """As :meth:`VideoUNet.forward`; each sample goes through the network of its own t."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        final = t == 0
        if bool(final.all()):
            return self.last(x, t, **cond)
        if not bool(final.any()):
            return self.first(x, t, **cond)
        out = self.first(x, t, **cond)
        picked = {k: v[final] if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
        out[final] = self.last(x[final], t[final], **picked)
        return out


def build_network(name: str, cfg, unet2d: nn.Module | None = None, final_unet2d: nn.Module | None = None) -> nn.Module:
    """The U-Net network of stage ``name`` whose config asks for unCLIP's parts: a decoder or ↑F with
    ``conditioning: unclip`` (a :func:`text_proj` in place of y_e's own projections), a super-resolution
    stage with ``final_network`` (a :class:`FinalStepUNet` of ``unet2d`` and ``final_unet2d``, by default a
    copy of ``unet2d``)."""
    import copy

    from stages.unet import build_unet2d

    if name in ("decoder", "interpolation"):
        cond_channels = 4 if name == "interpolation" else 0
        unet2d = unet2d if unet2d is not None else build_unet2d(cfg.unet, 3 + cond_channels)
        proj = text_proj(clip_dim=cfg.image_embed_dim, time_embed_dim=unet2d.time_embedding.linear_2.out_features,
                         cross_attention_dim=unet2d.config.cross_attention_dim, tokens=cfg.context_tokens)
        return VideoUNet(cfg.unet, cond_channels=cond_channels, fps_cond=True, unet2d=unet2d, text_proj=proj)
    if name in ("sr_low", "sr_high"):
        second = final_unet2d if final_unet2d is not None else copy.deepcopy(unet2d) if unet2d is not None else None
        return FinalStepUNet(VideoUNet(cfg.unet, cond_channels=3, noise_level_cond=True, unet2d=unet2d),
                             VideoUNet(cfg.unet, cond_channels=3, noise_level_cond=True, unet2d=second))
    raise ValueError(f"stage {name!r} has no unCLIP network")


def wants_unclip_network(cfg) -> bool:
    """Whether a U-Net stage's config asks for :func:`build_network`."""
    return getattr(cfg, "conditioning", "image") == "unclip" or getattr(cfg, "final_network", False)


def training_condition(net: nn.Module, clip: nn.Module, images: torch.Tensor, drop: torch.Tensor) -> dict:
    """An unCLIP-conditioned D^t's or ↑F's condition when fine-tuned on unlabeled video (no captions):
    y_e = CLIP_image of ``images`` (``b 3 h w``) as unCLIP's prior produces it (not normalised), replaced
    by the learned unconditional embedding where ``drop`` (``b``), and the empty prompt's text."""
    with torch.no_grad():
        y = clip.encode_image(images).float()
        tokens, _ = clip.tokenize([""] * len(images))
        embeds, hidden, mask = clip.encode_text(tokens.to(images.device))
    null = net.null_image_embeds(len(y)).to(y)
    return {"image_embeds": torch.where(drop.to(y.device)[:, None], null, y), "text_embeds": embeds.float(),
            "text_hidden": hidden.float(), "text_mask": mask}
