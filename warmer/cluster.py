"""The cluster as the placement planner sees it: plain data, no I/O.

The live warmer fills a `ClusterView` from Redis; the simulator fills it from its own state. Both hand it to
`warmer.placement.plan`, so one policy runs in both places.

Vocabulary (the states and control actions themselves are defined in protocol/states.py):
- a *worker* is one host with GPUs, a pinned host-memory cache of weights and a disk;
- an *instance* is one function's weights on a group of `tp` GPUs of one worker, in one `ModelState`;
- `HOST` is not an instance state: a function is HOST on a worker when its weights sit in that worker's host cache
  (`Worker.host_cached`), ready to copy to a GPU at PCIe speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from protocol.states import ControlAction, ModelState


@dataclass(frozen=True)
class GPU:
    index: int  # GPU index within its worker
    capacity_bytes: int
    free_bytes: int  # not used by any weights, KV pages in use, or KV reservations
    # KV pages reserved by HOT instances on this GPU but idle now: may hold WARM weights of other functions until
    # the lender needs them back (the borrower then drops to HOST).
    lendable_kv_bytes: int = 0


@dataclass(frozen=True)
class Worker:
    name: str
    gpus: tuple[GPU, ...]
    host_cached: frozenset[str] = frozenset()  # functions whose weights are in pinned host memory (HOST)
    host_loading: frozenset[str] = frozenset()  # disk -> host copies in flight


@dataclass(frozen=True)
class Instance:
    function: str
    worker: str
    gpus: tuple[int, ...]  # GPU indices within the worker, len == FunctionSpec.tp
    state: ModelState
    since: float  # when it entered this state (s, same clock as `now`)
    last_used: float  # last time it finished or admitted a request
    inflight: int = 0  # requests admitted and not finished
    kv_used_bytes: int = 0  # per GPU: KV pages holding live requests
    kv_reserved_bytes: int = 0  # per GPU: KV pages this instance may grow into (0 unless HOT)


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    weight_bytes: int  # whole model; each GPU of an instance holds weight_bytes / tp
    kv_bytes: int  # KV bytes one HOT instance wants per GPU (its reservation)
    tp: int = 1  # GPUs per instance
    min_instances: int = 0  # resident (WARM/HOT) instances kept at all times
    max_instances: int = 8
    keep_alive_s: float = 60.0  # idle time before a HOT instance is deactivated / a WARM one may be evicted
    slo_ttft_s: float = 1.0
    capacity_rps: float = 1.0  # requests/s one HOT instance serves within its SLO (from the engine profile)

    @property
    def shard_bytes(self) -> int:
        return -(-self.weight_bytes // self.tp)


@dataclass(frozen=True)
class Load:
    """What the gateway and invoker see right now for one function."""

    # over the last 30-60 s: a rate over one planner tick is burst noise the plan would chase
    arrivals_rps: float = 0.0
    inflight: int = 0
    queued: int = 0  # requests waiting for any instance


@dataclass(frozen=True)
class ClusterView:
    workers: tuple[Worker, ...]
    functions: dict[str, FunctionSpec]
    instances: tuple[Instance, ...]
    load: dict[str, Load] = field(default_factory=dict)

    def worker(self, name: str) -> Worker:
        for w in self.workers:
            if w.name == name:
                return w
        raise KeyError(f"no worker named {name!r} in the cluster view")


@dataclass(frozen=True)
class Action:
    """One control step for one worker. `gpus` is empty for load_host (disk -> host cache, no GPU involved).

    - load_host: disk -> pinned host cache of `worker`
    - prewarm: HOST -> WARM on `gpus` (weights copied to GPU memory, no KV)
    - activate: WARM -> HOT (map KV pages, start serving)
    - deactivate: HOT -> WARM (release KV pages, keep weights)
    - evict: WARM -> HOST (free the GPU memory of the weights)
    """

    kind: ControlAction
    function: str
    worker: str
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Control jobs read back from a worker's queue carry the kind as its string value.
        object.__setattr__(self, "kind", ControlAction.parse(self.kind))


def apply_actions(view: ClusterView, actions: list[Action], now: float) -> ClusterView:
    """The view as it will be once `actions` are under way: what a planner must see to not repeat itself.

    load_host marks the function host_loading; prewarm adds a LOADING instance and takes its memory; activate
    takes its KV pool and deactivate gives it back; evict frees the weights."""
    workers = {w.name: w for w in view.workers}
    insts = list(view.instances)
    for a in actions:
        spec = view.functions[a.function]
        w = workers[a.worker]
        if a.kind is ControlAction.LOAD_HOST:
            workers[a.worker] = replace(w, host_loading=w.host_loading | {a.function})
            continue
        key = (a.function, a.worker, tuple(a.gpus))
        idx = next((i for i, x in enumerate(insts) if (x.function, x.worker, x.gpus) == key), None)
        if a.kind is ControlAction.PREWARM:
            if idx is not None:
                raise ValueError(f"prewarm of {key} but an instance is already there")
            insts.append(Instance(a.function, a.worker, tuple(a.gpus), ModelState.LOADING, now, now))
            workers[a.worker] = _take(w, a.gpus, spec.shard_bytes)
            continue
        if idx is None:
            raise ValueError(f"{a.kind} of {key}: no such instance")
        x = insts[idx]
        if a.kind is ControlAction.EVICT:
            insts.pop(idx)
            workers[a.worker] = _take(w, a.gpus, -spec.shard_bytes)
        else:
            hot = a.kind is ControlAction.ACTIVATE
            insts[idx] = replace(x, state=ModelState.HOT if hot else ModelState.WARM, since=now)
            workers[a.worker] = _take(w, a.gpus, spec.kv_bytes if hot else -spec.kv_bytes)
    return replace(view, workers=tuple(workers[w.name] for w in view.workers), instances=tuple(insts))


def _take(w: Worker, gpus: tuple[int, ...], nbytes: int) -> Worker:
    """Worker with `nbytes` taken from (or, if negative, given back to) the free memory of `gpus`.

    Taking uses free bytes first, then lendable KV bytes."""
    out = []
    for g in w.gpus:
        if g.index not in gpus:
            out.append(g)
            continue
        free, lend = g.free_bytes - nbytes, g.lendable_kv_bytes
        if free < 0:
            lend, free = lend + free, 0
        out.append(replace(g, free_bytes=free, lendable_kv_bytes=max(lend, 0)))
    return replace(w, gpus=tuple(out))
