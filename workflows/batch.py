"""``mav batch``: generate one video per prompt of prompt files, every stage a Ray actor pool.

    mav batch --prompts s3://bucket/prompts/*.jsonl --output s3://bucket/videos/run1
    mav batch --prompts prompts.txt --output out/ --pools cluster/pools.yaml --address ray://head:10001
    ray job submit --working-dir . -- mav batch --prompts s3://bucket/p.txt --output s3://bucket/out

Outputs under ``--output``: ``<safe id>.mp4`` per prompt, ``manifest.parquet`` (one row per prompt:
id, prompt, parameters, output URI, status ok/failed, error, per-stage seconds) and ``_journal/``
(one JSON-lines part per written batch). Every file is written atomically. Rerunning the same command
generates only the rows without an ``ok`` journal record of the same parameters: exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import sys
import time
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np

from stages.config import STAGE_NAMES
from stages.errors import UserError
from stages.fsio import join, write_bytes_atomic
from workflows.engine import ROW_KEY, SECONDS_PREFIX, StageSpec, StreamingExecutor
from workflows.inputs import InputRow, open_inputs, read_rows
from workflows.outputs import safe_name
from workflows.pipeline import DEFAULT_FPS, Request, check_motion
from workflows.pools import PoolConfig
from workflows.presets import DEFAULT_PRESET
from workflows.progress import RowBars
from workflows.resources import WaitWatch, check_cluster, fmt, pool_needs, print_waits, waiting_actors
from workflows.runners import RUNNER_OF

POOLS_FIX = "give the pools fewer actors or fractional CPUs (cpus: 0.25 in --pools)"
MANIFEST = "manifest.parquet"
JOURNAL = "_journal"
PARAMS = ("prompt", "negative_prompt", "seed", "fps", "steps", "guidance", "motion")


@dataclass(frozen=True)
class JobSpec:
    prompts: tuple[str, ...]
    output: str
    preset: str = DEFAULT_PRESET
    checkpoint: str | None = None
    seed: int = 0                   # rows without a seed column use a seed derived from (seed, id)
    dtype: str = "auto"             # the networks' arithmetic: auto (bf16 on CUDA), fp32 or bf16


def row_seed(base: int, rid: str) -> int:
    digest = hashlib.sha256(f"{base}:{rid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def to_request(row: InputRow, base_seed: int) -> Request:
    """Validate one input row into a Request; UserError names the bad field."""
    f = row.fields

    def number(name, kind):
        value = f.get(name)
        if value is None:
            return None
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                raise UserError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        return value

    seed = number("seed", int)
    fps = number("fps", int)
    motion = f.get("motion")
    if isinstance(motion, str) and not motion.strip():  # an empty CSV cell: off
        motion = None
    elif isinstance(motion, str):  # CSV: "dy dx"
        try:
            motion = [float(v) for v in motion.split()]
        except ValueError:
            raise UserError(f'motion: expected two numbers "dy dx", got {motion!r}') from None
    return Request(
        prompt=f["prompt"],
        negative_prompt=str(f.get("negative_prompt", "")),
        seed=row_seed(base_seed, row.id) if seed is None else seed,
        fps=DEFAULT_FPS if fps is None else fps,
        steps=number("steps", int),
        guidance=number("guidance", float),
        motion=None if motion is None else check_motion(motion),
        id=row.id,
    )


def params_of(r: Request) -> dict:
    return {
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": int(r.seed),
        "fps": int(r.fps),
        "steps": int(r.steps or 0),
        "guidance": float("nan") if r.guidance is None else float(r.guidance),
        "motion": _motion_record(r.motion),
    }


def _motion_record(motion) -> list[float] | None:
    """(dy, dx) as it comes back from the float32 ``motion`` column (so a resumed job finds it equal), or None."""
    if motion is None or np.isnan(motion).any():
        return None
    return [float(v) for v in np.asarray(motion, dtype=np.float32)]


def pipeline_row(key: int, r: Request) -> dict:
    """A request as a row of the runners' columns (``motion``: NaN when off)."""
    motion = np.full(2, np.nan, np.float32) if r.motion is None else np.asarray(r.motion, np.float32)
    return {ROW_KEY: key, "id": r.id, **params_of(r), "motion": motion}


def _same_params(a: dict, b: dict) -> bool:
    for k in PARAMS:
        x, y = a.get(k), b.get(k)
        if isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
            continue
        if x != y:
            return False
    return True


