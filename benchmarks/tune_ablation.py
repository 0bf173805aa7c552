"""Tune-A-Video's ablation on the shapes world: per edit and per method, the edit's colour and shape (the
``mav eval`` judge), how closely it keeps the source's path, its temporal coherence, and the reconstruction
error under the source's own caption; each tuning's time and peak memory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_ablation.py --out /tmp/tav-ablation --sources 3

Sources: world.py renders one shape of a known colour moving on a seeded path (64x64, 96 frames at 30 fps,
as ``mav data synth`` does), written as an MP4; its caption is world.py's. Methods (the table's rows), each
a ``mav tune`` run (a subprocess, so that its time and memory are a user's) and the edits of
``workflows.tune.run_edits`` (what ``mav edit`` runs), seed 0:

  * ``full``: ``mav tune`` with its defaults (``--steps`` here), then ``mav edit``;
  * ``no-inversion``: the same tuned bundle, ``mav edit --no-inversion`` (D^t from fresh noise);
  * ``no-tuning``: ``mav tune --steps 0`` (the base D^t with sparse-causal attention, its source inverted),
    then ``mav edit``;
  * ``train-all``: ``mav tune --train all``, then ``mav edit``.

Edits of each source: its own caption (``source``: the reconstruction), another colour, another shape, both
(a pair the captions had), both (``held-out``: a pair of the recipe's holdout, never in a caption). Per edit,
from the edit's frames as ``run_edits`` returns them (before MP4 compression):

  * colour and shape: the judge's majority over the frames, and the share of frames with the asked shape;
  * path: the distance between the edit's object centroid and the source's (from the rendered frames, at the
    same instant: output frame j of ↑F's skip s lies at source frame first + j·stride/s), mean and max over
    the frames, in frame sizes;
  * coherence: the judge's largest centroid step, whether it is a jump, and the share of frames with exactly
    one object;
  * reconstruction (the source caption's edit): mean squared error against the rendered source at the
    keyframes (output frames 0, s, 2s, ...), pixels in [-1, 1]; the source caption is edited once more at
    guidance 1 (``mav edit --guidance 1``, the inversion's own), which separates what guidance does from
    what the inversion does.

Per tuning: ``mav tune``'s own wall time (``tune.yaml``: Ray start, training, inversion) and the peak
resident memory (VmHWM, sampled from /proc) of the Ray Train worker and of the ``mav tune`` process. A
bundle already under OUT is reused with the figures recorded for it (OUT/tunings.json). The edits
of a source and method already judged in OUT/ablation.json are reused too. Writes OUT/ablation.json and
OUT/ablation.md after each method of each source.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

SOURCES = (  # (colour, shape) of each source, then its edits: kind -> (colour, shape)
    (("purple", "triangle"), {"colour": ("blue", "triangle"), "shape": ("purple", "square"),
                              "both": ("green", "circle"), "held-out": ("yellow", "square")}),
    (("green", "circle"), {"colour": ("red", "circle"), "shape": ("green", "triangle"),
                           "both": ("orange", "square"), "held-out": ("red", "triangle")}),
    (("orange", "square"), {"colour": ("purple", "square"), "shape": ("orange", "circle"),
                            "both": ("purple", "triangle"), "held-out": ("blue", "circle")}),
)
ROWS = ("full", "no-inversion", "no-tuning", "train-all")
TUNINGS = {"full": [], "no-tuning": ["--steps", "0"], "train-all": ["--train", "all"]}  # mav tune's extra options
RECON_G1 = "source-guidance-1"  # the source caption again, at guidance 1 (the inversion's own)
BUNDLE_OF = {"full": "full", "no-inversion": "full", "no-tuning": "no-tuning", "train-all": "train-all"}
SIZE, FRAMES = 64, 96  # the recipe's videos


class PeakMemory:
    """Peak resident memory (VmHWM, MiB) of every process under this one, sampled from /proc (Linux) while
    the block runs: ``peaks[pid] = (MiB, command line)``."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peaks, self._stop = every, {}, threading.Event()

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        parent = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        tree, frontier = set(), {os.getpid()}
        while frontier:
            tree |= frontier
            frontier = {p for p, pp in parent.items() if pp in frontier} - tree
        for pid in tree - {os.getpid()}:
            try:
                with open(f"/proc/{pid}/status") as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, StopIteration):
                continue
            self.peaks[pid] = (max(kib / 1024, self.peaks.get(pid, (0.0, ""))[0]), cmd)

    def largest(self, marker: str) -> float | None:
        """The largest peak of the processes whose command line contains ``marker``."""
        values = [mib for mib, cmd in self.peaks.values() if marker in cmd]
        return round(max(values), 1) if values else None


