"""Why one warmserve variant misses more than another on the same scenario (issue 12: "a better forecast never does
worse"; docs/simulator.md, "Sixth round").

Per seed and variant: SLO attainment and, with `--detail`, per function: requests, misses, why each missed request
waited (`pool`: every HOT copy's KV pool was full; `gpu`: a copy had pool room but its GPU no memory; `no_hot`:
no HOT copy; `engine`: admitted at once, slow inside the engine), mean HOT and WARM copies (sampled every planner
tick), the state of the missed requests' models on arrival, the misses per minute, and the copies the initial plan
placed.

`--scale K` multiplies every prediction the planner acts on (mean and peak) by K: a forecast as good as the
original, to measure how far a run moves for a change that should not matter. `--try NAME[,NAME]` applies a trial
change that no policy uses (each is described in `TRIALS`), undone after the run.

Run: python -m sim.diagnose --rate 24 --duration 900 --seeds 0-4 [--override gpu_memory_bytes=48e9]
[--envelope servegen --start-hour 14] [--periodic-host-gb 64] [--variants warmserve,warmserve-oracle]
[--scale 1,1.01] [--try minbatch8] [--detail [--watch llama-7b-3 --span 640-670]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import Counter
from datetime import UTC, datetime

import numpy as np

from protocol.states import ModelState
from sim import paper_setup, periodic, policies, sizing
from sim.ablation import _number
from sim.cluster import Sim
from sim.report import STATE_NAMES, measured, ttfts
from sim.scenario import make_policy, run_policy
from warmer import placement
from warmer.forecast import Prediction

TRIALS = {
    "minbatch8": "a KV pool holds at least min(sizing.MIN_SHARED_BATCH, what half the room holds) requests of the "
    "function's mean size (Little's law at the window's peak rate, doubled, gives 1-2 for code-trace functions)",
    "util": "the planner's per-GPU demand (_gpu_util) counts a function with no HOT copy on its WARM and LOADING "
    "copies (they are what will serve it)",
    "burstm": "the planner's burst (co-location cost, lendable pool share) and the pool lending use the forecast "
    "peak times 1 + burst_margin, as the resident target does",
}


@contextlib.contextmanager
def trial(names: list[str]):
    """Apply trial changes (TRIALS) for the duration of the block."""
    saved: list[tuple[object, str, object]] = []

    def swap(obj, attr, value):
        saved.append((obj, attr, vars(obj)[attr]))  # a class's staticmethod as it is stored, not unwrapped
        setattr(obj, attr, value)

    for name in names:
        if name == "minbatch8":
            swap(sizing, "size", _min_batch(sizing.size, sizing.MIN_SHARED_BATCH))
        elif name == "util":
            swap(placement, "_gpu_util", _gpu_util_with_warm)
        elif name == "burstm":
            swap(placement, "_demand", _demand_burst_margin(placement._demand))
            swap(policies.WarmServe, "_forecast_use", staticmethod(_forecast_use_burst_margin))
        elif name:
            raise SystemExit(f"unknown trial {name!r}; choose from {', '.join(TRIALS)}")
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _min_batch(size, floor: int):
    def sized(engine, usable_bytes, prompt, output, peak_rps=None, pool_share=0.5):
        s = size(engine, usable_bytes, prompt, output, peak_rps, pool_share)
        if peak_rps is None:
            return s
        fill = size(engine, usable_bytes, prompt, output, None, pool_share).batch
        b = min(floor, fill)
        if b <= s.batch:
            return s
        m = engine.m
        pool = max(s.pool_bytes, min(usable_bytes - m.shard_bytes, b * s.mean_tokens * m.kv_bytes_per_token / m.tp))
        p, o = np.asarray(prompt, float), np.asarray(output, float)
        cap = engine.capacity_rps(float(p.mean()) if p.size else 1024.0, float(o.mean()) if o.size else 1.0, b)
        return sizing.Sizing(b, pool, cap, s.mean_tokens)

    return sized


def _gpu_util_with_warm(view, demand, exclude):
    serving: dict[str, list] = {}
    for x in view.instances:
        if x.function != exclude and x.state is ModelState.HOT:
            serving.setdefault(x.function, []).append(x)
    idle: dict[str, list] = {}
    for x in view.instances:
        if x.function != exclude and x.function not in serving and x.state in (ModelState.WARM, ModelState.LOADING):
            idle.setdefault(x.function, []).append(x)
    out: dict[tuple[str, int], float] = {}
    for name, xs in (serving | idle).items():
        for x in xs:
            for g in x.gpus:
                out[(x.worker, g)] = out.get((x.worker, g), 0.0) + demand[name].util / len(xs)
    return out


def _demand_burst_margin(demand_fn):
    def _demand(view, spec, pred, margin):
        d = demand_fn(view, spec, pred, margin)
        mean = pred.mean if pred else 0.0
        burst = max(max(pred.peak if pred else 0.0, mean) * (1.0 + margin) - mean, 0.0) / max(spec.capacity_rps, 1e-9)
        return placement._Demand(d.hot, d.resident, d.util, burst, d.starved, d.waiting)

    return _demand


def _forecast_use_burst_margin(capacity_rps, pred, rps):
    peak = max(pred.peak, pred.mean) * (1.0 + placement.DEFAULT_OPTIONS.burst_margin) if pred else 0.0
    return max(peak, rps) / max(capacity_rps, 1e-9)


def run(sc, variant: str, scale: float = 1.0, detail: bool = False, watch: str | None = None,
        span: tuple[float, float] = (0.0, math.inf)) -> dict:  # fmt: skip
    """One variant on scenario `sc`, instrumented. `watch`: a function whose HOT/WARM/LOADING copies, queue, HOT
    target (ceil(forecast mean / pool capacity)) and forecast are recorded at every planner tick within `span`
    (seconds into the run), with its missed requests' arrival times."""
    pol = make_policy(variant, sc)
    n = len(sc.workload)
    nf = len(sc.functions)
    why = np.full(n, "", dtype=object)
    samples: list[tuple[float, np.ndarray, np.ndarray]] = []
    forecast, tick = pol._forecast, pol.on_tick
    initial: list[tuple[str, tuple, str]] = []
    names = [f.name for f in sc.functions]
    last: dict[str, Prediction] = {}
    targets = np.zeros(nf, np.int64)  # per function: the most HOT copies its forecast alone asked for
    watched: list[tuple] = []

    def scaled(sim, now):
        preds = {k: Prediction(p.mean * scale, p.peak * scale) for k, p in forecast(sim, now).items()}
        last.clear()
        last.update(preds)
        for i, name in enumerate(names):
            if name in preds:
                targets[i] = max(targets[i], math.ceil(preds[name].mean / max(pol._caps[i], 1e-9) - 1e-9))
        return preds

    def sampled(sim, now):
        if not initial:
            initial.extend(sorted((sim.fns[x.f].name, x.gpus, x.state.value) for x in sim.insts.values()))
        tick(sim, now)
        hot, warm = np.zeros(nf), np.zeros(nf)
        for x in sim.insts.values():
            (hot if x.state is ModelState.HOT else warm if x.state is ModelState.WARM else np.zeros(nf))[x.f] += 1
        samples.append((now, hot, warm))
        t = now - sim.w.start_s
        if watch is not None and span[0] <= t <= span[1]:
            f = names.index(watch)
            p = last.get(watch)
            states = [x.state for x in sim.by_fn[f]]
            watched.append((round(t, 1), states.count(ModelState.HOT), states.count(ModelState.WARM),
                            states.count(ModelState.LOADING), len(sim.queue[f]),
                            math.ceil(p.mean / max(pol._caps[f], 1e-9) - 1e-9) if p else 0,
                            round(p.mean, 2) if p else 0.0, round(p.peak, 2) if p else 0.0))  # fmt: skip

    pick = Sim._pick

    def why_queued(self, f, r):
        x = pick(self, f, r)
        if x is None and not why[r]:
            hot = [y for y in self.by_fn[f] if y.state is ModelState.HOT]
            need = self._kv_need(f, r)
            if not hot:
                why[r] = "no_hot"
            elif all(y.load() and y.kv_bytes + need > y.kv_cap for y in hot):
                why[r] = "pool"
            else:
                why[r] = "gpu"
        return x

    pol._forecast = scaled
    pol.on_tick = sampled
    Sim._pick = why_queued
    try:
        sim, s = run_policy(sc, variant, policy=pol)
    finally:
        Sim._pick = pick
    out = {"variant": variant, "slo_attainment": s["slo_attainment"], "ttft_p99_s": s["ttft_p99_s"],
           "counters": s["counters"]}  # fmt: skip
    if not detail:
        return out
    idx = measured(sim, sc.warmup_s)
    fn = sim.w.fn[idx].astype(np.int64)
    slo = np.array([f.slo_ttft_s for f in sim.fns])[fn]
    miss = (ttfts(sim, idx) > slo) | np.isnan(sim.first_token[idx])
    hot = np.mean([h for _, h, _ in samples], axis=0)
    warm = np.mean([w for _, _, w in samples], axis=0)
    minute = ((sim.w.t[idx] - sim.w.start_s) // 60).astype(np.int64)
    per_min = np.zeros((nf, int(sc.workload.duration_s // 60) + 1), np.int64)
    np.add.at(per_min, (fn[miss], minute[miss]), 1)
    out["functions"] = [
        {
            "name": f.name,
            "rate_rps": round(float(np.sum(sim.w.fn == i)) / sc.workload.duration_s, 3),
            "pool_gb": round(pol._pools[i] / 1e9, 2),
            "pool_capacity_rps": round(pol._caps[i], 2),
            "requests": int(np.sum(fn == i)),
            "misses": int(np.sum(miss & (fn == i))),
            "why": dict(Counter(why[r] or "engine" for r in idx[miss & (fn == i)])),
            "hot_mean": round(float(hot[i]), 2),
            "warm_mean": round(float(warm[i]), 2),
            "misses_per_minute": per_min[i].tolist(),
        }
        for i, f in enumerate(sim.fns)
    ]
    out["why"] = dict(Counter(why[r] or "engine" for r in idx[miss]))
    # the best state of the missed requests' models on arrival (the gateway's x-warmserve-state)
    out["missed_on_arrival"] = dict(Counter(STATE_NAMES[int(a)] for a in sim.arrival_state[idx[miss]]))
    out["hot_mean_total"] = round(float(hot.sum()), 2)
    out["forecast_hot_target_max"] = dict(zip(names, targets.tolist(), strict=True))
    if watch is not None:
        f = names.index(watch)
        t_miss = sim.w.t[idx[miss & (fn == f)]] - sim.w.start_s
        out["watch"] = {
            "function": watch,
            "ticks (t, HOT, WARM, LOADING, queued, HOT target, mean, peak)": watched,
            "missed_arrivals_s": [round(float(t), 1) for t in t_miss if span[0] <= t <= span[1]],
        }
    out["initial_plan"] = initial
    return out


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=24.0)
    ap.add_argument("--duration", type=float, default=900.0)
    ap.add_argument("--seeds", default="0", help="e.g. 0-4 or 0,3")
    ap.add_argument("--envelope", choices=("flat", "servegen"), default="flat")
    ap.add_argument("--start-hour", type=int, help="hour of day 8 the run starts (default: the paper's)")
    ap.add_argument("--periodic-host-gb", type=float, help="the periodic scenario (sim/periodic.py) instead")
    ap.add_argument("--override", action="append", default=[], help="profile field=value, repeatable")
    ap.add_argument("--variants", default="warmserve,warmserve-oracle")
    ap.add_argument("--scale", default="1", help="prediction scale factors, comma-separated (one run each)")
    ap.add_argument("--try", dest="trials", default="", help=f"trial changes, comma-separated: {', '.join(TRIALS)}")
    ap.add_argument("--detail", action="store_true", help="per-function breakdown (JSON on stdout)")
    ap.add_argument("--watch", help="with --detail: one function's copies and forecast at every planner tick")
    ap.add_argument("--span", default="0-inf", help="seconds into the run --watch covers, e.g. 640-670")
    args = ap.parse_args(argv)
    overrides = {k: _number(v) for k, v in (o.split("=", 1) for o in args.override)}
    variants, scales = args.variants.split(","), [float(x) for x in args.scale.split(",")]
    lo, _, hi = args.span.partition("-")
    span = (float(lo), float(hi or "inf"))
    print("# " + datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC") + "  python -m sim.diagnose " + " ".join(
        argv if argv is not None else sys.argv[1:]))  # fmt: skip
    table: dict[tuple[str, float], list[float]] = {}
    with trial([t for t in args.trials.split(",") if t]):
        for seed in _seeds(args.seeds):
            if args.periodic_host_gb:
                sc = periodic.build(args.rate, seed, args.duration, args.periodic_host_gb, overrides or None)
            else:
                start = None if args.start_hour is None else paper_setup.HISTORY_DAYS * paper_setup.DAY + (
                    args.start_hour * 3600)  # fmt: skip
                sc = paper_setup.build(args.rate, seed=seed, duration_s=args.duration, envelope=args.envelope,
                                       start_s=start, overrides=overrides or None)  # fmt: skip
            cells = []
            for v in variants:
                for k in scales:
                    r = run(sc, v, k, args.detail, args.watch, span)
                    table.setdefault((v, k), []).append(r["slo_attainment"])
                    cells.append(f"{v}{'' if k == 1 else f' x{k:g}'} {100 * r['slo_attainment']:.2f}%")
                    if args.detail:
                        print(json.dumps({"seed": seed} | r))
            print(f"seed {seed}: " + ", ".join(cells), flush=True)
    print("mean: " + ", ".join(f"{v}{'' if k == 1 else f' x{k:g}'} {100 * np.mean(x):.3f}%" for (v, k), x in
                               table.items()))  # fmt: skip
    if len(variants) == 2 and len(scales) == 1:
        a, b = (np.array(table[(v, scales[0])]) for v in variants)
        print(f"{variants[1]} >= {variants[0]} in {int(np.sum(b >= a))} of {len(a)} seeds")


if __name__ == "__main__":
    main()
