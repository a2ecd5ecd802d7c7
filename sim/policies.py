"""Serving policies, all through one interface (`Policy`), so the simulator compares like with like.

- warmserve: this project. Forecast per function (warmer.forecast), evict-aware prewarming and scale decisions from
  warmer.placement.plan (the same code the live warmer runs), a KV pool per HOT instance with its idle part lent
  to WARM weights and, as far as the lender's forecast leaves it idle, to new pools (reclaimed by the lender
  when it needs the pages), and a fast path that activates a WARM copy (milliseconds) the moment
  a function is short of capacity. `Ablation` takes one technique away, or makes the forecast perfect.
- ondemand: ServerlessLLM-like. An instance owns its GPUs. Load on demand from host memory at PCIe speed (disk when
  the host cache misses, pipelined), then an engine start; scale out when instances are saturated; keep-alive,
  then scale to zero. Idle instances are evicted (LRU) when GPUs are needed: generous to the baseline.
  `serverlessllm()` is the same mechanism with ServerlessLLM's documented defaults (keep-alive 0, target
  concurrency 1, at most 10 instances); `ondemand-tuned` has the best keep-alive of a sweep (TUNED_KEEP_ALIVE_S).
- ollama: Ollama as documented. One instance per function serving one request at a time (OLLAMA_NUM_PARALLEL 1),
  several functions per GPU when memory allows, LRU unload of idle models when memory is needed, keep_alive
  5 min, at most 3 x GPUs loaded models, at most 512 queued requests, then 503.
- static: MuxServe-like. A fixed set of co-resident instances sharing GPUs (memory and compute), placed once from
  the *true* mean rate of each function over the run (oracle knowledge, generous to the baseline): replicas are
  added to the most loaded function while memory allows, each on the least loaded GPUs. No loading ever.
- always-warm: every function resident on its own GPUs with replicas for its mean rate, on as many GPUs as that
  takes (an upper bound for cold-start cost, not a real option on the same cluster).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from protocol.settings import DEFAULTS, Settings
from protocol.states import ControlAction, ModelState
from sim import sizing
from sim.cluster import Inst, Sim
from warmer.cluster import GPU, ClusterView, FunctionSpec, Instance, Load, Worker
from warmer.forecast import Prediction, act_on, for_settings, live_rate, this_and_next
from warmer.placement import Options, plan

KV_MIN_BYTES = 8e9  # per GPU left for KV when a baseline places weights on a shared GPU


class Policy:
    name = ""
    tick_s: float | None = None
    target_concurrency: int | None = None  # requests per instance before on_pressure (None: the function's)
    max_batch: int | None = None  # requests an instance runs at once (None: the profile's)
    max_queue: int | None = None  # requests waiting in the whole cluster before new ones get 503 (None: no limit)
    lends: bool = False  # idle KV pool memory may hold other functions' WARM weights and (pool_lend) new pools

    def kv_reserve(self, f: int) -> float:
        """KV pool per GPU an instance of f holds while HOT (0: its requests take free memory as they come)."""
        return 0.0

    def pool_lend(self, sim: Sim, g: int, x: Inst) -> float:
        """Bytes of other HOT instances' idle pools on GPU g that x's pool may share when x is activated."""
        return 0.0

    def setup(self, sim: Sim) -> None:
        """Initial placement (instances carried over from before the run are placed with Sim.place)."""

    def on_pressure(self, sim: Sim, f: int, now: float) -> None:
        """A request of f found no HOT instance with room, or every one above its target concurrency."""

    def on_tick(self, sim: Sim, now: float) -> None: ...

    def on_ready(self, sim: Sim, x: Inst, now: float) -> None:
        """A load finished (x is now in its target state)."""


def _groups(sim: Sim, tp: int) -> list[tuple[int, ...]]:
    return [
        tuple(range(node * sim.gpn + i, node * sim.gpn + i + tp))
        for node in range(sim.n_nodes)
        for i in range(0, sim.gpn - tp + 1, tp)
    ]


def _idle(x: Inst) -> bool:
    return x.state is not ModelState.LOADING and x.load() == 0


# --------------------------------------------------------------------------- baselines
class AlwaysWarm(Policy):
    name = "always-warm"

    def __init__(self, mean_rps: np.ndarray):
        self.mean_rps = mean_rps

    @staticmethod
    def gpus_needed(sim_fns, mean_rps: np.ndarray) -> int:
        return sum(f.engine.m.tp * _replicas(f, r) for f, r in zip(sim_fns, mean_rps, strict=True))

    def setup(self, sim: Sim) -> None:
        nxt = 0
        for f, fn in enumerate(sim.fns):
            for _ in range(_replicas(fn, self.mean_rps[f])):
                tp = fn.engine.m.tp
                nxt = -(-nxt // tp) * tp  # align
                if (nxt % sim.gpn) + tp > sim.gpn:
                    nxt = -(-nxt // sim.gpn) * sim.gpn
                sim.place(f, tuple(range(nxt, nxt + tp)), ModelState.HOT)
                nxt += tp


def _replicas(fn, mean_rps: float) -> int:
    return max(1, math.ceil(mean_rps / fn.capacity_rps))


class Static(Policy):
    """MuxServe-like: placed once, never loads. Replicas per function from its true mean demand (enough that each
    runs at most `split_above` of an instance's capacity), trimmed to the cluster's memory; a replica needs its
    weight shard plus the KV its share of the load keeps live (kv_at_capacity * its share of one instance's
    capacity). Replicas are placed largest TP first (so 4-GPU groups are not fragmented), each on the least
    loaded group where it fits. KV quotas per GPU follow those needs, so a hot function cannot take every KV
    page and starve its neighbours (MuxServe gives each co-located LLM a quota)."""

    name = "static"

    def __init__(self, mean_rps: np.ndarray, split_above: float = 0.7):
        self.mean_rps, self.split_above = mean_rps, split_above

    def setup(self, sim: Sim) -> None:
        nf = len(sim.fns)
        self.kv_at_cap = [fn.kv_full_bytes for fn in sim.fns]  # the KV one replica keeps live at its capacity
        demand = [r / fn.capacity_rps for r, fn in zip(self.mean_rps, sim.fns, strict=True)]
        reps = [max(1, math.ceil(d / self.split_above)) for d in demand]

        def need(f: int) -> float:  # bytes per GPU of one replica
            return (
                sim.fns[f].engine.m.shard_bytes + max(0.05, min(1.0, demand[f] / max(1, reps[f]))) * self.kv_at_cap[f]
            )

        def total() -> float:
            return sum(reps[f] * sim.fns[f].engine.m.tp * need(f) for f in range(nf))

        while total() > 0.95 * sim.cap * sim.n_gpus:  # trim the replica that carries the least load
            f = min((f for f in range(nf) if reps[f] > 1), key=lambda f: demand[f] / reps[f], default=None)
            if f is None:  # one replica each does not fit: the least demanded functions go unserved (all misses)
                f = min((f for f in range(nf) if reps[f]), key=lambda f: (demand[f], f))
            reps[f] -= 1
        budget = [sim.cap] * sim.n_gpus
        load = [0.0] * sim.n_gpus
        placed = [0] * nf
        order = sorted(
            ((f, k) for f in range(nf) for k in range(reps[f])),
            # whole-node-half groups first (so they are not fragmented), then the most loaded replicas, which thus
            # get GPUs of their own while there are some; light ones share
            key=lambda fk: (sim.fns[fk[0]].engine.m.tp < 4, -demand[fk[0]] / reps[fk[0]], fk),
        )
        for f, _ in order:
            nb = need(f)
            fits = [
                g
                for g in _groups(sim, sim.fns[f].engine.m.tp)
                if all(budget[i] >= nb for i in g) and not any(x.f == f for i in g for x in sim.on_gpu[i])
            ]
            if not fits:
                continue
            g = min(fits, key=lambda g: (max(load[i] for i in g), g))
            sim.place(f, g, ModelState.HOT)
            placed[f] += 1
            for i in g:
                budget[i] -= nb
                load[i] += demand[f] / reps[f]
        if any(reps[f] and not placed[f] for f in range(nf)):
            missing = [sim.fns[f].name for f in range(nf) if reps[f] and not placed[f]]
            raise RuntimeError(f"static: no room for {', '.join(missing)}")
        kvn = {f: need(f) - sim.fns[f].engine.m.shard_bytes for f in range(nf)}
        for x in sim.insts.values():  # quotas: split what weights leave in proportion to the KV needs
            x.kv_cap = min((sim.cap - sim.weights[g]) * kvn[x.f] / sum(kvn[y.f] for y in sim.on_gpu[g]) for g in x.gpus)
        self.replicas = placed


# Keep-alive of `ondemand-tuned`: the best of the sweep in bench/results/sim_ondemand_keepalive.json
# (sim/ablation.py keepalive_sweep; docs/simulator.md).
TUNED_KEEP_ALIVE_S = 600.0


class OnDemand(Policy):
    name = "ondemand"
    tick_s = 0.5

    def __init__(
        self,
        keep_alive_s: float = 60.0,
        max_instances: int = 8,
        target_concurrency: int | None = None,
        name: str = "ondemand",
    ):
        self.keep_alive_s, self.max_instances = keep_alive_s, max_instances
        self.target_concurrency, self.name = target_concurrency, name

    def on_pressure(self, sim: Sim, f: int, now: float) -> None:
        insts = sim.instances(f)
        loading = [x for x in insts if x.state is ModelState.LOADING]
        # One load at a time per function unless the queue outgrows what the loading copies will take.
        if loading and len(sim.queue[f]) <= len(loading) * sim.target[f]:
            return
        if len(insts) >= self.max_instances:
            return
        gpus = self._free_group(sim, f)
        if gpus is not None:
            sim.load(f, gpus, ModelState.HOT, sim.p.cold_engine_start_s)

    def _free_group(self, sim: Sim, f: int) -> tuple[int, ...] | None:
        """An aligned group of whole GPUs, evicting idle instances (least recently used first) if needed.
        Prefer groups on a worker that holds f in host memory, then fewest evictions."""
        best = None
        for g in _groups(sim, sim.fns[f].engine.m.tp):
            here = list({x.iid: x for i in g for x in sim.on_gpu[i]}.values())  # ordered: runs replay exactly
            if not all(_idle(x) for x in here):
                continue
            key = (f not in sim.host[g[0] // sim.gpn], len(here), max((x.last_used for x in here), default=0.0))
            if best is None or key < best[0]:
                best = (key, g, here)
        if best is None:
            return None
        for x in best[2]:
            sim.unload(x)
        return best[1]

    def on_tick(self, sim: Sim, now: float) -> None:
        for x in list(sim.insts.values()):
            if x.state is ModelState.HOT and _idle(x) and now - x.last_used >= self.keep_alive_s:
                sim.unload(x)  # scale to zero
        for f, q in enumerate(sim.queue):
            if q:
                self.on_pressure(sim, f, now)


def serverlessllm() -> OnDemand:
    """ServerlessLLM's documented defaults (`sllm-cli deploy` auto_scaling_config): target 1 concurrent request
    per instance, min 0, max 10 instances, keep_alive 0 s. Its loader is the pipelined disk/host -> GPU path the
    simulator models for every load; the engine start is the profile's `cold_engine_start_s`."""
    return OnDemand(keep_alive_s=0.0, max_instances=10, target_concurrency=1, name="serverlessllm")


class Ollama(Policy):
    """Ollama's documented defaults: OLLAMA_NUM_PARALLEL 1 (older versions 4), OLLAMA_KEEP_ALIVE 5 min,
    OLLAMA_MAX_LOADED_MODELS 3 x GPUs, OLLAMA_MAX_QUEUE 512 (then 503). A model goes on the GPUs with the most
    free memory; idle models are unloaded, least recently used first, when it does not fit."""

    name = "ollama"
    tick_s = 0.5

    def __init__(self, keep_alive_s: float = 300.0, parallel: int = 1, max_loaded_per_gpu: int = 3, max_queue=512):
        self.keep_alive_s, self.max_batch, self.max_queue = keep_alive_s, parallel, max_queue
        self.max_loaded_per_gpu = max_loaded_per_gpu

    def on_pressure(self, sim: Sim, f: int, now: float) -> None:
        if sim.instances(f):  # one instance per model: wait for it
            return
        if len(sim.insts) >= self.max_loaded_per_gpu * sim.n_gpus:
            idle = [x for x in sim.insts.values() if _idle(x)]
            if not idle:
                return
            sim.unload(min(idle, key=lambda x: (x.last_used, x.iid)))
        tp, shard = sim.fns[f].engine.m.tp, sim.fns[f].engine.m.shard_bytes
        # Like Ollama: the GPUs with the most free memory first; evict only when nothing fits.
        groups = sorted(_groups(sim, tp), key=lambda g: -min(sim.free_bytes(i) for i in g))
        for evict_ok in (False, True):
            for g in groups:
                room = self._make_room(sim, g, shard, evict_ok)
                if room:
                    sim.load(f, g, ModelState.HOT, sim.p.cold_engine_start_s)
                    return

    def _make_room(self, sim: Sim, g: tuple[int, ...], shard: int, evict_ok: bool) -> bool:
        def ok() -> bool:
            return all(sim.free_bytes(i) - shard >= KV_MIN_BYTES for i in g)

        if ok():
            return True
        if not evict_ok:
            return False
        idle = sorted(
            {x.iid: x for i in g for x in sim.on_gpu[i] if _idle(x)}.values(), key=lambda x: (x.last_used, x.iid)
        )
        cap = {i: sim.free_bytes(i) + sum(x.shard for x in idle if i in x.gpus) for i in g}
        if any(cap[i] - shard < KV_MIN_BYTES for i in g):
            return False
        for x in idle:
            if ok():
                break
            sim.unload(x)
        return ok()

    def on_tick(self, sim: Sim, now: float) -> None:
        for x in list(sim.insts.values()):
            if _idle(x) and now - x.last_used >= self.keep_alive_s:
                sim.unload(x)
        for f, q in enumerate(sim.queue):
            if q:
                self.on_pressure(sim, f, now)


# --------------------------------------------------------------------------- warmserve
@dataclass(frozen=True)
class Ablation:
    """One WarmServe technique taken away (or the forecast made perfect), to show what each one earns."""

    forecast: str = "model"  # "model": Settings.forecast_method; "none": reactive only; "oracle": the true counts
    first_fit: bool = False  # placement without costs (warmer.placement.Options.first_fit)
    lending: bool = True  # WARM weights may use the idle part of HOT instances' KV pools

    @staticmethod
    def named(variant: str) -> Ablation:
        """The variant named "" (the full system), "reactive", "oracle", "firstfit" or "nolend"."""
        return {
            "": Ablation(),
            "reactive": Ablation(forecast="none"),
            "oracle": Ablation(forecast="oracle"),
            "firstfit": Ablation(first_fit=True),
            "nolend": Ablation(lending=False),
        }[variant]


class WarmServe(Policy):
    """Planner every `tick_s`, forecasts every window, fast activation path on pressure.

    Forecaster, window, lead, planning interval and history length are the live warmer's (`settings`, by default
    `protocol.settings.DEFAULTS`), so a simulated result speaks for the warmer as deployed."""

    name = "warmserve"

    def __init__(
        self,
        history: np.ndarray,
        settings: Settings = DEFAULTS,
        ablation: Ablation = Ablation(),
        rate_window_s: float = 30.0,
    ):
        self.history = history  # (functions, windows) counts before the run, ending at the run's start
        self.window_s, self.tick_s = settings.window_s, settings.warmer_interval_s
        self.settings = settings
        self.forecaster = for_settings(settings)
        self.ablation = ablation
        self.lends = ablation.lending
        self.options = Options(first_fit=ablation.first_fit)
        if ablation.forecast not in ("model", "none", "oracle"):
            raise ValueError(f"warmserve: unknown forecast {ablation.forecast!r}; choose model, none or oracle")
        self.name = "warmserve" + {"model": "", "none": "-reactive", "oracle": "-oracle"}[ablation.forecast]
        self.name += "-firstfit" * ablation.first_fit + "-nolend" * (not ablation.lending)
        self.resize_pools = True  # pools follow today's peak (`_resize_pools`); False: the sizing's, all run
        self._pools: list[float] = []  # per function: the KV pool a copy activated now gets (per GPU)
        self._caps: list[float] = []  # and the capacity (req/s) that pool gives
        self._sized_for: list[float] = []  # the peak rate (req/s) the pools were last sized for
        self._base_peak = np.zeros(0)  # the last day's peak window rate before the run (the functions' sizing)
        self._windows: deque[np.ndarray] = deque()  # per-window counts of the last day, history then live
        self._win_at: tuple[int, np.ndarray] | None = None  # (window, sim.arrived at its start)
        self._requests: list[tuple[np.ndarray, np.ndarray]] = []  # per function: its requests' prompt, output
        self.lead_s = settings.lead_s
        self.history_windows = settings.history_windows
        self._cur: dict[str, Prediction] = {}
        self._next: dict[str, Prediction] = {}
        self._window = None
        self.rate_window_s = rate_window_s
        self._arr_hist: deque[tuple[float, np.ndarray]] = deque()
        self._last_reactive: dict[int, float] = {}
        self._use: dict[int, float] = {}  # per function: forecast use of its pools at the last plan (pool_lend)
        self.counters = {"plans": 0, "actions": 0, "skipped": 0, "pool_resizes": 0}

    # -- forecasts
    def _forecast(self, sim: Sim, now: float) -> dict[str, Prediction]:
        """Predictions the planner acts on now: the current window's, and within `lead_s` of the next window
        the larger of it and the next window's (a one-step-ahead forecast fed the current one as if observed),
        so weights are resident before a forecast burst starts rather than when it starts. Ablations: no forecast
        at all (the planner works from the measured rate alone), or the true counts of both windows."""
        if self.ablation.forecast == "none":
            return {}
        w = int((now - sim.w.start_s) // self.window_s)
        if self.ablation.forecast == "oracle":
            return self._oracle(sim, now, w)
        if w != self._window:
            self._window = w
            start = sim.w.start_s
            mask = sim.w.t < start + w * self.window_s
            live = np.zeros((len(sim.fns), w), dtype=np.int64)
            if w:
                idx = ((sim.w.t[mask] - start) // self.window_s).astype(np.int64)
                np.add.at(live, (sim.w.fn[mask].astype(np.int64), idx), 1)
            self._cur, self._next = {}, {}
            for f, fn in enumerate(sim.fns):
                hist = np.concatenate([self.history[f], live[f]])[-self.history_windows :]
                cur, nxt = this_and_next(self.forecaster, hist)
                self._cur[fn.name], self._next[fn.name] = live_rate(cur, self.settings), live_rate(nxt, self.settings)
        until_next = sim.w.start_s + (w + 1) * self.window_s - now
        return {n: act_on(c, self._next[n], until_next, self.lead_s) for n, c in self._cur.items()}

    def _oracle(self, sim: Sim, now: float, w: int) -> dict[str, Prediction]:
        """The true mean rate of the current and the next window (no uncertainty: peak = mean), combined as the
        real forecast is (`act_on`)."""
        edges = sim.w.start_s + self.window_s * np.array([w, w + 1, w + 2])
        until_next = edges[1] - now
        out = {}
        for f, fn in enumerate(sim.fns):
            t = sim.w.t[sim.w.fn == f]
            cur, nxt = np.diff(np.searchsorted(t, edges)) / self.window_s
            out[fn.name] = act_on(Prediction(cur, cur), Prediction(nxt, nxt), until_next, self.lead_s)
        return out

    def kv_reserve(self, f: int) -> float:
        return self._pools[f]

    # -- pools sized for today's traffic
    def _resize_pools(self, sim: Sim, now: float, preds: dict[str, Prediction]) -> bool:
        """Size each function's pool, for copies activated from now on (a pool stays as it was mapped until its
        copy is deactivated, as the engine's does), for the larger of the peak its sizing assumed (the last day
        before the run) and today's: the last day's peak window rate counted on through the run, and the forecast
        mean rate of the window ahead (a window's rate, as the sizing's input is; the forecast's peak is its
        uncertainty, which an exact forecast does not have). Never below the sizing's own pool: where today's
        traffic stays under yesterday's peak nothing changes. A function whose traffic outgrew yesterday's peak
        would otherwise run copies with pools for a handful of requests, and at `max_instances` it would queue (a
        day of traffic: 13b-6 at 4 req/s on 8 copies with 0.7-GB pools, queues of thousands). True if a pool
        changed."""
        if not self.resize_pools:
            return False
        changed = False
        w = int((now - sim.w.start_s) // self.window_s)
        if self._win_at is None:
            self._win_at = (w, sim.arrived.copy())
        elif w != self._win_at[0]:  # a window (or more) ended: its counts join the last day's
            self._windows.append(sim.arrived - self._win_at[1])
            self._win_at = (w, sim.arrived.copy())
        day_peak = np.max(np.stack(self._windows), axis=0) / self.window_s if self._windows else self._base_peak
        for f, fn in enumerate(sim.fns):
            p = preds.get(fn.name)
            peak = max(float(day_peak[f]), p.mean if p else 0.0)
            if peak <= self._base_peak[f] * 1.001:
                peak = float(self._base_peak[f])
            if abs(peak - self._sized_for[f]) <= 0.1 * self._sized_for[f]:
                continue  # within 10% of what the pools are sized for: keep them
            self._sized_for[f] = peak
            if peak == self._base_peak[f]:
                pool, cap = fn.kv_pool_bytes, fn.pool_capacity_rps
            else:
                prompt, output = self._requests[f]
                s = sizing.size(fn.engine, sim.p.usable_bytes, prompt, output, peak)
                pool, cap = (s.pool_bytes, s.capacity_rps) if s.pool_bytes > fn.kv_pool_bytes else (
                    fn.kv_pool_bytes, fn.pool_capacity_rps)  # fmt: skip
            if pool != self._pools[f]:
                self._pools[f], self._caps[f] = pool, cap
                self.counters["pool_resizes"] += 1
                changed = True
        return changed

    def pool_lend(self, sim: Sim, g: int, x: Inst) -> float:
        """The idle part of the lenders' pools on g that their own forecast leaves idle (the planner's
        `_safe_lendable`): a new pool may share only that, so lenders keep the pages their traffic will need."""
        if not self.lends:
            return 0.0
        out = 0.0
        for y in sim.on_gpu[g]:
            if y is x or y.state is not ModelState.HOT or not y.reserve:
                continue
            n_hot = sum(z.state is ModelState.HOT for z in sim.by_fn[y.f])
            u = min(1.0, self._use.get(y.f, 1.0) / max(1, n_hot))
            out += max(0.0, y.reserve - max(y.kv_bytes, u * y.reserve))
        return out

    # -- view of the cluster for the planner
    def specs(self, sim: Sim) -> dict[str, FunctionSpec]:
        out = {}
        for f, fn in enumerate(sim.fns):
            m = fn.engine.m
            out[fn.name] = FunctionSpec(
                name=fn.name,
                weight_bytes=m.weight_bytes,
                kv_bytes=int(self._pools[f]),
                tp=m.tp,
                keep_alive_s=fn.keep_alive_s,
                slo_ttft_s=fn.slo_ttft_s,
                capacity_rps=self._caps[f],
            )
        return out

    def view(self, sim: Sim, now: float) -> ClusterView:
        specs = self.specs(sim)
        workers = []
        for node in range(sim.n_nodes):
            gpus = []
            for g in sim.node_gpus(node):
                free = max(0.0, sim.free_bytes(g))
                lend = max(0.0, sim.physical_free(g) - free) if self.ablation.lending else 0.0
                gpus.append(GPU(g - node * sim.gpn, int(sim.cap), int(free), int(lend)))
            ready = {sim.fns[f].name for f, t in sim.host[node].items() if t <= now}
            coming = {sim.fns[f].name for f, t in sim.host[node].items() if t > now}
            workers.append(Worker(f"node{node}", tuple(gpus), frozenset(ready), frozenset(coming)))
        insts = []
        for x in sim.insts.values():
            name = sim.fns[x.f].name
            insts.append(
                Instance(
                    name,
                    f"node{x.node}",
                    tuple(g - x.node * sim.gpn for g in x.gpus),
                    x.state,
                    x.since,
                    x.last_used,
                    inflight=x.load(),
                    kv_used_bytes=int(x.kv_bytes),
                    kv_reserved_bytes=int(x.reserve) if x.state is ModelState.HOT else 0,
                )
            )
        # Recent arrival rate over the last `rate_window_s`: over one planner tick the Azure trace's bursts make it so
        # noisy that HOT targets would ratchet up on every spike.
        arr = sim.arrived.copy()
        self._arr_hist.append((now, arr))
        while len(self._arr_hist) > 1 and self._arr_hist[1][0] <= now - self.rate_window_s:
            self._arr_hist.popleft()
        t0, a0 = self._arr_hist[0]
        rps = (arr - a0) / (now - t0) if now - t0 >= 1.0 else np.zeros(len(sim.fns))
        load = {
            fn.name: Load(
                arrivals_rps=float(rps[f]),
                inflight=sum(x.load() for x in sim.instances(f)),
                queued=len(sim.queue[f]),
            )
            for f, fn in enumerate(sim.fns)
        }
        return ClusterView(tuple(workers), specs, tuple(insts), load)

    # -- acting
    def _run_plan(self, sim: Sim, now: float, initial: bool = False) -> None:
        preds = self._forecast(sim, now)
        self._resize_pools(sim, now, preds)
        view = self.view(sim, now)
        self._use = {f: self._forecast_use(self._caps[f], preds.get(fn.name), view.load[fn.name].arrivals_rps)
                     for f, fn in enumerate(sim.fns)}  # fmt: skip
        actions = plan(view, preds, now, self.options)
        self.counters["plans"] += 1
        index = {fn.name: f for f, fn in enumerate(sim.fns)}
        for a in actions:
            f, node = index[a.function], int(a.worker.removeprefix("node"))
            gpus = tuple(node * sim.gpn + g for g in a.gpus)
            x = next((x for x in sim.instances(f) if x.gpus == gpus), None)
            self.counters["actions"] += 1
            if a.kind is ControlAction.LOAD_HOST:
                sim.load_host(node, f)
            elif a.kind is ControlAction.PREWARM and x is None:
                room = sim.physical_free if self.ablation.lending else sim.free_bytes
                if not all(room(g) >= sim.fns[f].engine.m.shard_bytes for g in gpus):
                    self.counters["skipped"] += 1  # the view was optimistic (KV grew since): next plan retries
                elif initial:
                    sim.place(f, gpus, ModelState.WARM)
                else:
                    sim.load(f, gpus, ModelState.WARM, sim.p.warm_bind_s)
            elif a.kind is ControlAction.ACTIVATE and x is not None and x.state is ModelState.WARM:
                if not sim.activate(x):
                    self.counters["skipped"] += 1  # its KV pool does not fit there now: next plan retries
            elif a.kind is ControlAction.DEACTIVATE and x is not None and x.state is ModelState.HOT and _idle(x):
                sim.deactivate(x)
            elif a.kind is ControlAction.EVICT and x is not None and x.state is ModelState.WARM:
                sim.unload(x)
            else:
                self.counters["skipped"] += 1

    @staticmethod
    def _forecast_use(capacity_rps: float, pred: Prediction | None, rps: float) -> float:
        """A function's forecast peak (or measured rate, if higher) in instances' worth: how much of its pools it
        will use (the planner's mean + burst)."""
        peak = max(pred.peak, pred.mean) if pred else 0.0
        return max(peak, rps) / max(capacity_rps, 1e-9)

    def setup(self, sim: Sim) -> None:
        self._pools = [fn.kv_pool_bytes for fn in sim.fns]
        self._caps = [fn.pool_capacity_rps for fn in sim.fns]
        day = max(1, int(86_400 // self.window_s))
        recent = self.history[:, -day:]
        self._base_peak = recent.max(axis=1) / self.window_s if recent.size else np.zeros(len(sim.fns))
        self._sized_for = [float(p) for p in self._base_peak]
        self._windows = deque((recent[:, i] for i in range(recent.shape[1])), maxlen=day)
        self._win_at = None
        self._requests = [(sim.w.prompt[sim.w.fn == f], sim.w.output[sim.w.fn == f]) for f in range(len(sim.fns))]
        # History windows are counted from time 0, so they must end exactly where the run starts.
        if self.history.shape != (len(sim.fns), int(sim.w.start_s // self.window_s)):
            raise ValueError(
                f"warmserve: history shape {self.history.shape}, want ({len(sim.fns)}, start_s // window_s = "
                f"{int(sim.w.start_s // self.window_s)})"
            )
        # The state a running warmer would be in at the start: its plan for the first window, in place.
        self._run_plan(sim, sim.now, initial=True)
        self._arr_hist.clear()

    def on_tick(self, sim: Sim, now: float) -> None:
        self._run_plan(sim, now)

    def on_pressure(self, sim: Sim, f: int, now: float) -> None:
        warm = sorted(
            (x for x in sim.instances(f) if x.state is ModelState.WARM),
            key=lambda x: (max(sim.n_busy[g] for g in x.gpus), x.iid),
        )
        # fast path: a prewarmed copy, activated in milliseconds, on the least busy GPUs where its KV pool fits.
        # On GPUs where other engines are busy a new copy adds little (they take turns) and slows them: there,
        # activate only once requests actually queue, not merely because the running copies are busy.
        for x in warm:
            if max(sim.n_busy[g] for g in x.gpus) and not sim.queue[f]:
                return
            if sim.activate(x):
                return
        if any(x.state is ModelState.LOADING for x in sim.instances(f)):
            return
        if now - self._last_reactive.get(f, -1e9) >= 0.5:  # reactive: plan now rather than at the next tick
            self._last_reactive[f] = now
            self._run_plan(sim, now)

    def on_ready(self, sim: Sim, x: Inst, now: float) -> None:
        if x.state is ModelState.WARM and sim.queue[x.f]:
            sim.activate(x)
