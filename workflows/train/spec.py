"""What a training run is: the stage, its data, the bundle it writes, its config and resources.

Shared by the job runner (``workflows.train.job``) and the loop every worker runs (``workflows.train.loop``).
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.checkpoint import load_stage
from stages.fsio import absolute, join
from stages.training import TrainConfig, TrainingStage, start_network, training_stage
from workflows.presets import DEFAULT_PRESET, load_preset

TRAIN_DIR = "_train"
MAX_VIDEO_FRAMES = 256  # frames of a training video decoded (clips are sampled from them)


@dataclass(frozen=True)
class TrainJob:
    stage: str                      # a training stage (stages.training.TRAINING_STAGES)
    data: tuple[str, ...]           # data roots, directories, files or globs (local or fsspec URLs)
    output: str                     # the checkpoint bundle the stage is written into
    config: TrainConfig
    preset: str = DEFAULT_PRESET    # preset name or YAML path: the network sizes
    init: str | None = None         # bundle holding the stage this one starts from
    clip: str | None = None         # bundle holding the CLIP stage (default: output)
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 3

    def __post_init__(self) -> None:
        # Ray Train's workers run in a directory of their own: a relative local path would name another
        # file there (a preset not found, a checkpoint written where nobody looks), so each is made absolute.
        object.__setattr__(self, "data", tuple(absolute(url) for url in self.data))
        for name in ("output", "init", "clip"):
            if getattr(self, name):
                object.__setattr__(self, name, absolute(getattr(self, name)))
        if self.preset.endswith((".yaml", ".yml")):
            object.__setattr__(self, "preset", absolute(self.preset))

    @property
    def spec(self) -> TrainingStage:
        return training_stage(self.stage)

    @property
    def run_dir(self) -> str:
        return join(self.output, TRAIN_DIR, self.stage)

    def trainable_parameters(self, net) -> set[str] | None:
        """Names of the only parameters of ``net`` to train; None: as the config says (``temporal_only``)."""
        return None

    def initial_network(self):
        """(stage config, network) a fresh run starts from: built from the preset, or from ``init``."""
        spec = self.spec
        init = load_stage(self.init, spec.init) if spec.init and self.init else None
        return start_network(spec, load_preset(self.preset), init)