class VideoWriter:
    """The last pool: encode each row's frames to MP4, write it atomically, then journal the row."""

    def __init__(self, output: str) -> None:
        self.output = output

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from workflows.video import encode_mp4

        records = []
        for i in range(len(batch[ROW_KEY])):
            start = time.perf_counter()
            rid = str(batch["id"][i])
            uri = join(self.output, f"{safe_name(rid)}.mp4")
            write_bytes_atomic(uri, encode_mp4(batch["video"][i], float(batch["video_fps"][i])))
            _, f, h, w = batch["video"][i].shape
            records.append(
                {
                    "id": rid,
                    "prompt": str(batch["prompt"][i]),
                    "negative_prompt": str(batch["negative_prompt"][i]),
                    "seed": int(batch["seed"][i]),
                    "fps": int(batch["fps"][i]),
                    "steps": int(batch["steps"][i]),
                    "guidance": float(batch["guidance"][i]),
                    "motion": _motion_record(batch["motion"][i]),
                    "output": uri,
                    "status": "ok",
                    "error": "",
                    "truncated": bool(batch["truncated"][i]),
                    "frames": int(f),
                    "width": int(w),
                    "height": int(h),
                    "video_fps": float(batch["video_fps"][i]),
                    "seconds_writer": time.perf_counter() - start,
                    **{
                        f"seconds_{k[len(SECONDS_PREFIX):]}": float(v[i])
                        for k, v in batch.items() if k.startswith(SECONDS_PREFIX)
                    },
                }
            )
        lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
        write_bytes_atomic(join(self.output, JOURNAL, f"part-{uuid.uuid4().hex}.jsonl"), lines.encode())
        return {ROW_KEY: batch[ROW_KEY], "record": np.array([json.dumps(r) for r in records], dtype=object)}


def read_journal(output: str) -> dict[str, dict]:
    """The latest ok record per id from the job's journal (empty for a new job)."""
    fs, path = fsspec.core.url_to_fs(join(output, JOURNAL))
    try:
        parts = sorted(fs.ls(path, detail=True), key=lambda d: (d.get("mtime") or d.get("LastModified") or 0, d["name"]))
    except FileNotFoundError:
        return {}
    done: dict[str, dict] = {}
    for part in parts:
        name = part["name"]
        if not posix_basename(name).startswith("part-"):
            continue
        with fs.open(name, "rb") as fh:
            for line in fh.read().decode().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("status") == "ok":
                        done[rec["id"]] = rec
    return done


