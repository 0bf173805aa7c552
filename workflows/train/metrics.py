"""Training metrics, written by rank 0 at every log step, in two forms under ``OUTPUT/_train/STAGE/``:

* ``metrics.csv``: one row per log step (step, loss, lr, samples_per_s, skipped_items);
* ``tensorboard/``: the same scalars as TensorBoard events (``train/loss``, ``train/lr``, ...):

    tensorboard --logdir OUTPUT/_train

For a remote ``--output`` (s3://...) the events are written to a local directory and copied to
``OUTPUT/_train/STAGE/tensorboard/`` at each log step, as the CSV is; copy that folder down to view it.
A resumed run (or one restarted after a worker failure) hides the events after its checkpoint's step
(TensorBoard's purge step), as it drops those rows of the CSV.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile

import fsspec

from stages.fsio import is_local, join, write_bytes_atomic

CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """The log of one training run in ``run_dir``, continuing from step ``resumed_from``."""

    FIELDS = ("step", "loss", "lr", "samples_per_s", "skipped_items")

    def __init__(self, run_dir: str, *, resumed_from: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.csv_url = join(run_dir, CSV_NAME)
        self.rows = [r for r in _earlier_rows(self.csv_url) if int(r["step"]) <= resumed_from] if resumed_from else []
        if is_local(run_dir):
            self.remote, local = None, os.path.join(fsspec.core.url_to_fs(run_dir)[1], TENSORBOARD_DIR)
        else:
            self.remote, local = join(run_dir, TENSORBOARD_DIR), tempfile.mkdtemp(prefix="mav-tensorboard-")
        self.local = local
        self.writer = SummaryWriter(local, purge_step=resumed_from + 1 if resumed_from else None)

    def write(self, row: dict) -> None:
        """One log step: a CSV row and its scalars, both written through before it returns."""
        self.rows.append({k: row[k] for k in self.FIELDS})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        write_bytes_atomic(self.csv_url, buf.getvalue().encode())
        for name in self.FIELDS[1:]:
            self.writer.add_scalar(f"train/{name}", row[name], global_step=int(row["step"]))
        self.writer.flush()
        if self.remote:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    write_bytes_atomic(join(self.remote, name), f.read())

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def read_rows(url: str) -> list[dict]:
    """The rows of a metrics CSV, as strings: read afresh, since the log is rewritten at every log step (an
    object store client's cached listing would name the version it saw before)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    return list(csv.DictReader(io.StringIO(fs.cat_file(path).decode())))


def _earlier_rows(url: str) -> list[dict]:
    try:
        return read_rows(url)
    except FileNotFoundError:
        return []
