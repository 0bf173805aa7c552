"""The prior P: (x_e, x̂) -> y_e, a diffusion model over CLIP image embeddings (DALL-E 2's diffusion prior).

Built on ``diffusers.PriorTransformer``: the sequence is [projected text tokens, x_e, t, noisy y_e,
learned query] and the network predicts y_e itself (x_0 prediction). Embeddings are L2-normalised and
scaled by √d so each coordinate has unit variance, matching the N(0, I) of the diffusion process; an
imported unCLIP prior (``embedding_space: clip``) takes x_e as CLIP gives it and standardises y_e with its
own statistics instead (y_e = x σ + μ, diffusers' ``post_process_latents``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stages.config import PriorConfig


class PriorNet(nn.Module):
    def __init__(self, cfg: PriorConfig, *, embed_dim: int, num_tokens: int) -> None:
        super().__init__()
        from diffusers import PriorTransformer

        self.cfg = cfg
        self.embed_dim = embed_dim
        self.transformer = PriorTransformer(
            num_attention_heads=cfg.heads,
            attention_head_dim=cfg.head_dim,
            num_layers=cfg.layers,
            embedding_dim=embed_dim,
            num_embeddings=num_tokens,
            additional_embeddings=4,
            added_emb_type="prd",
            encoder_hid_proj_type="linear",
        )

    def scale(self, embeds: torch.Tensor) -> torch.Tensor:
        """A CLIP image embedding -> the diffusion space (unit norm × √d; clip: (y − μ) / σ)."""
        if self.cfg.embedding_space == "clip":
            t = self.transformer
            return (embeds.float() - t.clip_mean.float()) / t.clip_std.float()
        return F.normalize(embeds.float(), dim=-1) * math.sqrt(self.embed_dim)

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """The diffusion space -> a CLIP embedding y_e (unit norm; clip: x σ + μ)."""
        if self.cfg.embedding_space == "clip":
            return self.transformer.post_process_latents(x)
        return F.normalize(x, dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text_embeds: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """x: noisy scaled y_e ``b d``; text_embeds: x_e ``b d``; text_hidden: ``b n d``; text_mask: ``b n``."""
        return self.transformer(
            x,
            t,
            proj_embedding=(text_embeds if self.cfg.embedding_space == "clip" else self.scale(text_embeds)).to(x.dtype),
            encoder_hidden_states=text_hidden.to(x.dtype),
            attention_mask=text_mask.bool(),
            return_dict=False,
        )[0]
