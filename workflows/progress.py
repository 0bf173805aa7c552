"""Progress on stderr with tqdm: live bars on a terminal, plain periodic lines otherwise (a log, a pipe).

``StageBars``: ``mav generate``'s sampling steps per stage (the runners' ``progress(stage, step, total)``).
``RowBars``: ``mav batch``'s rows done per stage pool, with rate and ETA, actors lost and rows retried, and what
waits for resources.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from workflows.engine import StageStats

STAGE_LABELS = {
    "clip": "text encoder",
    "prior": "prior P",
    "decoder": "decoder D^t",
    "interpolation": "interpolation ↑F",
    "sr_low": "SR_l^t",
    "sr_high": "SR_h",
}
LINE = "{desc} {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


class _Display:
    """One tqdm bar per name on a terminal; otherwise the same figures as a plain line per name, in tqdm's
    format (``LINE``)."""

    def __init__(self, stream, unit: str, every: float | None, tty_every: float) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.unit = unit
        self.every = every if every is not None else (tty_every if self.tty else 15.0)
        self.bars: dict[str, tqdm] = {}
        self.started: dict[str, tuple[str, float]] = {}  # name -> (description, start), for plain lines

    def bar(self, name: str, desc: str, total: int | None, position: int | None = None) -> tqdm:
        if name not in self.bars:
            self.bars[name] = tqdm(total=total, desc=desc, unit=self.unit, file=self.stream, leave=True,
                                   position=position, mininterval=self.every, dynamic_ncols=True)
        return self.bars[name]

    def line(self, name: str, desc: str, n: int, total: int | None, postfix: str = "") -> str:
        desc, start = self.started.setdefault(name, (desc, time.perf_counter()))
        return tqdm.format_meter(n, total, time.perf_counter() - start, prefix=desc, unit=self.unit,
                                 bar_format=LINE, postfix=postfix)

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()

    def close(self, name: str) -> None:
        self.started.pop(name, None)
        bar = self.bars.pop(name, None)
        if bar is not None:
            bar.close()


class StageBars(_Display):
    """``progress(stage, step, total)`` for the in-process pipeline: a bar per stage on a terminal; otherwise
    a line when a stage finishes and, while one runs, every ``every`` seconds."""

    def __init__(self, stream=None, every: float | None = None) -> None:
        super().__init__(stream, "step", every, tty_every=0.1)
        self.last = time.perf_counter()

    def __call__(self, stage: str, step: int, total: int) -> None:
        index = list(STAGE_LABELS).index(stage) + 1 if stage in STAGE_LABELS else 0
        desc = f"[{index}/{len(STAGE_LABELS)}] {STAGE_LABELS.get(stage, stage):<16}"
        done = step >= total
        if self.tty:
            bar = self.bar(stage, desc, total)
            bar.update(step - bar.n)
        else:
            line = self.line(stage, desc, step, total)
            if done or time.perf_counter() - self.last >= self.every:
                self.last = time.perf_counter()
                self.write([line])
        if done:
            self.close(stage)


class RowBars(_Display):
    """Rows done per stage of a batch job, with rate and ETA. A stage's total is the rows expected to reach it:
    ``expected`` (rows that enter the pipeline; None while unknown) less those that failed in an earlier stage."""

    def __init__(self, stream=None, every: float | None = None) -> None:
        super().__init__(stream, "row", every, tty_every=0.5)
        self.last = 0.0

    def update(self, stages: list[StageStats], expected: int | None, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        lines, lost = [], 0
        for i, s in enumerate(stages):
            total = None if expected is None else expected - lost
            lost += s.rows_failed
            postfix = f"busy {s.busy_actors}/{s.actors}, queued {s.queued_rows}"
            if s.actors_lost:
                postfix += f", lost {s.actors_lost} actor{'s' if s.actors_lost > 1 else ''}, retried {s.rows_retried} rows"
            if self.tty:
                bar = self.bar(s.name, f"{s.name:<13}", total, position=i)
                bar.total = total
                bar.set_postfix_str(postfix, refresh=False)
                bar.update(s.rows_done - bar.n)
                bar.refresh()
            else:
                lines.append(self.line(s.name, f"{s.name:<13}", s.rows_done, total, postfix))
        if lines:
            self.write(lines)

    def note(self, line: str | None) -> None:
        """A line about the job as a whole (``waiting for resources: ...``), above the bars on a terminal;
        None: what the last note said is over."""
        text = line if line is not None else "resources arrived; going on"
        if self.tty:
            tqdm.write(text, file=self.stream)
        else:
            self.write([text])

    def close_all(self) -> None:
        for name in list({**self.bars, **self.started}):
            self.close(name)