def write_source(out: str, index: int, colour: str, shape: str) -> tuple[str, np.ndarray]:
    """Render source ``index`` (seed ``index``) as OUT/sources/source-INDEX.mp4: (its path, uint8 ``3 f h w``)."""
    from stages.fsio import write_bytes_atomic
    from workflows.shapes.world import FPS, moving_video
    from workflows.video import encode_mp4

    video = moving_video(np.random.default_rng(index), SIZE, FRAMES, colour, shape)
    path = os.path.join(out, "sources", f"source-{index}.mp4")
    if not os.path.exists(path):
        write_bytes_atomic(path, encode_mp4(video, FPS))
    return path, video


def tune(out: str, clip: str, caption: str, bundle: str, extra: list[str], checkpoint: str, steps: int,
         log: str) -> dict:
    """``mav tune`` of ``clip`` into ``bundle`` (reused if it is there): its settings' time and the peak memory
    of its processes."""
    from workflows.tune import load_settings

    record_path = os.path.join(out, "tunings.json")
    records = {}
    if os.path.exists(record_path):
        with open(record_path) as f:
            records = json.load(f)
    if bundle in records and os.path.exists(os.path.join(bundle, "tune.yaml")):
        return records[bundle]
    mav = os.path.join(os.path.dirname(sys.executable), "mav")
    argv = [mav, "tune", clip, "--caption", caption, "--output", bundle, "--checkpoint", checkpoint,
            *([] if "--steps" in extra else ["--steps", str(steps)]), *extra]
    print(" ".join(argv), flush=True)
    with open(log, "a") as f, PeakMemory() as memory:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code != 0:
        raise SystemExit(f"mav tune exited with {code}: see {log}")
    settings = load_settings(bundle)
    record = {"command": " ".join(["mav", *argv[1:]]), "seconds": settings.seconds, "steps": settings.steps,
              "train": settings.train, "parameters": len(settings.parameters),
              "loss": settings.loss if settings.steps else None,
              "train_worker_mib": memory.largest("RayTrainWorker"),
              "mav_tune_mib": memory.largest(" tune "),
              "processes_mib": {str(pid): [round(mib), cmd[:80]] for pid, (mib, cmd) in memory.peaks.items()
                                if mib > 100}}
    records[bundle] = record
    with open(record_path, "w") as f:
        json.dump(records, f, indent=1)
    return record


