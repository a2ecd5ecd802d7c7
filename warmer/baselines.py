"""The simulator's baseline policies on the live cluster: `warmserve warmer --policy ondemand|...`.

A baseline (sim/policies.py: ondemand, ondemand-tuned, serverlessllm, ollama, static) is a `Policy` object that
acts on the simulator's `Sim` through a handful of calls: `instances`, `free_bytes`, `load`, `unload`, `place`,
`activate`, `deactivate`. `LiveCluster` offers those calls over one snapshot of the live cluster and turns every
action into a control job, so the live warmer runs the very decisions the simulator measures; nothing here
decides anything (static's placement is its own `setup`, made once; `keep_placement` only puts it in place). One
live worker is one device, so it is a node of one GPU. `load` becomes `activate` (the
worker moves COLD/HOST -> HOT in one job, reported LOADING meanwhile) and `unload` becomes `evict` (weights back to
host memory). Control jobs still queued, and those sent in the last heartbeat or so (taken by the worker but not
yet reported), are applied to the snapshot first, so no decision is sent twice.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import redis

from functions.spec import FunctionSpec, footprint
from invoker import history
from invoker.registry import Registry
from invoker.submit import live_workers_sync, send_control
from modelinfo import load_model_config
from protocol import keys
from protocol.messages import WorkerInfo
from protocol.settings import Settings
from protocol.states import ControlAction, ModelState
from sim import policies, sizing
from sim.cluster import SimFunction
from sim.engine_model import EngineModel, Profile, load_profile
from sim.models import shape
from sim.scenario import named_policy
from warmer.cluster import Action
from warmer.loop import queued_actions

log = logging.getLogger(__name__)
BASELINES = ("ondemand", "ondemand-tuned", "serverlessllm", "ollama", "static")
RESIDENT = (ModelState.LOADING, ModelState.WARM, ModelState.HOT)


@dataclass
class LiveInst:
    """What a policy reads of one instance (`sim.cluster.Inst`'s fields of the same names)."""

    iid: int
    f: int
    gpus: tuple[int, ...]
    node: int
    state: ModelState
    last_used: float
    shard: int
    busy: int = 0  # requests running on it or waiting in its function's stream
    kv_cap: float = math.inf

    def load(self) -> int:
        return self.busy


@dataclass
class LiveCluster:
    """The `Sim` calls a policy makes, over the live cluster; actions are sent as control jobs at once."""

    r: redis.Redis
    settings: Settings
    p: Profile
    fns: list[SimFunction]
    workers: list[WorkerInfo]
    need_bytes: list[int]  # per function: weights + KV pool, what a HOT copy takes on a worker
    target: list[int]
    queue: list[range] = field(default_factory=list)  # per function: requests waiting for any instance
    insts: dict[int, LiveInst] = field(default_factory=dict)
    host: list[set[int]] = field(default_factory=list)  # per node: functions in its host memory
    free: list[int] = field(default_factory=list)  # per GPU
    sent: list[tuple[str, Action]] = field(default_factory=list)  # (job id, action) sent by this snapshot
    planning: bool = False  # decide only, send nothing (static's placement, made once on empty GPUs)

    @property
    def n_nodes(self) -> int:
        return len(self.workers)

    gpn = 1

    @property
    def n_gpus(self) -> int:
        return len(self.workers)

    @property
    def cap(self) -> float:
        return float(min(w.total_bytes for w in self.workers))

    @property
    def on_gpu(self) -> list[list[LiveInst]]:
        return [[x for x in self.insts.values() if g in x.gpus] for g in range(self.n_gpus)]

    @property
    def weights(self) -> list[float]:
        return [float(sum(x.shard for x in self.insts.values() if g in x.gpus)) for g in range(self.n_gpus)]

    def instances(self, f: int) -> list[LiveInst]:
        return [x for x in self.insts.values() if x.f == f]

    def free_bytes(self, g: int) -> float:
        return float(self.free[g])

    physical_free = free_bytes  # no lending outside warmserve

    # -- actions
    def load(self, f: int, gpus: tuple[int, ...], then: ModelState, engine_start_s: float = 0.0) -> LiveInst:
        kind = ControlAction.ACTIVATE if then is ModelState.HOT else ControlAction.PREWARM
        self._send(kind, f, gpus[0])
        return self._add(f, gpus[0], ModelState.LOADING, time.time())

    place = load

    def unload(self, x: LiveInst) -> None:
        self._send(ControlAction.EVICT, x.f, x.node)
        self._drop(x)

    def activate(self, x: LiveInst) -> bool:
        self._send(ControlAction.ACTIVATE, x.f, x.node)
        x.state = ModelState.HOT
        return True

    def deactivate(self, x: LiveInst) -> None:
        self._send(ControlAction.DEACTIVATE, x.f, x.node)
        x.state = ModelState.WARM

    def _send(self, kind: ControlAction, f: int, node: int) -> None:
        if self.planning:
            return
        a = Action(kind, self.fns[f].name, self.workers[node].worker_id, (0,))
        self.sent.append((send_control(self.r, a.worker, kind, a.function, self.settings), a))

    def _add(self, f: int, node: int, state: ModelState, now: float, taken: bool = False) -> LiveInst:
        """A new instance; its memory leaves `free` unless the worker's report already counts it (`taken`)."""
        x = LiveInst(max(self.insts, default=0) + 1, f, (node,), node, state, now, self.fns[f].engine.m.shard_bytes)
        self.insts[x.iid] = x
        if not taken:
            self.free[node] -= self.need_bytes[f]
        return x

    def _drop(self, x: LiveInst) -> None:
        del self.insts[x.iid]
        self.free[x.node] += self.need_bytes[x.f]

    # -- building the snapshot
    def apply(self, a: Action, index: dict[str, int], now: float) -> None:
        """An action on its way, as if done: the worker will have done it before it runs anything sent now."""
        node = next((i for i, w in enumerate(self.workers) if w.worker_id == a.worker), None)
        if node is None or a.function not in index:
            return
        f = index[a.function]
        x = next((x for x in self.instances(f) if x.node == node), None)
        if a.kind in (ControlAction.ACTIVATE, ControlAction.PREWARM) and x is None:
            self._add(f, node, ModelState.LOADING, now)
        elif a.kind is ControlAction.EVICT and x is not None:
            self._drop(x)
        elif a.kind is ControlAction.DEACTIVATE and x is not None:
            x.state = ModelState.WARM


def sim_function(spec: FunctionSpec, profile: Profile, settings: Settings) -> SimFunction:
    """A live function as the simulator sizes it: its model's shape from its config.json, in its serving dtype."""
    cfg = load_model_config(spec.model, builtin=spec.engine == "builtin")
    eng = EngineModel(profile, shape(spec.name, cfg, tp=1, dtype=spec.dtype))
    # Live, nothing is known of its requests' sizes: sized for the engine's SLO-sized request
    full = sizing.size(eng, profile.usable_bytes, np.zeros(0), np.zeros(0))
    return SimFunction(
        name=spec.name,
        model=spec.name,
        engine=eng,
        slo_ttft_s=spec.slo.ttft_ms / 1000,
        capacity_rps=full.capacity_rps,
        keep_alive_s=spec.scaling.keep_alive_s,
        target_concurrency=max(1, int(full.batch * profile.capacity_headroom)),
        kv_full_bytes=full.pool_bytes,
    )


def day_windows(settings: Settings) -> int:
    """Forecast windows in a (possibly compressed) day."""
    return max(1, round(86_400 / (settings.window_s * settings.time_scale)))


def past_mean_rps(counts: np.ndarray, settings: Settings) -> np.ndarray:
    """Mean rate per function over the last day of per-window counts (functions, windows): what `static` places
    by live, where the run's true mean (the simulator's oracle) is unknown. bench/replay.py predicts with it too."""
    last = counts[:, -day_windows(settings) :]
    return last.sum(axis=1) / (max(1, last.shape[1]) * settings.window_s)


def mean_rates(r: redis.Redis, names: list[str], now: float, settings: Settings) -> np.ndarray:
    s = settings
    counts = [history.read_counts(r, n, now, s.window_s, day_windows(s), s.history_bucket_s) for n in names]
    return past_mean_rps(np.array(counts), s)


class BaselineWarmer:
    """Runs one baseline policy against the live cluster: `step` every `poll_s`."""

    # The simulator calls a baseline the moment a request waits; polling this often keeps the live reaction
    # well under one heartbeat.
    poll_s = 0.1

    def __init__(self, r: redis.Redis, name: str, settings: Settings, profile: Profile | None = None) -> None:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
        self.r, self.name, self.settings = r, name, settings
        self.profile = profile or load_profile()
        self.policy: policies.Policy | None = None
        self.names: list[str] = []
        self.fns: list[SimFunction] = []
        self.need: list[int] = []
        self.placement: list[tuple[int, int]] = []  # static: (function, node) replicas to keep HOT
        self.recent: dict[str, tuple[float, Action]] = {}  # job id -> (sent at, action)

    def snapshot(self, specs: dict[str, FunctionSpec], workers: list[WorkerInfo], now: float) -> LiveCluster:
        index = {n: i for i, n in enumerate(self.names)}
        assert self.policy is not None
        target = [self.policy.target_concurrency or fn.target_concurrency for fn in self.fns]
        c = LiveCluster(self.r, self.settings, self.profile, self.fns, workers, self.need, target)
        c.free = [w.free_bytes for w in workers]
        c.host = [{index[fn] for fn, s in w.models.items() if fn in index and s == ModelState.HOST} for w in workers]
        # An invocation stays in its stream until its whole answer is written, so the stream's length is exact now;
        # the running counts come with the last heartbeat (up to a second old) and cannot exceed it.
        depth = {n: int(self.r.xlen(keys.invocations(n))) for n in self.names}
        running = {n: min(depth[n], sum(w.inflight.get(n, 0) for w in workers)) for n in self.names}
        queued = {n: depth[n] - running[n] for n in self.names}
        c.queue = [range(queued[n]) for n in self.names]
        for node, w in enumerate(workers):
            for fn, state in w.models.items():
                if fn in index and state in RESIDENT:
                    x = c._add(index[fn], node, state, w.last_used.get(fn, w.started), taken=True)
                    x.busy = min(w.inflight.get(fn, 0), depth[fn]) + queued[fn]
        self.recent = {j: (t, a) for j, (t, a) in self.recent.items() if now - t < 1.5 * self.settings.heartbeat_s}
        for a in queued_actions(self.r, workers) + [a for _, a in self.recent.values()]:
            c.apply(a, index, now)  # a job both queued and recent applies once: the second finds it done
        return c

    def step(self, now: float | None = None) -> list[Action]:
        """One round: the policy decides on a fresh snapshot; returns the actions sent."""
        now = time.time() if now is None else now
        specs = {n: s for n, s in Registry(self.r).all().items() if s.engine == "builtin"}
        workers = live_workers_sync(self.r, self.settings)
        if not specs or not workers:
            return []
        if sorted(specs) != self.names or self.policy is None:
            self.names = sorted(specs)
            self.fns = [sim_function(specs[n], self.profile, self.settings) for n in self.names]
            self.need = [_need(specs[n], self.settings) for n in self.names]
            rates = mean_rates(self.r, self.names, now, self.settings)
            self.policy = named_policy(self.name, self.settings, rates, np.zeros((len(self.names), 0)))
            self.placement = self.place_static(specs, workers, now) if self.name == "static" else []
        c = self.snapshot(specs, workers, now)
        if self.name == "static":
            self.keep_placement(c)
        else:
            self.policy.on_tick(c, now)
        for job, a in c.sent:
            self.recent[job] = (now, a)
        return [a for _, a in c.sent]

    def place_static(
        self, specs: dict[str, FunctionSpec], workers: list[WorkerInfo], now: float
    ) -> list[tuple[int, int]]:
        """Static places once, on empty GPUs: run its setup on a cluster with nothing resident, sending nothing."""
        empty = [replace(w, models={}, free_bytes=w.total_bytes) for w in workers]
        c = self.snapshot(specs, empty, now)
        c.insts.clear()  # jobs in flight do not matter to a placement made from scratch
        c.free = [w.total_bytes for w in workers]
        c.planning = True
        assert self.policy is not None
        self.policy.setup(c)
        return sorted((x.f, x.node) for x in c.insts.values())

    def keep_placement(self, c: LiveCluster) -> None:
        """Make the live cluster hold exactly static's placement: evict what is not in it, activate what is."""
        want = set(self.placement)
        for x in list(c.insts.values()):
            if (x.f, x.node) not in want and x.state is not ModelState.LOADING and not x.busy:
                c.unload(x)
        for f, node in self.placement:
            x = next((x for x in c.instances(f) if x.node == node), None)
            if x is None:
                c.load(f, (node,), ModelState.HOT)
            elif x.state is ModelState.WARM:
                c.activate(x)


def _need(spec: FunctionSpec, settings: Settings) -> int:
    size = footprint(spec, settings.kv_seqs)
    return size.weight_bytes + size.kv_bytes


def run_baseline(r: redis.Redis, name: str, settings: Settings) -> None:
    warmer = BaselineWarmer(r, name, settings)
    log.info("warmer running the %s baseline (sim/policies.py) every %.1f s", name, warmer.poll_s)
    while True:
        t0 = time.monotonic()
        try:
            # the gateway's router leaves cold functions to the baseline while this is fresh: a stopped warmer
            # hands them back within seconds
            r.set(keys.WARMER_POLICY, name, ex=10)
            for a in warmer.step():
                log.info("%s: %s %s on %s", name, a.kind, a.function, a.worker)
        except redis.RedisError as exc:
            log.warning("warmer: Redis unreachable (%s); retrying", exc)
        except Exception:  # a bad round must not stop the policy for good
            log.exception("warmer: %s round failed", name)
        time.sleep(max(0.0, warmer.poll_s - (time.monotonic() - t0)))
