"""``mav recipe`` at smoke size on a real local Ray instance: every stage in the paper's order into one
bundle, the held-out pairs left out of the captions, an interrupted run continued, recipe files checked."""

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.checkpoint import load_bundle_config, load_stage_config
from stages.config import ConfigError
from workflows.presets import load_preset
from workflows.shapes import recipe
from workflows.shapes.world import parse_holdout

from .conftest import HELD, smoke_recipe

pytestmark = pytest.mark.timeout(600)


def test_recipe_trains_every_stage_in_the_papers_order_into_one_bundle(bundle):
    out, state = bundle
    assert list(state["steps"]) == ["synth", "clip", "prior", "decoder", "sr-low", "sr-high", "keep-image-stages",
                                    "decoder-video", "sr-low-video", "interpolation"]
    assert all(s["seconds"] >= 0 for s in state["steps"].values())
    assert state["settings"]["holdout"] == list(HELD)
    load_bundle_config(out)  # every stage present and chained
    assert load_stage_config(out, "decoder").unet.temporal
    assert load_stage_config(out, "sr_low").unet.temporal
    assert not load_stage_config(f"{out}/_image", "decoder").unet.temporal  # the image-only baseline's D
    assert not load_stage_config(f"{out}/_image", "sr_low").unet.temporal
    assert recipe.read_state(out) == state


def test_temporal_only_fine_tuning_moves_only_the_temporal_layers(bundle):
    """The smoke recipe fine-tunes D^t with ``temporal_only``: its 2D weights are the image D's, bit for bit;
    the temporal convolutions left their identity start."""
    import torch

    from stages.checkpoint import load_stage
    from stages.temporal import spatial_state_dict

    out, _ = bundle
    _, video = load_stage(out, "decoder")
    _, image = load_stage(f"{out}/_image", "decoder")
    before, after = image.state_dict(), spatial_state_dict(video)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    convs = {k: v for k, v in video.state_dict().items() if k.endswith("temporal_conv.weight")}
    assert convs and any(not torch.equal(v, torch.nn.init.dirac_(torch.empty_like(v))) for v in convs.values())


def test_captions_leave_the_held_out_combinations_out(bundle):
    _, state = bundle
    captions = set()
    for path in (Path(state["data"]) / "images").glob("*.parquet"):
        captions |= set(pq.read_table(path).column("caption").to_pylist())
    for colour, shape in parse_holdout(HELD):
        assert f"a {colour} {shape} on a white background" not in captions
    assert captions


def test_rerun_skips_finished_steps_and_other_settings_are_refused(bundle):
    out, state = bundle
    lines = []
    again = recipe.run_recipe(smoke_recipe(), out, log=lines.append)
    assert again["steps"] == state["steps"]
    assert sum("skipped" in line for line in lines) == len(recipe.RECIPE_ORDER)
    other = dataclasses.replace(smoke_recipe(), holdout=("green square",))
    with pytest.raises(ConfigError, match="other settings"):
        recipe.run_recipe(other, out)


def test_recipe_files_are_checked(tmp_path):
    for text, match in [("stages: {decoder-vidoe: {max_steps: 1}}", "decoder-vidoe"),
                        ("holdout: [pink circle]", "pink circle"),
                        ("train: {max_stepz: 3}", "max_stepz"),
                        ("data: {imagez: 3}", "imagez"),
                        ("data: {speed: [0.5, 0.1]}", "data: speed")]:
        path = tmp_path / "r.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            recipe.load_recipe(str(path))
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe.recipe_path("spheres")
    full = recipe.load_recipe(recipe.recipe_path("shapes"))
    assert full.holdout == HELD and full.stages["decoder-video"].frames == 16


def test_the_command_line_chooses_the_video_stages_backbone(tmp_path):
    from workflows.cli import build_parser
    from workflows.shapes.commands import _with_backbone

    args = build_parser().parse_args(["recipe", "shapes", "--output", "o", "--decoder-backbone", "latte",
                                      "--latte-variant", "3", "--latte-patch-embedding", "tubelet",
                                      "--joint-images", "4"])
    rc = _with_backbone(smoke_recipe(), args)
    assert rc.backbone == "latte" and rc.latte.variant == 3 and rc.latte.patch_embedding == "tubelet"
    assert rc.stages["decoder-video"].joint_images == 4 and rc.stages["decoder"].joint_images == 0
    assert rc.settings()["latte"]["variant"] == 3
    assert "backbone" not in smoke_recipe().settings()  # the recipes run before the choice keep their settings
    preset = load_preset(recipe.stage_preset(rc, str(tmp_path)))
    for stage in (preset.decoder, preset.interpolation):
        assert stage.backbone == "latte" and stage.latte == rc.latte
    assert preset.sr_low == load_preset("shapes").sr_low
    assert recipe.stage_preset(smoke_recipe(), str(tmp_path)) == "shapes"
    unet_args = build_parser().parse_args(["recipe", "shapes", "--output", "o", "--latte-variant", "2"])
    with pytest.raises(ConfigError, match="need --decoder-backbone latte"):
        _with_backbone(smoke_recipe(), unet_args)