def source_path(video: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The rendered source's object centroid (``len(times) 2``, x y in frame sizes) at source frame
    ``times`` (fractional: interpolated between frames)."""
    from workflows.shapes.judge import judge_frames

    truth = judge_frames(video)["centroid"]
    return np.stack([np.interp(times, np.arange(len(truth)), truth[:, k]) for k in range(2)], axis=1)


def judge_edit(frames: np.ndarray, target: tuple[str, str], path: np.ndarray, source_keys: np.ndarray,
               skip: int) -> dict:
    """The judge's figures of one edit (uint8 ``3 f h w``) asked for ``target``, against the source's
    centroid ``path`` at the edit's frames (``f 2``) and its keyframes ``source_keys`` (uint8 ``3 k h w``,
    the source frames of output frames 0, skip, 2·skip, ...)."""
    from workflows.shapes.judge import judge_frames, video_metrics

    if frames.shape[2:] != source_keys.shape[2:]:
        raise ValueError(f"the edit is {frames.shape[2:]} and the source {source_keys.shape[2:]}: render it at "
                         "the cascade's output size")
    judged = judge_frames(frames)
    m = video_metrics(judged, *target)
    dist = np.linalg.norm(judged["centroid"] - path, axis=1)[judged["present"]]
    edit_keys = frames[:, ::skip].astype(np.float32) / 127.5 - 1
    source_keys = source_keys.astype(np.float32) / 127.5 - 1
    return {
        "colour": m["colour"], "shape": m["shape"], "colour_ok": m["colour_ok"], "shape_ok": m["shape_ok"],
        "shape_frames": m["shape_frames_ok"], "present": m["present"],
        "path_mean": float(dist.mean()) if len(dist) else None, "path_max": float(dist.max()) if len(dist) else None,
        "largest_step": m["largest_step"], "jump": m["jump"], "one_object": m["one_object"], "travel": m["travel"],
        "mse": float(((edit_keys - source_keys) ** 2).mean()),
    }


def reference(source: np.ndarray, target: tuple[str, str], times: np.ndarray, keyframes: list[int]) -> dict:
    """The source's own figures at the edit's frame times, and two scales: the path distance of an object
    that stays where the source starts, and the squared error of white frames."""
    from workflows.shapes.judge import judge_frames, video_metrics
    from workflows.shapes.world import BACKGROUND

    at = source_path(source, times)
    m = video_metrics(judge_frames(source[:, np.round(times).astype(int)]), *target)
    white = np.asarray(BACKGROUND, np.float32)[:, None, None, None] / 127.5 - 1
    keys = source[:, keyframes].astype(np.float32) / 127.5 - 1
    return {"largest_step": m["largest_step"], "travel": m["travel"], "reach": m["reach"],
            "still_path_mean": float(np.linalg.norm(at - at[0], axis=1).mean()),
            "white_mse": float(((keys - white) ** 2).mean())}


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def summary(edits: list[dict], tunings: dict[str, dict]) -> dict[str, dict]:
    """Per row: the means and counts over its edits, and its tunings' figures."""
    out = {}
    for row in ROWS:
        rs = [e for e in edits if e["row"] == row and e["kind"] != RECON_G1]
        if not rs:
            continue
        changed = [e for e in rs if e["kind"] != "source"]
        held = [e for e in changed if e["held_out"]]
        recon = [e for e in rs if e["kind"] == "source"]
        runs = [t for key, t in tunings.items() if key.endswith("/" + row)]  # no-inversion: none of its own
        out[row] = {
            "edits": len(rs),
            "colour_ok": f"{sum(e['colour_ok'] for e in changed)}/{len(changed)}",
            "shape_ok": f"{sum(e['shape_ok'] for e in changed)}/{len(changed)}",
            "both_ok": f"{sum(e['colour_ok'] and e['shape_ok'] for e in changed)}/{len(changed)}",
            "held_out_ok": f"{sum(e['colour_ok'] and e['shape_ok'] for e in held)}/{len(held)}",
            "shape_frames": _mean([e["shape_frames"] for e in changed]),
            "path_mean": _mean([e["path_mean"] for e in rs if e["path_mean"] is not None]),
            "path_max": max((e["path_max"] for e in rs if e["path_max"] is not None), default=None),
            "largest_step": _mean([e["largest_step"] for e in rs if e["largest_step"] is not None]),
            "jumps": f"{sum(bool(e['jump']) for e in rs)}/{len(rs)}",
            "one_object": _mean([e["one_object"] for e in rs]),
            "recon_mse": _mean([e["mse"] for e in recon]),
            "recon_mse_g1": _mean([e["mse"] for e in edits if e["row"] == row and e["kind"] == RECON_G1]),
            "recon_path_g1": _mean([e["path_mean"] for e in edits if e["row"] == row and e["kind"] == RECON_G1
                                    and e["path_mean"] is not None]),
            "tune_seconds": _mean([t["seconds"] for t in runs]),
            "train_worker_mib": max((t["train_worker_mib"] or 0 for t in runs), default=None) or None,
            "mav_tune_mib": max((t["mav_tune_mib"] or 0 for t in runs), default=None) or None,
        }
    return out


