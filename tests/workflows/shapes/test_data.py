"""The synthetic data set as ``mav data synth`` writes it."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from workflows.shapes.data import synth
from workflows.shapes.world import COLOURS


def test_bad_speeds_are_refused_before_anything_is_written(tmp_path):
    for bad, match in (((0.3, 0.1), "low <= high"), ((0.0, 0.1), "0 < low"), (("fast",), "two numbers")):
        with pytest.raises(ValueError, match=match):
            synth(str(tmp_path / "x"), images=0, videos=1, speed=bad)
    assert not (tmp_path / "x").exists()


def test_holdout_is_checked_and_leaves_pairs_out(tmp_path):
    with pytest.raises(ValueError, match="not a palette colour"):
        synth(str(tmp_path / "x"), images=1, videos=0, holdout=[("red", "cube")])
    synth(str(tmp_path / "d"), images=40, videos=0, size=16, holdout=[(c, "circle") for c in COLOURS])
    captions = pq.read_table(tmp_path / "d" / "images" / "part-00000.parquet").column("caption").to_pylist()
    assert len(captions) == 40 and not any("circle" in c for c in captions)
    img = Image.open(io.BytesIO(pq.read_table(tmp_path / "d" / "images" / "part-00000.parquet")
                                .column("image")[0].as_py()))
    assert img.size == (16, 16)
