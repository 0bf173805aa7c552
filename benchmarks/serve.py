"""Latency and throughput of the Serve endpoint (`mav serve`), with and without dynamic batching, the
overhead of the Serve path against the in-process pipeline, and one request's latency as SR_h scales.

    .venv/bin/python benchmarks/serve.py --out /tmp/serve.json            # CPU preset, ~40 min on 2 cores
    .venv/bin/python benchmarks/serve.py --concurrency 1 4 --steps 2     # a shorter run
    .venv/bin/python benchmarks/serve.py --modes --fanout 1 2 4 --threads 1 --steps 2   # SR_h fan-out only

Sections (figures go into BENCHMARKS.md, "Serving (mav serve)"):

load       The application of cluster/serve.yaml on a local Ray instance (GPU requests dropped, one replica per
           stage instead of autoscaling, ``--threads`` torch threads per stage replica), the CPU preset with fresh
           weights. For each concurrency c, c clients each send ``POST /v1/videos`` in a closed loop until
           ``max(c, --min-requests)`` requests are answered; latency is request to last byte of the MP4,
           throughput is answered requests over the wall time of the level. Run twice: with the config's
           ``user_config`` batching ("batching on") and with ``max_batch_size: 1`` on every stage ("off").
           The stage batch sizes each request shared are read from its ``X-Batch-Sizes`` header.
fanout     One request at a time (``--reps`` timed after a warm-up) with SR_h at each replica count of
           ``--fanout``: the ingress splits SR_h's frames into one chunk per running replica. Every other
           deployment has one replica; every replica has ``--threads`` CPUs. Latency is request to last byte;
           the SR_h seconds are the slowest chunk's (``X-Stage-Seconds``); the MP4 bytes of each count are
           compared with those of the first.
overhead   Concurrency 1: the Serve request's latency (HTTP, the chained deployment calls, MP4 encoding in the
           encoder) against ``Pipeline.generate`` plus ``encode_mp4`` in this process with the same torch thread count,
           the same prompt, seed and steps. Medians of ``--reps`` runs each, interleaved.

On a shared machine compare only figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from stages.config import STAGE_NAMES  # noqa: E402
from workflows.serve import AppArgs, fit_to_cluster, load_serve_config, run_local  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def overrides_for(threads: int, batching: bool, sr_high_replicas: int = 1) -> dict[str, dict]:
    """cluster/serve.yaml's deployments fitted to this machine: no GPUs, one replica per stage (SR_h:
    ``sr_high_replicas``) and one encoder, ``threads`` CPUs (= torch threads) per stage replica; with
    ``batching`` off every stage's max_batch_size is 1."""
    overrides, _ = fit_to_cluster(load_serve_config().overrides, {"CPU": float(os.cpu_count() or 1)})
    for name in (*STAGE_NAMES, "encoder"):
        opts = overrides[name]
        opts.pop("autoscaling_config", None)
        opts["num_replicas"] = sr_high_replicas if name == "sr_high" else 1
        if name == "encoder":
            continue
        opts["ray_actor_options"] = {**opts.get("ray_actor_options", {}), "num_cpus": threads}
        if not batching:
            opts["user_config"] = {**opts.get("user_config", {}), "max_batch_size": 1}
    return overrides


async def closed_loop(url: str, concurrency: int, total: int, steps: int | None, seed0: int) -> dict:
    """``concurrency`` clients, each sending its next request when the last one is answered."""
    latencies, codes, batch_sizes = [], [], {n: [] for n in STAGE_NAMES}
    issued = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < total:
            i = issued
            issued += 1
            body = {"prompt": f"a red ball bouncing, take {i}", "seed": seed0 + i}
            if steps is not None:
                body["steps"] = steps
            start = time.perf_counter()
            r = await c.post("v1/videos", json=body)
            latencies.append(time.perf_counter() - start)
            codes.append(r.status_code)
            if r.status_code == 200:
                for kv in r.headers["x-batch-sizes"].split(","):
                    name, size = kv.split("=")
                    batch_sizes[name].append(int(size))

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = codes.count(200)
    return {
        "concurrency": concurrency, "requests": len(codes), "ok": ok,
        "errors": {str(k): codes.count(k) for k in sorted(set(codes)) if k != 200},
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "throughput_per_min": 60 * ok / wall, "wall_s": wall,
        "mean_batch_size": {n: statistics.mean(v) if v else None for n, v in batch_sizes.items()},
    }


def deploy(threads: int, batching: bool, port: int, sr_high_replicas: int = 1) -> str:
    from ray import serve

    serve.shutdown()
    url = run_local(AppArgs(preset="cpu"), overrides_for(threads, batching, sr_high_replicas), port=port)
    with httpx.Client(base_url=url, timeout=60) as c:
        deadline = time.monotonic() + 600
        while c.get("readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the application never became ready")
            time.sleep(1)
    return url


