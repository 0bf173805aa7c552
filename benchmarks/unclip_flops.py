"""Parameters and FLOPs of an imported unCLIP cascade at Karlo v1 alpha's sizes, counted, not measured.

    python benchmarks/unclip_flops.py

The networks are built on PyTorch's meta device (no memory, no weights) with Karlo's layout in diffusers
(kakaobrain/karlo configs: prior 1B with ViT-L/14's d = 768, decoder 900M at 64² with learned variance,
two 64² -> 256² upsamplers), inflated as the importer inflates them, and one forward pass of each is
counted by torch.utils.flop_counter (matmuls and convolutions; 1 multiply-add = 2 FLOPs). The figures in
docs/unclip.md come from this script; times there divide them by an assumed sustained throughput.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages import unclip
from stages.config import DecoderConfig, SRLowConfig
from workflows.importers.unclip import _unet_config

KARLO_DECODER = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=1536, attention_head_dim=64,
    resnet_time_scale_shift="scale_shift", class_embed_type="identity")
KARLO_SR = dict(
    sample_size=256, in_channels=6, out_channels=3, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4,
    add_attention=False, resnet_time_scale_shift="scale_shift")


def count(module: torch.nn.Module, *args, **kwargs) -> tuple[int, float]:
    """(parameters, FLOPs of one forward pass)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    return sum(p.numel() for p in module.parameters()), counter.get_total_flops()


def main() -> None:
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    meta = torch.device("meta")
    with meta:
        text = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, projection_dim=768, intermediate_size=3072,
                                                          num_attention_heads=12, num_hidden_layers=12))
        prior = PriorTransformer(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768)
        dec2d, sr2d = UNet2DConditionModel(**KARLO_DECODER), UNet2DModel(**KARLO_SR)
        dcfg = DecoderConfig(size=64, image_embed_dim=768, unet=_unet_config(KARLO_DECODER, kernel=3, heads=8),
                             conditioning="unclip")
        decoder = unclip.build_network("decoder", dcfg, dec2d)
        scfg = SRLowConfig(in_size=64, out_size=256, unet=_unet_config(KARLO_SR, kernel=3, heads=8), noise_level=0,
                           low_res="unclip", final_network=True)
        sr = unclip.build_network("sr_low", scfg, sr2d)
    rows = [("CLIP text (ViT-L/14)", *count(text, input_ids=torch.zeros(1, 77, dtype=torch.long, device=meta)))]
    rows.append(("prior", *count(prior, torch.zeros(1, 768, device=meta), 10, proj_embedding=torch.zeros(1, 768, device=meta),
                                 encoder_hidden_states=torch.zeros(1, 77, 768, device=meta),
                                 attention_mask=torch.ones(1, 77, dtype=torch.bool, device=meta))))
    text_cond = dict(text_embeds=torch.zeros(1, 768, device=meta), text_hidden=torch.zeros(1, 77, 768, device=meta),
                     text_mask=torch.ones(1, 77, dtype=torch.bool, device=meta))
    for frames in (1, 16, 76):
        rows.append((f"D^t, {frames} frame(s) 64²", *count(decoder, torch.zeros(1, 3, frames, 64, 64, device=meta),
                                                             torch.tensor([10], device=meta),
                                                             image_embeds=torch.zeros(1, 768, device=meta),
                                                             fps=torch.zeros(1, device=meta), **text_cond)))
    for frames in (1, 76):
        rows.append((f"SR_l^t (one of two), {frames} frame(s) 256²",
                     *count(sr.first, torch.zeros(1, 3, frames, 256, 256, device=meta), torch.tensor([10], device=meta),
                            cond_frames=torch.zeros(1, 3, frames, 256, 256, device=meta),
                            noise_level=torch.zeros(1, device=meta))))
    print(f"{'network, one forward pass':45s} {'parameters':>12s} {'TFLOPs':>10s}")
    for name, params, flops in rows:
        print(f"{name:45s} {params / 1e6:10.0f} M {flops / 1e12:10.3f}")


if __name__ == "__main__":
    main()