def markdown(result: dict) -> str:
    def f(v, digits=3):
        return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = [f"Sources: {len(result['sources'])}; mav tune --steps {result['steps']}; edits seed 0.", "",
             "| method | colour | shape | both | held-out both | shape frames | path mean / max | largest step "
             "| jumps | one object | reconstruction MSE | the same at guidance 1: MSE, path mean | tuning s "
             "| train worker MiB | mav tune MiB |",
             "|---|---|---|---|---|---:|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for row, s in result["summary"].items():
        lines.append(f"| {row} | {s['colour_ok']} | {s['shape_ok']} | {s['both_ok']} | {s['held_out_ok']} | "
                     f"{f(s['shape_frames'], 2)} | {f(s['path_mean'])} / {f(s['path_max'])} | "
                     f"{f(s['largest_step'])} | {s['jumps']} | {f(s['one_object'], 2)} | {f(s['recon_mse'])} | "
                     f"{f(s['recon_mse_g1'])}, {f(s['recon_path_g1'])} | "
                     f"{f(s['tune_seconds'], 0)} | {f(s['train_worker_mib'], 0)} | {f(s['mav_tune_mib'], 0)} |")
    lines += ["", "| source | its path: travel, reach, largest step | still object's path mean | white frames' MSE |",
              "|---|---|---:|---:|"]
    for s in result["sources"]:
        r = s["reference"]
        lines.append(f"| {s['caption']} | {f(r['travel'])}, {f(r['reach'])}, {f(r['largest_step'])} | "
                     f"{f(r['still_path_mean'])} | {f(r['white_mse'])} |")
    lines += ["", "| source | edit | prompt | method | colour | shape (share) | path mean / max | largest step | "
              "one object | MSE |", "|---|---|---|---|---|---|---|---:|---:|---:|"]
    for e in result["edits"]:
        lines.append(f"| {e['source']} | {e['kind']} | {e['prompt']} | {e['row']} | {e['colour']} | "
                     f"{e['shape']} ({f(e['shape_frames'], 2)}) | {f(e['path_mean'])} / {f(e['path_max'])} | "
                     f"{f(e['largest_step'])}{' jump' if e['jump'] else ''} | {f(e['one_object'], 2)} | "
                     f"{f(e['mse']) if e['kind'] in ('source', RECON_G1) else ''} |")
    return "\n".join(lines) + "\n"


def _earlier_edits(path: str, steps: int) -> dict[tuple[str, str, str], dict]:
    """The judged edits of an earlier run with the same steps at ``path``, per (source caption, method, kind)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    return {(e["source"], e["row"], e["kind"]): e for e in earlier["edits"] if earlier["steps"] == steps}


def write_tables(out: str, result: dict, tunings: dict[str, dict]) -> None:
    """OUT/ablation.json and OUT/ablation.md of the edits judged so far."""
    result["tunings"] = tunings
    result["summary"] = summary(result["edits"], tunings)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(markdown(result))


def main() -> None:
    from workflows.presets import model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a local directory: sources, tuned bundles, edits, the tables")
    ap.add_argument("--sources", type=int, default=3, help=f"sources, 1..{len(SOURCES)}")
    ap.add_argument("--steps", type=int, default=300, help="mav tune --steps of the tuned rows")
    ap.add_argument("--checkpoint", default=model_path(), help="the base bundle (default: the shipped model)")
    ap.add_argument("--rows", default=",".join(ROWS), help="methods to run, of " + ", ".join(ROWS))
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if not 1 <= args.sources <= len(SOURCES) or not set(rows) <= set(ROWS):
        ap.error(f"--sources must be in 1..{len(SOURCES)} and --rows among {', '.join(ROWS)}")

    import torch

    from stages.checkpoint import load_stage_config
    from workflows.shapes.evaluate import default_holdout
    from workflows.shapes.world import caption
    from workflows.tune import load_settings
    from workflows.tune.edit import run_edits
    from workflows.video import encode_mp4

    torch.set_num_threads(1)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    skip = load_stage_config(args.checkpoint, "interpolation").skip
    held = set(default_holdout(args.checkpoint))
    result: dict = {"checkpoint": args.checkpoint, "steps": args.steps, "sources": [], "edits": []}
    done = _earlier_edits(os.path.join(out, "ablation.json"), args.steps)
    tunings: dict[str, dict] = {}
    for i, ((colour, shape), edits) in enumerate(SOURCES[: args.sources]):
        clip, video = write_source(out, i, colour, shape)
        cap = caption(colour, shape)
        targets = {"source": (colour, shape), **edits}
        for name in dict.fromkeys(BUNDLE_OF[r] for r in rows):
            bundle = os.path.join(out, "tuned", f"source-{i}", name)
            tunings[bundle] = tune(out, clip, cap, bundle, TUNINGS[name], args.checkpoint, args.steps,
                                   os.path.join(out, f"tune-source-{i}-{name}.log"))
        settings = load_settings(os.path.join(out, "tuned", f"source-{i}", BUNDLE_OF[rows[0]]))
        stride = settings.frames[1] - settings.frames[0]
        times = settings.frames[0] + np.arange((len(settings.frames) - 1) * skip + 1) * stride / skip
        result["sources"].append({"caption": cap, "clip": clip, "frames": list(settings.frames),
                                  "reference": reference(video, (colour, shape), times, list(settings.frames))})
        truth = source_path(video, times)
        for row in rows:
            bundle = os.path.join(out, "tuned", f"source-{i}", BUNDLE_OF[row])
            for items, guidance in ((list(targets.items()), None), ([(RECON_G1, (colour, shape))], 1.0)):
                if guidance is not None and row == "no-inversion":  # nothing to reconstruct from
                    continue
                known = [done.get((cap, row, kind)) for kind, _ in items]
                if all(known):
                    result["edits"] += known
                    continue
                prompts = [caption(*t) for _, t in items]
                start = time.perf_counter()
                videos = run_edits(bundle, prompts, seed=0, guidance=guidance, inversion=row != "no-inversion")
                seconds = time.perf_counter() - start
                for (kind, target), prompt, v in zip(items, prompts, videos):
                    mp4 = os.path.join(out, "edits", f"source-{i}", row, f"{kind}.mp4")
                    os.makedirs(os.path.dirname(mp4), exist_ok=True)
                    with open(mp4, "wb") as f:
                        f.write(encode_mp4(v.frames, v.fps))
                    e = {"source": cap, "kind": kind, "prompt": prompt, "row": row, "video": mp4,
                         "held_out": target in held, "guidance": guidance,
                         "edit_seconds": round(seconds / len(prompts), 1),
                         **judge_edit(v.frames, target, truth, video[:, list(settings.frames)], skip)}
                    result["edits"].append(e)
                print(f"source {i} {row}: {len(prompts)} edits in {seconds:.0f}s; path means "
                      + ", ".join(f"{e['kind']} {e['path_mean']:.3f}" for e in result["edits"][-len(prompts):]
                                  if e["path_mean"] is not None), flush=True)
            write_tables(out, result, tunings)
        print(markdown(result).split("\n\n")[1], flush=True)


if __name__ == "__main__":
    main()