def serve_once(url: str, body: dict, *, response: bool = False):
    start = time.perf_counter()
    r = httpx.post(url + "v1/videos", json=body, timeout=3600)
    r.raise_for_status()
    return (time.perf_counter() - start, r) if response else (time.perf_counter() - start, r.content)


def fanout(counts: list[int], threads: int, steps: int | None, reps: int, port: int) -> list[dict]:
    """One request at a time with SR_h at each replica count in ``counts``."""
    body = {"prompt": "a red ball bouncing", "seed": 7, **({"steps": steps} if steps else {})}
    rows, first = [], None
    for n in counts:
        url = deploy(threads, True, port, sr_high_replicas=n)
        serve_once(url, body)  # warm-up: first calls of every stage
        latencies, sr_high = [], []
        for _ in range(reps):
            seconds, r = serve_once(url, body, response=True)
            latencies.append(seconds)
            sr_high.append(float(dict(kv.split("=") for kv in r.headers["x-stage-seconds"].split(","))["sr_high"]))
            first = r.content if first is None else first
        row = {"sr_high_replicas": n, "chunks": int(r.headers["x-frame-chunks"]), "latencies_s": latencies,
               "p50_s": statistics.median(latencies), "sr_high_p50_s": statistics.median(sr_high),
               "same_bytes_as_first": r.content == first}
        rows.append(row)
        print(f"fanout: SR_h replicas {n} ({row['chunks']} chunks): latency p50 {row['p50_s']:.2f} s "
              f"({', '.join(f'{x:.2f}' for x in latencies)}), SR_h {row['sr_high_p50_s']:.2f} s, "
              f"same MP4 bytes as with {counts[0]}: {row['same_bytes_as_first']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--min-requests", type=int, default=3, help="requests per level at least (default 3)")
    parser.add_argument("--reps", type=int, default=3, help="runs per side of the overhead section")
    parser.add_argument("--steps", type=int, help="sampling steps of every stage (default: the preset's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per stage replica and in-process")
    parser.add_argument("--modes", nargs="*", default=["on", "off"], choices=["on", "off"],
                        help="batching modes of the load section (none: skip it and the overhead section)")
    parser.add_argument("--fanout", type=int, nargs="+", metavar="N", help="SR_h replica counts of the fanout section")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args(argv)

    from workflows.pipeline import Pipeline, Request
    from workflows.ray_cluster import init_ray
    from workflows.video import encode_mp4

    torch.set_num_threads(args.threads)
    stage_cpus = args.threads * (len(STAGE_NAMES) - 1 + max(args.fanout or [1])) + 1  # and the encoder
    init_ray(None, stage_cpus)
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
               "cpus": os.cpu_count(), "threads": args.threads, "steps": args.steps, "load": {}, "overhead": {},
               "fanout": []}
    print(f"# {results['date']}  {os.cpu_count()} CPUs, {args.threads} torch threads per stage replica, "
          f"steps {args.steps or 'preset'}")

    for mode in args.modes:
        url = deploy(args.threads, mode == "on", args.port)
        if mode == args.modes[0]:
            body = {"prompt": "a red ball bouncing", "seed": 7, **({"steps": args.steps} if args.steps else {})}
            serve_once(url, body)  # warm-up: first calls of every stage
            pipe = Pipeline(preset="cpu", device="cpu")
            request = Request(prompt=body["prompt"], seed=body["seed"], steps=args.steps)
            video = pipe.generate([request])[0]
            encode_mp4(video.frames, video.fps)
            served, local, same = [], [], True
            for _ in range(args.reps):
                seconds, data = serve_once(url, body)
                served.append(seconds)
                start = time.perf_counter()
                video = pipe.generate([request])[0]
                mine = encode_mp4(video.frames, video.fps)
                local.append(time.perf_counter() - start)
                same = same and mine == data
            results["overhead"] = {"serve_s": served, "in_process_s": local, "same_bytes": same,
                                   "overhead": statistics.median(served) / statistics.median(local) - 1}
            print(f"overhead (concurrency 1, batching {mode}): serve median {statistics.median(served):.2f} s, "
                  f"in-process {statistics.median(local):.2f} s -> {100 * results['overhead']['overhead']:+.1f}%"
                  f"; identical MP4 bytes: {same}")
            del pipe
        rows = []
        for c in args.concurrency:
            row = asyncio.run(closed_loop(url, c, max(c, args.min_requests), args.steps, 1000 * c))
            rows.append(row)
            sizes = ", ".join(f"{n} {v:.2f}" for n, v in row["mean_batch_size"].items() if v is not None)
            print(f"batching {mode:3s} c={c:2d}: {row['ok']}/{row['requests']} ok {row['errors'] or ''} "
                  f"p50 {row['p50_s']:.1f} s  p95 {row['p95_s']:.1f} s  {row['throughput_per_min']:.2f} videos/min  "
                  f"mean batch: {sizes}", flush=True)
        results["load"][mode] = rows
    if args.fanout:
        results["fanout"] = fanout(args.fanout, args.threads, args.steps, args.reps, args.port)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
