"""The shapes world's commands as ``mav`` registers them: ``mav data synth`` writes the data set, and bad
arguments are refused with one line before anything runs."""

import argparse

import pytest

from workflows import shapes
from workflows.errors import CliError


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mav")
    shapes.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_data_synth_writes_images_and_videos(tmp_path, capsys):
    out = tmp_path / "d"
    assert run(["data", "synth", "--out", str(out), "--images", "3", "--videos", "2", "--size", "16",
                "--frames", "4", "--format", "tar", "--holdout", "red triangle"]) == 0
    assert [p.name for p in sorted((out / "images").iterdir())] == ["shard-00000.tar"]
    assert [p.name for p in sorted((out / "videos").iterdir())] == ["video-00000.mp4", "video-00001.mp4"]
    assert "wrote 3 images and 2 videos" in capsys.readouterr().err


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    for argv, match in ((["data", "synth", "--out", str(tmp_path / "x"), "--images", "-1"], "--images"),
                        (["data", "synth", "--out", str(tmp_path / "x"), "--holdout", "pink circle"], "pink"),
                        (["recipe", "spheres", "--output", str(tmp_path / "y")], "unknown recipe 'spheres'")):
        with pytest.raises(CliError, match=match):
            run(argv)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
