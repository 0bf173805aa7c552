"""What a command asks of a Ray cluster it joins, checked against what the cluster has: never a silent wait.

When ``mav batch``, ``mav serve`` or ``mav train`` joins a cluster, :func:`check_cluster` compares the first
actors of every pool, the first replicas of every deployment or the training workers (:class:`Need`) with the
nodes' total resources (``ray.nodes()``). A need that no node can ever meet, with no autoscaler configured to
add a node that could, stops the command at once with one line (:class:`ResourceError`) naming the stage, the
shortfall and how to fix it. A need the cluster can meet later (resources held by other jobs, nodes an
autoscaler may add, a node lost mid-job) is shown while it lasts: :class:`WaitWatch` says ``waiting for
resources: ...`` with what is pending, again every few seconds.

Ray's own libraries read the autoscaler's node types the same way (``ray.data``'s ``is_autoscaling_enabled``,
``ray.train``'s worker-group check): from the cluster config the autoscaler reports to the GCS.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from stages.errors import UserError

WAITING = "waiting for resources: "
HOW_TO_GROW = {
    "CPU": "start nodes with more CPUs (ray start --num-cpus N)",
    "GPU": "start nodes with GPUs (ray start --num-gpus N)",
}


class ResourceError(UserError):
    """The cluster can never hold what a command asks for."""


@dataclass(frozen=True)
class Need:
    """``count`` actors of one stage (a pool, a deployment, the training workers), each asking for ``each``."""

    stage: str
    count: int
    each: dict[str, float]   # Ray resources of one actor: CPU, GPU, custom


def fmt(amounts: dict[str, float]) -> str:
    """``{"CPU": 1.0, "GPU": 0.5}`` -> ``1 CPU, 0.5 GPU``."""
    return ", ".join(f"{v:g} {k}" for k, v in amounts.items() if v > 0) or "nothing"


def _fits(each: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in each.items() if v > 0)


def _pack(needs: list[Need], nodes: list[dict[str, float]]) -> Need | None:
    """First fit of every actor onto the nodes, in the order given; the need of the first one that fits
    nowhere, or None."""
    free = [dict(n) for n in nodes]
    for need in needs:
        for _ in range(need.count):
            node = next((f for f in free if _fits(need.each, f)), None)
            if node is None:
                return need
            for k, v in need.each.items():
                node[k] = node.get(k, 0.0) - v
    return None


def _fix(resource: str, fix: str) -> str:
    grow = HOW_TO_GROW.get(resource, f"start a node with it (ray start --resources '{{\"{resource}\": N}}')")
    return f"{fix}, or {grow}"


def shortfall(needs: list[Need], nodes: list[dict[str, float]], node_types: list[dict[str, float]] | None,
              *, what: str, fix: str) -> str | None:
    """Why ``needs`` can never be met by ``nodes`` (each node's total resources) and, where an autoscaler is
    configured, the node types it may add (``node_types``); None if they can. ``what`` names the needs in
    the message (``the pools``), ``fix`` says how to ask for less (``give the pools fewer actors``)."""
    too_big = _too_big(needs, nodes + (node_types or []), autoscaled=bool(node_types), fix=fix)
    if too_big is not None or node_types:  # with an autoscaler, the rest is a wait, shown while it lasts
        return too_big
    return _unplaceable(needs, nodes, what=what, fix=fix)


def _too_big(needs: list[Need], candidates: list[dict[str, float]], *, autoscaled: bool, fix: str) -> str | None:
    """The first need of which not even one actor fits any node (or node type)."""
    for need in needs:
        if any(_fits(need.each, n) for n in candidates):
            continue
        short = next(k for k, v in need.each.items() if v > 0 and not any(n.get(k, 0.0) + 1e-9 >= v for n in candidates))
        most = max((n.get(short, 0.0) for n in candidates), default=0.0)
        has = f"the most any has is {most:g}" if most else "none has any"
        where = "no node or node type" if autoscaled else "no node"
        auto = "" if autoscaled else " and no autoscaler adds nodes"
        return (f"{need.stage}: one actor asks for {fmt(need.each)}, and {where} has {need.each[short]:g} {short} "
                f"({has}{auto}): {_fix(short, fix)}")
    return None


def _unplaceable(needs: list[Need], nodes: list[dict[str, float]], *, what: str, fix: str) -> str | None:
    """The first need whose actors cannot all be placed on the nodes with the others (first fit in the given
    order, and by size), the resource it runs out of and how far short the whole falls."""
    stuck = _pack(needs, nodes)
    if stuck is None or _pack(sorted(needs, key=lambda n: sorted(n.each.items()), reverse=True), nodes) is None:
        return None
    total: Counter[str] = Counter()
    for need in needs:
        for k, v in need.each.items():
            total[k] += v * need.count
    have = Counter({k: sum(n.get(k, 0.0) for n in nodes) for k in total})
    over = [k for k in total if total[k] > have[k] + 1e-9 and stuck.each.get(k, 0) > 0]
    if over:
        short = over[0]
        count = f"{len(nodes)} node{'s have' if len(nodes) != 1 else ' has'}"
        detail = (f"{what} ask for {total[short]:g} {short} in all, the cluster's {count} {have[short]:g} "
                  f"and no autoscaler adds nodes")
    else:
        short = next(k for k, v in stuck.each.items() if v > 0)
        detail = f"no node has {fmt(stuck.each)} left once the others are placed, and no autoscaler adds nodes"
    return f"{stuck.stage} cannot be placed ({stuck.count} × {fmt(stuck.each)}): {detail}: {_fix(short, fix)}"


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every live node of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def autoscaler_node_types() -> list[dict[str, float]] | None:
    """Resources of each node type an autoscaler may add (None: no autoscaler configured to add any)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS without the autoscaler's state: treated as no autoscaler
        return None
    if not config or not config.node_group_configs:
        return None
    types = [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs
             if g.resources and g.max_count != 0 and (g.max_count == -1 or g.max_count > g.min_count)]
    return types or None


def check_cluster(needs: list[Need], *, what: str, fix: str) -> None:
    """Raise ResourceError if the connected cluster can never hold ``needs`` (see :func:`shortfall`)."""
    reason = shortfall([n for n in needs if n.count > 0], cluster_nodes(), autoscaler_node_types(), what=what, fix=fix)
    if reason is not None:
        raise ResourceError(f"the cluster cannot hold {what}: {reason}")


def pool_needs(pools: dict, use_gpus: bool) -> list[Need]:
    """The first actors of every ``mav batch`` pool (``workflows.pools.PoolConfig``), GPUs dropped where the
    cluster has none (as the executor drops them)."""
    return [Need(stage, p.min_actors, {"CPU": p.cpus, "GPU": p.gpus if use_gpus else 0.0, **p.resources})
            for stage, p in pools.items()]


def replica_needs(overrides: dict[str, dict], default_cpus: dict[str, float]) -> list[Need]:
    """The first replicas of every Serve deployment in ``default_cpus`` (name -> CPUs per replica where its
    options do not say), from a Serve config's per-deployment options (``num_replicas`` or the autoscaling
    config's initial or minimum replicas, ``ray_actor_options``)."""
    needs = []
    for name, cpus in default_cpus.items():
        opts = overrides.get(name, {})
        actor = opts.get("ray_actor_options") or {}
        auto = opts.get("autoscaling_config") or {}
        replicas = opts.get("num_replicas", 1)
        if auto or replicas == "auto":
            replicas = auto.get("initial_replicas") or auto.get("min_replicas") or 1
        each = {"CPU": float(actor.get("num_cpus", cpus)), "GPU": float(actor.get("num_gpus") or 0.0),
                **{k: float(v) for k, v in (actor.get("resources") or {}).items()}}
        needs.append(Need(name, max(1, int(replicas)), each))
    return needs


def anything_waits() -> bool:
    """Whether any demand of the cluster waits for resources (the raylets' queued requests, as the
    autoscaler reads them); True if Ray cannot say."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
    except Exception:
        return True
    return bool(state.pending_resource_requests or state.pending_gang_resource_requests)


def waiting_actors(label: Callable[[str], str | None]) -> Counter[str]:
    """Actors of the cluster that wait for a node to hold them (created or restarting, no worker yet, while
    some demand of the cluster waits for resources: an actor whose worker process is only starting does not
    count), by ``label(actor name)``; names it labels None are not counted. Empty if Ray cannot say."""
    import ray._private.state

    counts: Counter[str] = Counter()
    if not anything_waits():
        return counts
    for state in ("PENDING_CREATION", "RESTARTING"):
        try:
            table = ray._private.state.actors(actor_state_name=state)
        except Exception:
            return Counter()
        for info in table.values():
            name = label(info.get("Name") or "")
            if name is not None and not (info.get("Address") or {}).get("Port"):  # no worker holds it yet
                counts[name] += 1
    return counts


def waiting_replicas(app: str) -> str:
    """What of the Serve application ``app`` waits for resources: its replicas not yet placed, by deployment
    (Serve names a replica's actor ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    prefix = f"SERVE_REPLICA::{app}#"

    def deployment(name: str) -> str | None:
        return name[len(prefix):].split("#", 1)[0] if name.startswith(prefix) else None

    counts = waiting_actors(deployment)
    return ", ".join(f"{d} {n} replica{'s' if n > 1 else ''}" for d, n in counts.items())


def waiting_placement_groups() -> list[list[dict[str, float]]]:
    """The bundles of every placement group still waiting for its resources (Ray Train's worker groups)."""
    from ray.util import placement_group_table

    try:
        table = placement_group_table()
    except Exception:
        return []
    return [list(pg.get("bundles", {}).values()) for pg in table.values() if pg.get("state") == "PENDING"]


class WaitWatch:
    """A thread that calls ``show(line)`` with ``waiting for resources: ...`` (what ``describe()`` returns)
    when something waits, and ``show(None)`` once nothing does: at every change and every ``every``
    seconds while the wait lasts: ``start()`` ... ``close()``, or a ``with`` block."""

    def __init__(self, describe: Callable[[], str], show: Callable[[str | None], None], every: float = 15.0,
                 poll: float = 1.0) -> None:
        self.describe, self.show, self.every, self.poll = describe, show, every, poll
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mav-wait-watch", daemon=True)

    def _run(self) -> None:
        last, shown_at = "", 0.0
        while not self.stop.wait(self.poll):
            try:
                text = self.describe()
            except Exception:  # the cluster could not be asked this time: ask again at the next poll
                continue
            now = time.monotonic()
            if text != last or (text and now - shown_at >= self.every):
                self.show(WAITING + text if text else None)
                last, shown_at = text, now

    def start(self) -> WaitWatch:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> WaitWatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def print_waits(stream=None) -> Callable[[str | None], None]:
    """A ``show`` for :class:`WaitWatch` that prints each line, and ``resources arrived`` once a wait ends."""
    import sys

    def show(line: str | None) -> None:
        out = stream if stream is not None else sys.stderr
        print(line if line else "resources arrived; going on", file=out, flush=True)

    return show