def posix_basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def write_manifest(output: str, records: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()), ("seed", pa.int64()),
         ("fps", pa.int64()), ("steps", pa.int64()), ("guidance", pa.float64()), ("motion", pa.list_(pa.float64())),
         ("output", pa.string()), ("status", pa.string()), ("error", pa.string()), ("truncated", pa.bool_()),
         *((f"seconds_{s}", pa.float64()) for s in (*STAGE_NAMES, "writer"))]
    )
    table = pa.Table.from_pydict({c: [r.get(c) for r in records] for c in schema.names}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = join(output, MANIFEST)
    write_bytes_atomic(uri, buf.getvalue())
    return uri


def stage_specs(job: JobSpec, pools: dict[str, PoolConfig]) -> list[StageSpec]:
    specs = [
        StageSpec(stage, functools.partial(make, checkpoint=job.checkpoint, preset=job.preset, dtype=job.dtype,
                                           compile=pools[stage].compile), pools[stage])
        for stage, make in RUNNER_OF.items()
    ]
    specs.append(StageSpec("writer", functools.partial(VideoWriter, job.output), pools["writer"]))
    return specs


@dataclass
class JobResult:
    records: list[dict]
    ok: int
    failed: int
    skipped: int           # rows already done by an earlier run
    truncated: int
    wall_seconds: float
    utilisation: dict[str, float]
    manifest: str
    actors_lost: int = 0   # stage actors whose process or node died, replaced by Ray
    rows_retried: int = 0  # rows re-run on those replacements


def run_job(job: JobSpec, pools: dict[str, PoolConfig], *, progress: RowBars | None = None) -> JobResult:
    """Run a batch job on the connected Ray cluster.

    Raises InputError before anything is written when the input cannot be used, and ResourceError when the
    cluster can never hold the pools' first actors. On Ctrl-C (or SIGTERM, raised as a KeyboardInterrupt) the
    manifest of what was finished is written (unfinished rows marked ``pending``), then the interrupt
    propagates. ``progress`` shows rows per stage, and what waits for resources; for its totals the prompt
    files are read once more, first.
    """
    import ray

    start = time.perf_counter()
    files = open_inputs(list(job.prompts))
    done = read_journal(job.output)
    records: dict[int, dict] = {}   # by row position: duplicate ids keep a manifest row each
    requests: dict[int, Request] = {}
    counts = {"skipped": 0, "rejected": 0}

    def work():
        for key, row in enumerate(read_rows(files)):
            base = {"id": row.id, "prompt": str(row.fields.get("prompt", "")), "status": "failed", "output": ""}
            if row.error:
                records[key] = {**base, "error": row.error}
                counts["rejected"] += 1
                continue
            try:
                req = to_request(row, job.seed)
            except UserError as e:
                records[key] = {**base, "error": str(e)}
                counts["rejected"] += 1
                continue
            prev = done.get(row.id)
            if prev is not None and _same_params(prev, params_of(req)):
                records[key] = prev
                counts["skipped"] += 1
                continue
            requests[key] = req
            yield pipeline_row(key, req)

    rows = work()
    first = next(rows, None)
    if first is None:  # nothing left to generate: no actors needed
        return _finish(job, records, counts["skipped"], time.perf_counter() - start, {})
    use_gpus = ray.cluster_resources().get("GPU", 0) > 0
    check_cluster(pool_needs(pools, use_gpus), what="the pools", fix=POOLS_FIX)
    executor = StreamingExecutor(stage_specs(job, pools), use_gpus=use_gpus)
    if not executor.use_gpus and any(p.gpus for p in pools.values()):
        print("notice: the cluster has no GPUs; the pools' GPU requests are dropped", file=sys.stderr)
    total = sum(1 for _ in read_rows(files)) if progress is not None else None

    def show(force: bool = False) -> None:
        if progress is not None:
            expected = total - counts["skipped"] - counts["rejected"]
            progress.update(executor.snapshot(), expected, force=force)

    bundles = {n.stage: fmt(n.each) for n in pool_needs(pools, use_gpus)}

    def waiting() -> str:
        counts = waiting_actors(functools.partial(_stage_of, f"mav-{executor.token}-"))
        return ", ".join(f"{stage} {n} actor{'s' if n > 1 else ''} ({bundles[stage]} each)"
                         for stage, n in counts.items() if stage in bundles)

    watch = WaitWatch(waiting, progress.note if progress is not None else print_waits()).start()
    interrupted: KeyboardInterrupt | None = None
    try:
        for completion in executor.run(itertools.chain([first], rows)):
            if completion.batch is not None:
                for key, rec in zip(completion.batch[ROW_KEY], completion.batch["record"]):
                    records[int(key)] = json.loads(rec)
            for key, (stage, err) in completion.failed.items():
                req = requests[key]
                records[key] = {"id": req.id, **params_of(req), "status": "failed", "output": "",
                                "error": f"{stage}: {err}"}
            show()
        show(force=True)
    except KeyboardInterrupt as e:
        interrupted = e
    finally:
        watch.close()
        if progress is not None:
            progress.close_all()
    wall = time.perf_counter() - start
    stats = executor.snapshot()
    utilisation = {s.name: s.busy_seconds / max(s.actor_seconds, 1e-9) for s in stats}
    executor.shutdown()
    if interrupted:
        for key, r in requests.items():
            records.setdefault(key, {"id": r.id, **params_of(r), "status": "pending", "output": "", "error": "interrupted"})
    result = _finish(job, records, counts["skipped"], wall, utilisation)
    result.actors_lost = sum(s.actors_lost for s in stats)
    result.rows_retried = sum(s.rows_retried for s in stats)
    if interrupted:
        raise interrupted
    return result


def _stage_of(prefix: str, actor_name: str) -> str | None:
    """The stage of one of this job's pool actors, named ``<prefix><stage>-<n>`` (None for another actor)."""
    return actor_name[len(prefix):].rsplit("-", 1)[0] if actor_name.startswith(prefix) else None


def _finish(job: JobSpec, records: dict[int, dict], skipped: int, wall: float, utilisation: dict) -> JobResult:
    """Write the manifest (rows in input order) and sum up the job."""
    ordered = [records[k] for k in sorted(records)]
    return JobResult(
        records=ordered,
        ok=sum(1 for r in ordered if r["status"] == "ok"),
        failed=sum(1 for r in ordered if r["status"] == "failed"),
        skipped=skipped,
        truncated=sum(1 for r in ordered if r.get("truncated")),
        wall_seconds=wall,
        utilisation=utilisation,
        manifest=write_manifest(job.output, ordered),
    )

