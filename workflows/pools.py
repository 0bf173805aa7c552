"""Per-stage actor pools for batch jobs, read from a YAML file (default ``cluster/pools.yaml``).

    decoder:
      actors: {min: 1, max: 4}   # or {min: 1, max: 4, initial: 2}, or a fixed count: actors: 2
      gpus: 1                    # per actor, fractional allowed
      cpus: 1                    # per actor; also the torch thread count inside it
      batch_size: 2
      resources: {decoder_node: 1}   # optional custom resources (pin to a node type)
      compile: true              # optional: torch.compile the stage's network (slower first call)

Every stage has its own section; a stage left out gets the defaults below. Unknown stages or keys
are errors that name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from stages.config import STAGE_NAMES, ConfigError
from stages.fsio import parse_yaml_mapping, read_yaml_mapping

POOL_STAGES = (*STAGE_NAMES, "writer")


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    min_actors: int = 1             # the pool never shrinks below this many actors
    max_actors: int = 1             # nor grows beyond this many (the engine balances stage throughputs between)
    initial_actors: int | None = None  # actors started with the job (default: min_actors)
    gpus: float = 0.0               # GPUs per actor (fractional: several actors share a GPU)
    cpus: float = 1.0               # CPUs per actor
    batch_size: int = 1             # rows per call
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor
    queue_depth: int = 2            # calls queued per actor, so an actor never waits for the driver
    compile: bool = False           # torch.compile the stage's network (a stage's pool only, not the writer's)

    def __post_init__(self) -> None:
        if self.min_actors < 1 or self.max_actors < self.min_actors:
            raise ConfigError(f"actors: need 1 <= min <= max, got min={self.min_actors} max={self.max_actors}")
        if self.initial_actors is not None and not self.min_actors <= self.initial_actors <= self.max_actors:
            raise ConfigError(f"actors: need min <= initial <= max, got min={self.min_actors} "
                              f"initial={self.initial_actors} max={self.max_actors}")
        if self.gpus < 0 or self.cpus < 0:
            raise ConfigError("gpus and cpus must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.queue_depth < 1:
            raise ConfigError(f"queue_depth must be >= 1, got {self.queue_depth}")

    @property
    def start_actors(self) -> int:
        """Actors the pool starts with."""
        return self.min_actors if self.initial_actors is None else self.initial_actors


def default_pools_file() -> str:
    return str(resources.files("cluster") / "pools.yaml")


def _pool(stage: str, data: object) -> PoolConfig:
    if data is None:
        return PoolConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{stage}: expected a mapping")
    known = {"actors", "gpus", "cpus", "batch_size", "resources", "queue_depth"} | ({"compile"} if stage in STAGE_NAMES else set())
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key '{stage}.{unknown[0]}'; expected one of: {', '.join(sorted(known))}")
    kwargs: dict = {}
    actors = data.get("actors", 1)
    if isinstance(actors, dict):
        extra = sorted(set(actors) - {"min", "max", "initial"})
        if extra:
            raise ConfigError(f"unknown key '{stage}.actors.{extra[0]}'; expected min, max, initial")
        kwargs["min_actors"] = _int(f"{stage}.actors.min", actors.get("min", 1))
        kwargs["max_actors"] = _int(f"{stage}.actors.max", actors.get("max", kwargs["min_actors"]))
        if "initial" in actors:
            kwargs["initial_actors"] = _int(f"{stage}.actors.initial", actors["initial"])
    else:
        kwargs["min_actors"] = kwargs["max_actors"] = _int(f"{stage}.actors", actors)
    for key in ("gpus", "cpus"):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{stage}.{key}: expected a number, got {value!r}")
            kwargs[key] = float(value)
    for key in ("batch_size", "queue_depth"):
        if key in data:
            kwargs[key] = _int(f"{stage}.{key}", data[key])
    if "compile" in data:
        if not isinstance(data["compile"], bool):
            raise ConfigError(f"{stage}.compile: expected true or false, got {data['compile']!r}")
        kwargs["compile"] = data["compile"]
    if "resources" in data:
        res = data["resources"] or {}
        if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in res.values()):
            raise ConfigError(f"{stage}.resources: expected a mapping of resource name to amount")
        kwargs["resources"] = {str(k): float(v) for k, v in res.items()}
    try:
        return PoolConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{stage}: {e}") from None


def _int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def parse_pools(text: str, where: str = "pools") -> dict[str, PoolConfig]:
    """The pools of a YAML text; ConfigError naming ``where`` and the bad stage or key."""
    return _pools(parse_yaml_mapping(text, where, ConfigError), where)


def load_pools(url: str | None = None) -> dict[str, PoolConfig]:
    """The pools of a YAML file (local path or fsspec URL; default ``cluster/pools.yaml``)."""
    url = url or default_pools_file()
    return _pools(read_yaml_mapping(url, ConfigError), url)


def _pools(data: dict, where: str) -> dict[str, PoolConfig]:
    unknown = sorted(set(data) - set(POOL_STAGES))
    if unknown:
        raise ConfigError(f"{where}: unknown stage {unknown[0]!r}; expected one of: {', '.join(POOL_STAGES)}")
    try:
        return {stage: _pool(stage, data.get(stage)) for stage in POOL_STAGES}
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None

