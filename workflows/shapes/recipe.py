"""``mav recipe``: the demo model in one command, trained without a single text–video pair.

    mav recipe shapes --output models/shapes                      # the full recipe (cluster/recipes/shapes.yaml)
    mav recipe shapes --output /tmp/shapes-smoke --size smoke     # the same steps in a few minutes (CI)
    mav eval --checkpoint models/shapes --prompts cluster/recipes/shapes-eval.jsonl --out eval/shapes
    mav recipe shapes --output models/shapes-latte3 --decoder-backbone latte --latte-variant 3   # D^t, ↑F: Latte

The steps, in Make-A-Video's order (Sec. 3.4):

  1. ``mav data synth``: captioned still images of coloured shapes, leaving out the recipe's held-out
     colour×shape pairs, and uncaptioned videos of shapes moving (data.py);
  2. ``mav train`` clip → prior → decoder → sr-low → sr-high on the stills: the text-to-image model;
  3. the image decoder D and SR_l are kept in ``OUTPUT/_image``: with its temporal layers at identity D^t
     is D on every frame, the image-only baseline that ``mav eval`` compares with;
  4. ``mav train`` decoder-video → sr-low-video → interpolation on the videos, each starting from the
     stage before it (temporal layers inflated at identity; ↑F from D^t).

``OUTPUT`` is a checkpoint bundle (its stage directories are what ``mav generate --checkpoint`` loads),
plus ``_image/`` (the baseline's stages), ``_train/`` (``mav train``'s run state and loss logs), ``_data/``
(the synthetic data, unless ``--data`` puts it elsewhere) and ``_recipe/recipe.json`` (the settings, the
held-out pairs, and each step's seconds and final loss). Rerunning the same command continues an
interrupted recipe: finished steps are skipped, an interrupted stage resumes from its last checkpoint.
A recipe whose ``backbone`` differs from its preset's trains from the preset with D^t's and ↑F's network
replaced, written to ``_recipe/preset.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources

from stages.checkpoint import load_stage, save_stage
from stages.config import BACKBONES, ConfigError, LatteConfig, dump_yaml, from_dict, to_dict
from stages.fsio import join, read_bytes, read_yaml_mapping, write_bytes_atomic
from stages.training import TRAINING_STAGES, TrainConfig
from workflows.presets import load_preset
from workflows.shapes.data import synth
from workflows.shapes.world import SPEED, check_speed, parse_holdout

RECIPE_ORDER = ("clip", "prior", "decoder", "sr-low", "sr-high", "decoder-video", "sr-low-video", "interpolation")
IMAGE_DIR = "_image"        # the image-trained stages that video fine-tuning replaces: the baseline
IMAGE_STAGES = ("decoder", "sr_low")
DATA_DIR = "_data"
STATE_FILE = join("_recipe", "recipe.json")
PRESET_FILE = join("_recipe", "preset.yaml")  # the preset with the recipe's backbone, when it chooses one
SIZES = ("full", "smoke")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    images: int = 4000              # captioned still images
    videos: int = 300               # uncaptioned videos
    size: int = 64                  # image and video height = width, pixels
    frames: int = 96                # frames per video, at 30 fps
    speed: tuple[float, float] = SPEED  # the shapes' speeds, frame widths per second (low, high)
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            check_speed(self.speed)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    preset: str = "shapes"          # stage preset (network sizes): a name under cluster/presets or a YAML path
    data: DataSpec = field(default_factory=DataSpec)
    holdout: tuple[str, ...] = ()   # "colour shape" pairs no caption mentions (compositional generalisation)
    workers: int = 1                # Ray Train workers per stage
    cpus_per_worker: float = 2.0    # also each worker's torch thread count
    stages: dict = field(default_factory=dict)  # training stage -> TrainConfig (YAML: defaults under ``train``)
    backbone: str | None = None     # D^t's and ↑F's network, unet or latte (None: the preset's)
    latte: LatteConfig | None = None  # with backbone latte: their Latte (None: the preset's decoder.latte)

    def __post_init__(self) -> None:
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}; got {self.backbone!r}")
        if self.latte is not None and self.backbone != "latte":
            raise ConfigError("latte sizes a Latte backbone: set backbone to latte, or drop latte")
        try:
            parse_holdout(self.holdout)
        except ValueError as e:
            raise ConfigError(f"holdout: {e}") from None
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")

    def settings(self) -> dict:
        """Everything that determines the trained model, as plain data (recorded in recipe.json)."""
        out = to_dict(dataclasses.replace(self, stages={}))
        for where_it_runs in ("workers", "cpus_per_worker"):
            del out[where_it_runs]
        for chosen_by_the_preset in ("backbone", "latte"):  # recorded where the recipe chooses them
            if out[chosen_by_the_preset] is None:
                del out[chosen_by_the_preset]
        out["stages"] = {s: to_dict(c) for s, c in self.stages.items()}
        return out


def recipe_dir() -> str:
    return str(resources.files("cluster") / "recipes")


def recipe_names() -> list[str]:
    return sorted(p[: -len(".yaml")] for p in os.listdir(recipe_dir())
                  if p.endswith(".yaml") and not p.endswith(tuple(f"-{s}.yaml" for s in SIZES)))


def recipe_path(name: str, size: str = "full") -> str:
    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(recipe_names())}")
    if size not in SIZES:
        raise ConfigError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return os.path.join(recipe_dir(), f"{name}.yaml" if size == "full" else f"{name}-{size}.yaml")


def load_recipe(path: str) -> RecipeConfig:
    """A recipe YAML: ``preset``, ``data``, ``holdout``, ``workers``, ``cpus_per_worker``; ``train``: the
    TrainConfig fields every stage shares; ``stages``: per training stage, the fields that differ."""
    raw = read_yaml_mapping(path, ConfigError)
    if not all(isinstance(raw.get(k, {}) or {}, dict) for k in ("train", "stages")):
        raise ConfigError(f"{path}: train and stages must be mappings")
    defaults = from_dict(TrainConfig, raw.pop("train", None) or {}, "train")
    per_stage = raw.pop("stages", None) or {}
    unknown = sorted(set(per_stage) - set(RECIPE_ORDER))
    if unknown:
        raise ConfigError(f"{path}: unknown stage {unknown[0]!r} under stages; "
                          f"expected one of {', '.join(RECIPE_ORDER)}")
    head = from_dict(RecipeConfig, raw)
    stages = {s: from_dict(TrainConfig, per_stage.get(s) or {}, f"stages.{s}", base=defaults) for s in RECIPE_ORDER}
    return dataclasses.replace(head, stages=stages)


def read_state(output: str) -> dict | None:
    """``OUTPUT/_recipe/recipe.json``: what a (possibly interrupted) recipe run has done, or None."""
    try:
        return json.loads(read_bytes(join(output, STATE_FILE)))
    except FileNotFoundError:
        return None


def _write_state(output: str, state: dict) -> None:
    write_bytes_atomic(join(output, STATE_FILE), json.dumps(state, indent=2).encode())


def _keep_image_stages(output: str) -> None:
    """Copy the image-trained D and SR_l to ``OUTPUT/_image`` before the video stages replace them."""
    for name in IMAGE_STAGES:
        cfg, net = load_stage(output, name)
        save_stage(join(output, IMAGE_DIR), name, cfg, net)


def stage_preset(recipe: RecipeConfig, output: str) -> str:
    """The preset the recipe's stages train from: its preset, or, where the recipe chooses D^t's and ↑F's
    backbone, that preset with their networks replaced, written to ``OUTPUT/_recipe/preset.yaml``."""
    if recipe.backbone is None:
        return recipe.preset
    preset = load_preset(recipe.preset)
    network = {"backbone": recipe.backbone, "latte": recipe.latte or preset.decoder.latte}
    preset = dataclasses.replace(preset, decoder=dataclasses.replace(preset.decoder, **network),
                                 interpolation=dataclasses.replace(preset.interpolation, **network))
    write_bytes_atomic(join(output, PRESET_FILE), dump_yaml(preset).encode())
    return join(output, PRESET_FILE)


def run_recipe(recipe: RecipeConfig, output: str, *, data: str | None = None, log=None) -> dict:
    """Synthesise the data and train every stage of ``recipe`` into the bundle ``output``, on the connected
    Ray cluster; returns the recipe state (as written to recipe.json).

    Raises ConfigError for a recipe that cannot run, or an ``output`` holding a recipe run of other settings.
    """
    from workflows.train import TrainJob, has_run, run_training  # loaded only when a recipe runs

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    load_preset(recipe.preset)
    data = data or join(output, DATA_DIR)
    settings = recipe.settings()
    state = read_state(output)
    if state is None:
        state = {"settings": settings, "data": data, "image_baseline": join(output, IMAGE_DIR), "steps": {}}
    elif state["settings"] != settings or state["data"] != data:
        raise ConfigError(f"{output} holds a recipe run with other settings or data ({join(output, STATE_FILE)}): "
                          f"choose another --output")
    steps = state["steps"]
    preset = stage_preset(recipe, output)
    start = time.perf_counter()
    if "synth" not in steps:
        log(f"[recipe] synth: {recipe.data.images} captioned images, {recipe.data.videos} videos -> {data}")
        t0 = time.perf_counter()
        d = recipe.data
        written = synth(data, images=d.images, videos=d.videos, size=d.size, frames=d.frames, seed=d.seed,
                        holdout=parse_holdout(recipe.holdout), speed=d.speed)
        steps["synth"] = {"seconds": round(time.perf_counter() - t0, 1), **written}
        _write_state(output, state)
    for stage in RECIPE_ORDER:
        if stage == "decoder-video" and "keep-image-stages" not in steps:
            _keep_image_stages(output)
            steps["keep-image-stages"] = {"seconds": 0.0, "stages": list(IMAGE_STAGES)}
            _write_state(output, state)
        if stage in steps:
            log(f"[recipe] {stage}: done in an earlier run, skipped")
            continue
        cfg = recipe.stages[stage]
        job = TrainJob(stage=stage, data=(data,), output=output, config=cfg, preset=preset,
                       init=output if TRAINING_STAGES[stage].init else None, workers=recipe.workers,
                       cpus_per_worker=recipe.cpus_per_worker)
        resume = has_run(job)
        log(f"[recipe] {stage}: {cfg.max_steps} steps of batch {cfg.batch_size}" + (" (resuming)" if resume else ""))
        t0 = time.perf_counter()
        metrics = run_training(job, resume=resume)
        seconds = time.perf_counter() - t0
        steps[stage] = {"seconds": round(seconds, 1), "steps": int(metrics.get("step", cfg.max_steps)),
                        "loss": metrics.get("loss"), "resumed": resume}
        _write_state(output, state)
        log(f"[recipe] {stage}: done in {seconds:.0f}s, final loss {metrics.get('loss', float('nan')):.4f}")
    state["seconds"] = round(sum(s["seconds"] for s in steps.values()), 1)
    _write_state(output, state)
    log(f"[recipe] done: {state['seconds']:.0f}s of steps ({time.perf_counter() - start:.0f}s this run); "
        f"bundle {output}, image-only baseline {state['image_baseline']}")
    return state


def summary_lines(state: dict) -> list[str]:
    """One line per step: seconds and final loss."""
    lines = []
    for name, s in state["steps"].items():
        loss = s.get("loss")
        lines.append(f"  {name:<18} {s['seconds']:8.1f}s" + (f"  loss {loss:.4f}" if loss is not None else ""))
    return lines
