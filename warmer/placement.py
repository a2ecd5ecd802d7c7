"""Evict-aware placement: from forecasts and the cluster view, the prewarm/activate/evict steps to take now.

`plan` is a pure function. It walks functions from the most to the least forecast demand and, for each:
1. sizes it: resident (WARM or HOT) instances to cover the forecast *peak* of the next window times
   (1 + `Options.burst_margin`), HOT instances to cover the forecast *mean* (activation is milliseconds, so
   bursts are served by activating WARM copies). The forecast's peak bounds the window's mean rate (its
   uncertainty); bursts *inside* a window are the planner's margin, so an exact forecast (peak = mean) still
   gets room for them and a better forecast never leaves less room than the arrivals need;
   reactive scale-up adds one more when requests queue and nothing is on its way (a burst the forecast missed),
   or when every HOT copy's KV pool is nearly full (`_SATURATED`): the forecast's capacity is nominal, a copy
   next to busy neighbours serves less, and an exact forecast must not leave the function to queue first;
2. activates WARM copies up to the HOT target, deactivates HOT ones idle past keep_alive_s beyond it, evicts
   WARM ones idle past keep_alive_s beyond the resident target;
3. prewarms the missing copies on the GPU group with the lowest cost, where cost says:
   - don't put weights where they will be pushed out before use: memory lent by a HOT instance (its idle KV
     pages) counts only as far as the lender's own forecast leaves it idle;
   - don't co-locate functions likely to burst together (both forecast well above their mean);
   - prefer GPUs whose residents have little forecast compute demand, and lenders with low forecast demand;
   - prefer workers that hold the weights in host memory (PCIe copy, not a disk read), and start no disk read
     on a worker already reading `Options.max_disk_reads` (unless requests wait for this function and no copy);
   - if nothing fits, evict idle copies of functions with less forecast demand or, when this function's
     requests queue, of functions with none queueing.
`Options.first_fit` drops every cost (the first group where a copy fits wins): the ablation that shows what the
costs earn. Every step updates a working copy of the view, so later functions see earlier decisions and planning
again on the view with the actions applied (`warmer.cluster.apply_actions`) yields nothing new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.states import ControlAction, ModelState
from warmer.cluster import Action, ClusterView, FunctionSpec, Instance, Load, Worker, apply_actions
from warmer.forecast import Prediction

# Cost weights, in "instances of forecast compute demand" units. Only their order of magnitude matters.
_W_BURST = 2.0  # per unit of (burst_f * burst_r) shared with a co-resident function
_W_LEND = 1.0  # per fraction of the shard placed in lent KV memory, scaled by the lender's forecast use
_W_DISK = 4.0  # the worker must read the weights from disk first
_W_EVICT = 8.0  # per unit of forecast demand of an evicted copy (plus a fixed 1)
_W_OVERLOAD = 20.0  # per unit of forecast compute demand above one GPU's worth
_SATURATED = 0.8  # share of its KV pool a HOT copy uses when it counts as saturated (reactive scale-up)


@dataclass(frozen=True)
class Options:
    # Within a 5-minute window the Azure traces burst to about 1.5-2x their mean for tens of seconds: resident
    # copies cover the forecast peak plus this share, so a burst finds a WARM copy to activate, not a load.
    burst_margin: float = 0.5
    first_fit: bool = False  # ablation: no costs, the first group where a copy fits
    # Disk -> host reads in flight per worker a prewarm may add to (a starved function's always may): reads queue
    # on one disk, so speculative ones for rarely used functions would delay the reads waiting requests need.
    max_disk_reads: int = 2
    # A function whose requests queue may evict another function's idle copy only if that copy has been idle this
    # long: a copy used a moment ago is about to be used again, and evicting it makes its function queue in turn
    # (copies ping-pong between two functions; on 48-GB GPUs ~1,000 such evictions in 30 min).
    waiting_victim_idle_s: float = 10.0


DEFAULT_OPTIONS = Options()


@dataclass(frozen=True)
class _Demand:
    hot: int  # HOT instances wanted
    resident: int  # WARM + HOT (+ LOADING) instances wanted
    util: float  # forecast mean in instances' worth of capacity: sorts functions, weighs co-location
    burst: float  # forecast peak above mean, in instances' worth
    # requests wait and no copy serves or is coming: planned first, and may evict any idle copy of a function
    # that is not starved itself (a forecast must never keep a function with live requests waiting for ever)
    starved: bool = False
    waiting: bool = False  # requests queue: its copies are wanted now, not for a forecast

    @property
    def rank(self) -> float:
        return math.inf if self.starved else self.util


def plan(
    view: ClusterView, predictions: dict[str, Prediction], now: float, options: Options = DEFAULT_OPTIONS
) -> list[Action]:
    """Actions to take now, in order. Functions without a prediction are treated as forecast idle."""
    demand = {
        name: _demand(view, spec, predictions.get(name), options.burst_margin) for name, spec in view.functions.items()
    }
    actions: list[Action] = []
    order = sorted(view.functions, key=lambda n: (-demand[n].rank, -demand[n].util, n))
    for name in order:
        spec, d = view.functions[name], demand[name]
        step = _scale(view, spec, d, demand, now)
        step += _prewarm(apply_actions(view, step, now), spec, d, demand, now, options)
        view = apply_actions(view, step, now)
        actions += step
    return actions


def _demand(view: ClusterView, spec: FunctionSpec, pred: Prediction | None, margin: float) -> _Demand:
    load = view.load.get(spec.name, Load())
    cap = max(spec.capacity_rps, 1e-9)
    mean = pred.mean if pred else 0.0
    peak = max(pred.peak if pred else 0.0, mean)
    now_rps = load.arrivals_rps
    hot = math.ceil(max(mean, now_rps) / cap - 1e-9)
    resident = math.ceil(max(peak, now_rps) * (1.0 + margin) / cap - 1e-9)
    if load.inflight or load.queued:  # live work needs somewhere to run whatever the forecast says
        hot = max(hot, 1)
    hot = min(max(hot, 0), spec.max_instances)
    resident = min(max(resident, hot, spec.min_instances), spec.max_instances)
    starved = load.queued > 0 and not _of(view, spec.name, ModelState.HOT, ModelState.LOADING)
    return _Demand(hot, resident, max(mean, now_rps) / cap, max(peak - mean, 0.0) / cap, starved, load.queued > 0)


def _of(view: ClusterView, name: str, *states: ModelState) -> list[Instance]:
    return [x for x in view.instances if x.function == name and x.state in states]


def _scale(view: ClusterView, spec: FunctionSpec, d: _Demand, demand: dict[str, _Demand], now: float) -> list[Action]:
    """Activate / deactivate / evict existing copies of one function; reactive scale-up lives in _prewarm."""
    hot = _of(view, spec.name, ModelState.HOT)
    warm = _of(view, spec.name, ModelState.WARM)
    out: list[Action] = []
    load = _gpu_util(view, demand, exclude=spec.name)
    want = d.hot + _reactive(view, spec, hot)
    # Activate the copies on the least busy GPUs first, where the KV pool fits.
    warm.sort(key=lambda x: (sum(load.get((x.worker, g), 0.0) for g in x.gpus), x.worker, x.gpus))
    ready = [x for x in warm if _pool_fits(view, x, spec, demand)][: max(0, want - len(hot))]
    for x in ready:
        out.append(Action(ControlAction.ACTIVATE, spec.name, x.worker, x.gpus))
        view = apply_actions(view, out[-1:], now)
    warm = [x for x in warm if x not in ready]

    def idle(x: Instance) -> bool:
        return x.inflight == 0 and now - x.last_used >= spec.keep_alive_s

    extra_hot = sorted((x for x in hot if idle(x)), key=lambda x: x.last_used)[: max(0, len(hot) - want)]
    for x in extra_hot:
        out.append(Action(ControlAction.DEACTIVATE, spec.name, x.worker, x.gpus))
    resident = len(hot) + len(warm) + len(_of(view, spec.name, ModelState.LOADING))
    warm = warm + extra_hot  # just deactivated: WARM now, so evictable in the same plan
    for x in sorted((x for x in warm if idle(x)), key=lambda x: x.last_used)[: max(0, resident - d.resident)]:
        out.append(Action(ControlAction.EVICT, spec.name, x.worker, x.gpus))
    return out


def _pool_fits(view: ClusterView, x: Instance, spec: FunctionSpec, demand: dict[str, _Demand]) -> bool:
    """Whether copy x, once activated, gets its KV pool: from free memory, lent memory its lenders' forecast
    leaves idle, and WARM copies on its GPUs (activating evicts them, as reclaiming lent memory does)."""
    w = view.worker(x.worker)
    by_index = {g.index: g for g in w.gpus}
    for gi in x.gpus:
        here = [y for y in _residents(view, x.worker, (gi,)) if y != x]
        warm = sum(view.functions[y.function].shard_bytes for y in here if y.state is ModelState.WARM)
        g = by_index[gi]
        if g.free_bytes + _safe_lendable(view, g, here, demand)[0] + warm < spec.kv_bytes:
            return False
    return True


def _reactive(view: ClusterView, spec: FunctionSpec, hot: list[Instance]) -> int:
    """One more instance when requests queue and every HOT copy is busy: a burst the forecast did not see."""
    load = view.load.get(spec.name, Load())
    if load.queued > 0 and all(x.inflight > 0 for x in hot):
        return 1
    # Every HOT copy's KV pool nearly full: the next requests will queue whatever the forecast said (a copy runs
    # slower than its nominal capacity next to busy neighbours, and requests vary in size): add one before they do.
    full = [x for x in hot if x.kv_reserved_bytes and x.kv_used_bytes >= _SATURATED * x.kv_reserved_bytes]
    return 1 if hot and len(full) == len(hot) else 0


def _prewarm(
    view: ClusterView, spec: FunctionSpec, d: _Demand, demand: dict[str, _Demand], now: float, options: Options
) -> list[Action]:
    # A WARM copy whose KV pool cannot fit where it is will not serve: it does not count.
    resident = [
        x
        for x in _of(view, spec.name, ModelState.HOT, ModelState.WARM, ModelState.LOADING)
        if x.state is not ModelState.WARM or _pool_fits(view, x, spec, demand)
    ]
    hot = _of(view, spec.name, ModelState.HOT)
    coming = any(x.state is not ModelState.HOT for x in resident)
    want = d.resident
    if not coming and _reactive(view, spec, hot):
        want = min(max(want, len(resident) + 1), spec.max_instances)
    out: list[Action] = []
    total = len(_of(view, spec.name, ModelState.HOT, ModelState.WARM, ModelState.LOADING))
    for _ in range(min(want - len(resident), spec.max_instances - total)):
        best = _best_group(view, spec, demand, options, now)
        if best is None:
            break
        steps = best
        view = apply_actions(view, steps, now)
        out += steps
    return out


def _best_group(
    view: ClusterView,
    spec: FunctionSpec,
    demand: dict[str, _Demand],
    options: Options = DEFAULT_OPTIONS,
    now: float = 0.0,
) -> list[Action] | None:
    """Cheapest [evict..., load_host?, prewarm] that puts one more copy of `spec` on some GPU group."""
    mine = demand[spec.name]
    util = _gpu_util(view, demand, exclude=spec.name)
    share = mine.util / (len(_of(view, spec.name, ModelState.HOT, ModelState.WARM, ModelState.LOADING)) + 1)
    best: tuple[float, list[Action]] | None = None
    for w in view.workers:
        disk_busy = len(w.host_loading) >= options.max_disk_reads and not mine.starved
        if spec.name not in w.host_cached | w.host_loading and disk_busy:
            continue
        for gpus in _groups(w, spec.tp):
            if any(x.function == spec.name and x.worker == w.name and set(x.gpus) & set(gpus) for x in view.instances):
                continue
            got = _fit(view, w, gpus, spec, demand, now, options.waiting_victim_idle_s)
            if got is None:
                continue
            cost, evictions = got
            busiest = max(util.get((w.name, g), 0.0) for g in gpus)
            cost += sum(util.get((w.name, g), 0.0) for g in gpus) / len(gpus)
            # A copy on a GPU whose engines are already forecast to fill it adds no capacity (engines sharing a GPU
            # take turns) and slows them: almost never worth it.
            cost += _W_OVERLOAD * max(0.0, busiest + share - 1.0)
            for x in _residents(view, w.name, gpus):
                if x.function != spec.name and x not in evictions:
                    cost += _W_BURST * mine.burst * demand[x.function].burst
            steps = [
                Action(kind, x.function, x.worker, x.gpus)
                for x in evictions
                for kind in (ControlAction.DEACTIVATE,) * (x.state is ModelState.HOT) + (ControlAction.EVICT,)
            ]
            if spec.name not in w.host_cached:
                cost += _W_DISK
                if spec.name not in w.host_loading:
                    steps.append(Action(ControlAction.LOAD_HOST, spec.name, w.name))
            steps.append(Action(ControlAction.PREWARM, spec.name, w.name, gpus))
            if options.first_fit:
                return steps
            if best is None or cost < best[0]:
                best = (cost, steps)
    return None if best is None else best[1]


def _groups(w: Worker, tp: int) -> list[tuple[int, ...]]:
    """Aligned groups of `tp` GPUs (0-3, 4-7 for TP4): tensor parallelism wants GPUs that share a switch."""
    idx = sorted(g.index for g in w.gpus)
    return [tuple(idx[i : i + tp]) for i in range(0, len(idx) - tp + 1, tp)]


def _residents(view: ClusterView, worker: str, gpus: tuple[int, ...]) -> list[Instance]:
    return [x for x in view.instances if x.worker == worker and set(x.gpus) & set(gpus)]


def _fit(
    view: ClusterView,
    w: Worker,
    gpus: tuple[int, ...],
    spec: FunctionSpec,
    demand: dict[str, _Demand],
    now: float = 0.0,
    idle_s: float = 0.0,
) -> tuple[float, list[Instance]] | None:
    """(cost, copies to evict) to fit one shard of `spec` on each of `gpus`, and its KV pool once activated, or
    None if it cannot fit. Victims are idle copies (WARM, or HOT with nothing running) of functions with less
    forecast demand, or, when requests of `spec` wait, of functions with none waiting whose copy has been idle
    `idle_s` (a forecast must not keep a busy function queueing behind idle copies: with long contexts, a GPU per
    copy, it otherwise does); least demand first. A HOT victim gives back its weights and its pool."""
    by_index = {g.index: g for g in w.gpus}
    need = spec.shard_bytes + spec.kv_bytes
    mine, waiting = demand[spec.name].rank, demand[spec.name].waiting
    cost, evict = 0.0, []
    for gi in gpus:
        g = by_index[gi]
        here = [x for x in view.instances if x.worker == w.name and gi in x.gpus]
        safe_lend, lend_use = _safe_lendable(view, g, here, demand)
        # Weights and pool may sit in lent memory (its lender takes it back by evicting WARM copies); or the pool
        # comes from WARM copies evicted when it is activated (the worker reclaims them then).
        free = g.free_bytes + sum(_freed(view, x) for x in evict if x in here)
        warm = sum(view.functions[x.function].shard_bytes for x in here if x.state is ModelState.WARM)
        victims = sorted(
            (
                x
                for x in here
                if _idle(x)
                and (
                    demand[x.function].rank < mine
                    or waiting
                    and not demand[x.function].waiting
                    and now - x.last_used >= idle_s
                )
                and x not in evict
            ),
            key=lambda x: (x.state is ModelState.HOT, demand[x.function].util, x.last_used),
        )
        for x in victims:
            if free + safe_lend + warm >= need and free + safe_lend >= spec.shard_bytes:
                break
            evict.append(x)
            free += _freed(view, x)
            warm -= view.functions[x.function].shard_bytes if x.state is ModelState.WARM else 0
            cost += _W_EVICT * (1.0 + demand[x.function].util)
        if free + safe_lend + warm < need or free + safe_lend < spec.shard_bytes:
            return None
        borrowed = max(0, spec.shard_bytes - free)
        cost += _W_LEND * (borrowed / spec.shard_bytes) * (1.0 + lend_use) if spec.shard_bytes else 0.0
    # A victim on several of these GPUs frees memory on each of them: counted once per GPU above, which only
    # makes the estimate conservative (the sim and the worker enforce the real limit).
    return cost, evict


def _idle(x: Instance) -> bool:
    return x.state in (ModelState.WARM, ModelState.HOT) and x.inflight == 0


def _freed(view: ClusterView, x: Instance) -> int:
    """Bytes per GPU that evicting x frees: its weights, and its KV pool if HOT."""
    spec = view.functions[x.function]
    return spec.shard_bytes + (spec.kv_bytes if x.state is ModelState.HOT else 0)


def _safe_lendable(view: ClusterView, g, here: list[Instance], demand: dict[str, _Demand]) -> tuple[int, float]:
    """Lent KV bytes on GPU `g` that the lenders' own forecast leaves idle, and the lenders' forecast use (0..1)."""
    safe, use = 0, 0.0
    for x in here:
        if x.state is not ModelState.HOT or x.kv_reserved_bytes <= 0:
            continue
        n_hot = max(1, len(_of(view, x.function, ModelState.HOT)))
        u = min(1.0, (demand[x.function].util + demand[x.function].burst) / n_hot)
        safe += max(0, x.kv_reserved_bytes - max(x.kv_used_bytes, int(u * x.kv_reserved_bytes)))
        use = max(use, u)
    return min(safe, g.lendable_kv_bytes), use


def _gpu_util(view: ClusterView, demand: dict[str, _Demand], exclude: str) -> dict[tuple[str, int], float]:
    """Forecast compute demand per GPU from the HOT instances on it (a function's demand split over its copies)."""
    hot: dict[str, list[Instance]] = {}
    for x in view.instances:
        if x.state is ModelState.HOT and x.function != exclude:
            hot.setdefault(x.function, []).append(x)
    out: dict[tuple[str, int], float] = {}
    for name, xs in hot.items():
        share = demand[name].util / len(xs)
        for x in xs:
            for g in x.gpus:
                out[(x.worker, g)] = out.get((x.worker, g), 0.0) + share
    return out
