"""CLIP_text (and the image tower used in training): open_clip's CLIP with its real BPE tokenizer.

x̂ = BPE(x) are the prompt's tokens; the text tower gives per-token features and the pooled,
projected text embedding x_e. The image tower gives y_e, the prior's target and the decoder's
condition during training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.config import ClipConfig


class ClipModel(nn.Module):
    """open_clip ``CLIP`` plus tokenization that reports truncation."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        self.cfg = cfg
        self.model = open_clip.CLIP(**cfg.open_clip_config())
        self.context_length = self.model.context_length
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.embed_dim = int(self.model.text_projection.shape[-1]) if isinstance(
            self.model.text_projection, torch.Tensor
        ) else self.model.text_projection.out_features

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Prompts -> x̂ as ``b n`` token ids (start, BPE tokens, end, zero padding) and whether each was cut."""
        sot = self.tokenizer.encoder["<start_of_text>"]
        eot = self.tokenizer.encoder["<end_of_text>"]
        tokens = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        truncated = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt)
            keep = self.context_length - 2
            truncated.append(len(ids) > keep)
            row = [sot, *ids[:keep], eot]
            tokens[i, : len(row)] = torch.tensor(row)
        return tokens, truncated

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x̂ ``b n`` -> (x_e ``b d``, projected per-token features ``b n d``, token mask ``b n``).

        x_e is exactly open_clip's ``encode_text`` (the end token's feature, projected).
        """
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        proj = m.text_projection
        hidden = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        eot = tokens.argmax(dim=-1)
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), eot]
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]
        return pooled, hidden, mask

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``b 3 h w`` in [-1, 1] -> y_e ``b d`` (unnormalised, as open_clip returns it)."""
        size = self.model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        x = (images + 1) / 2
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return self.model.encode_image((x - mean) / std)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Normalised image and text features and the logit scale, as open_clip's ClipLoss takes them."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens)[0], dim=-1)
        return img, txt, self.model.logit_scale.exp()
