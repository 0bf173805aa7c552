"""Cost of D^t and ↑F with either backbone, the U-Net or Latte (stages/latte.py): parameters and GFLOPs.

    .venv/bin/python benchmarks/latte_cost.py          # about a minute on 2 cores; figures go into BENCHMARKS.md

For the cpu and paper presets and their Latte twins (cpu-latte, paper-latte), and for every Latte variant,
patch embedding and condition injection at cpu-latte's sizes: parameters, GFLOPs of one network evaluation at the
stage's full shape (D^t: 16 keyframes; ↑F: 76 frames, batch 1), evaluations per sample (sampling steps, twice
where classifier-free guidance runs an unconditional pass) and GFLOPs per sample. Networks are built on the meta
device and FLOPs counted by torch.utils.flop_counter (matrix products and convolutions; no timing: see
stage_costs.py for seconds).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.cascade import build_stage
from workflows.presets import load_preset

PRESETS = ("cpu", "cpu-latte", "paper", "paper-latte")


def cost(stage: str, cfg, frames: int, size: int) -> tuple[int, float]:
    """(parameters, GFLOPs of one evaluation on ``1 3 frames size size``)."""
    with torch.device("meta"):
        net = build_stage(stage, cfg).eval()
        x = torch.zeros(1, 3, frames, size, size)
        kwargs = {"image_embeds": torch.zeros(1, cfg.image_embed_dim), "fps": torch.full((1,), 8.0)}
        if stage == "interpolation":
            kwargs["cond_frames"] = torch.zeros(1, 4, frames, size, size)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x, torch.full((1,), 500), **kwargs)
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops() / 1e9


def evaluations(cfg) -> int:
    return cfg.diffusion.steps * (2 if cfg.diffusion.guidance != 1.0 else 1)


def row(label: str, stage: str, cfg, frames: int, size: int) -> str:
    params, gflops = cost(stage, cfg, frames, size)
    n = evaluations(cfg)
    return f"| {label} | {stage} | {params:,} | {frames}×{size}² | {gflops:,.3g} | {n} | {gflops * n:,.4g} |"


def main() -> None:
    print("| preset | stage | parameters | one evaluation on | GFLOPs per evaluation | evaluations per sample "
          "| GFLOPs per sample |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name in PRESETS:
        preset = load_preset(name)
        size = preset.decoder.size
        print(row(f"`{name}` ({preset.decoder.backbone})", "decoder", preset.decoder, preset.decoder.frames, size),
              flush=True)
        print(row(f"`{name}` ({preset.interpolation.backbone})", "interpolation", preset.interpolation,
                  preset.output_frames, size), flush=True)
    print("\n| Latte at cpu-latte's sizes | stage | parameters | one evaluation on | GFLOPs per evaluation "
          "| evaluations per sample | GFLOPs per sample |")
    print("|---|---|---:|---|---:|---:|---:|")
    base = load_preset("cpu-latte").decoder
    settings = [dict(variant=v) for v in (1, 2, 3, 4)] + [dict(variant=1, patch_embedding="tubelet"),
                                                          dict(variant=1, conditioning="tokens")]
    for change in settings:
        cfg = dataclasses.replace(base, latte=dataclasses.replace(base.latte, **change))
        label = ", ".join(f"{k} {v}" for k, v in change.items())
        print(row(label, "decoder", cfg, cfg.frames, cfg.size), flush=True)


if __name__ == "__main__":
    main()
