"""``mav eval``'s pictures: the report's figures (report.png) and a sheet of sample frames (samples.png),
drawn with matplotlib, and the trained model's first videos playing side by side (samples.gif)."""

from __future__ import annotations

import io

import numpy as np

from workflows.shapes.world import prompt_target

MODEL_COLOURS = {"video": "tab:blue", "image_baseline": "tab:orange", "ground truth": "tab:gray"}
SHARES = [("seen", "colour_accuracy", "colour\nseen"), ("held_out", "colour_accuracy", "colour\nheld-out"),
          ("seen", "shape_accuracy", "shape\nseen"), ("held_out", "shape_accuracy", "shape\nheld-out"),
          ("overall", "colour_identity", "colour\nidentity"), ("overall", "shape_identity", "shape\nidentity"),
          ("overall", "present", "object\npresent"), ("overall", "one_object", "one\nobject")]
PER_FRAME = [("displacement_mean", "step\nmean"), ("displacement_var", "step\nstd"),
             ("acceleration_mean", "|2nd diff|\nmean"), ("largest_step", "largest\nstep")]
WHOLE_VIDEO = [("travel", "travel\nfirst-last"), ("reach", "reach\nfrom first"), ("straightness", "straight-\nness")]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bars(ax, title: str, names: list[str], series: list[tuple[str, list]]) -> None:
    """Grouped bars: one group per name, one bar per ``(label, values)`` series; a None value is no bar."""
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series):
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=label, color=MODEL_COLOURS[label])
    ax.set_xticks(x, names, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=len(series), frameon=False)


def plot(report: dict) -> bytes:
    """A PNG of the report's figures: grouped bars per model (seen / held-out prompts), and the motion
    figures (per frame; over the whole video) beside the ground truth's."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.6), layout="constrained")
    fig.suptitle(f"{report['checkpoint']}: {report['sampling']} sampling, output of {report['until']}")
    shares, per_frame, whole = fig.subplots(1, 3, width_ratios=(8, 4, 3))
    models = report["models"]
    _bars(shares, "text fidelity and identity across frames (share)", [n for _, _, n in SHARES],
          [(model, [m[group][key] for group, key, _ in SHARES]) for model, m in models.items()])
    shares.set_ylim(0, 1)

    def values(figures: dict, keys: list) -> list:
        return [None if figures[k] is None else figures[k] ** 0.5 if k.endswith("var") else figures[k]
                for k, _ in keys]

    for ax, title, keys in ((per_frame, "per frame, frame sizes\n(std, 2nd diff, largest: lower = smoother)", PER_FRAME),
                            (whole, "over the video: travel, reach\n(frame sizes), travel / path", WHOLE_VIDEO)):
        series = [(model, values(m["overall"], keys)) for model, m in models.items()]
        series.append(("ground truth", values(report["judge"]["reference"], keys)))
        _bars(ax, title, [n for _, n in keys], series)
    return _png(fig)


def sample_sheet(samples: dict[str, list[np.ndarray]], requests: list, prompts: int = 6, frames: int = 8) -> bytes:
    """A PNG grid: for the first ``prompts`` prompts, ``frames`` evenly spaced frames of each model's video
    (uint8 ``3 f h w``)."""
    from matplotlib.figure import Figure

    _, f, _, _ = next(iter(samples.values()))[0].shape
    pick = np.linspace(0, f - 1, frames).round().astype(int)
    rows = [(model, i) for i in range(min(prompts, len(requests))) for model in samples]
    fig = Figure(figsize=(3 + frames, len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), frames, squeeze=False)
    for (model, i), row in zip(rows, axes):
        for ax, t in zip(row, pick):
            ax.imshow(samples[model][i][:, t].transpose(1, 2, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{requests[i].prompt[:40]}\n{model}", rotation=0, ha="right", va="center", fontsize=8)
    for ax, t in zip(axes[0], pick):
        ax.set_title(f"frame {t}", fontsize=8)
    return _png(fig)


def sample_gif(videos: list[np.ndarray], requests: list, fps: float, prompts: int = 6, scale: int = 2,
               columns: int = 3) -> bytes:
    """An animated GIF: the first ``prompts`` videos (uint8 ``3 f h w``) side by side (``scale``×
    nearest-neighbour), each with its prompt's colour and shape written under it, playing at ``fps``."""
    from PIL import Image, ImageDraw

    videos = videos[:prompts]
    _, f, h, w = videos[0].shape
    label_h = 14
    rows = -(-len(videos) // columns)
    tile_w, tile_h = w * scale + 4, h * scale + label_h + 4
    canvases = []
    for t in range(f):
        img = Image.new("RGB", (min(columns, len(videos)) * tile_w, rows * tile_h), "white")
        d = ImageDraw.Draw(img)
        for i, (video, req) in enumerate(zip(videos, requests)):
            x, y = (i % columns) * tile_w + 2, (i // columns) * tile_h + 2
            frame = Image.fromarray(np.ascontiguousarray(video[:, t].transpose(1, 2, 0)))
            img.paste(frame.resize((w * scale, h * scale), Image.NEAREST), (x, y))
            d.rectangle([x - 1, y - 1, x + w * scale, y + h * scale], outline=(200, 200, 200))
            d.text((x, y + h * scale + 2), " ".join(prompt_target(req.prompt)), fill="black")
        canvases.append(img)
    # One palette for every frame (the middle frame's 15 main colours, plus black for the labels) keeps the
    # file small: the frames' sampling noise would otherwise fill per-frame palettes.
    middle = canvases[f // 2].quantize(colors=15, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    palette = Image.new("P", (1, 1))
    palette.putpalette(middle.getpalette()[: 15 * 3] + [0, 0, 0])
    frames = [img.quantize(palette=palette, dither=Image.Dither.NONE) for img in canvases]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()
