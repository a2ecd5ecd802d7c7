"""Workload shapes other than the paper's, to show the warmserve policy holds on each (issue 12): long-context
traffic, one bursty function among steady ones, and hundreds of tiny functions. Same cluster as the paper (16
GPUs of 80 GB on 2 workers), same arrival process (Azure hours tiled, overlaid and thinned, sim/traces.py).

- long-context: 8 Llama-3.1-8B functions (128k context) whose prompts are 32k-112k tokens and outputs
  256-4096 tokens (log-uniform: no public trace has per-request sizes this long). A TTFT SLO of 10 x a
  1024-token prefill cannot hold for a 100k-token prompt, whoever serves it: each function's SLO is the usual
  one plus the prefill of its 99th-percentile prompt.
- bursty: the paper's 11 functions plus one Llama-7B function that carries `BURST_SHARE` of the mean rate but
  sends all of it in one 10-minute window per hour, a different (random) window every hour: no forecaster can
  know when, so the burst tests the reactive path and the headroom, not the forecast.
- tiny: 200 Llama-7B functions, popularity (i+1)^-1 (the least popular gets a request every few minutes). Their
  weights (2.7 TB) fill neither the GPUs (1.2 TB) nor the host caches (1 TB): most requests of the tail are cold
  for everyone.

Outputs bench/results/sim_shapes.json. Run: python -m sim.shapes [--duration 1800] [--shapes long-context,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from protocol.settings import DEFAULTS
from sim import traces
from sim.engine_model import load_profile
from sim.paper_setup import HISTORY_DAYS, MODELS, START_HOUR
from sim.scenario import Scenario, assemble, run_policy
from sim.traces import Workload

DAY = 86_400
BURST_SHARE = 0.3
LONG_PROMPT = (32_768, 114_688)  # tokens, log-uniform: prompt + longest output stays within 128k positions
LONG_OUTPUT = (256, 4_096)
# Total mean rates (req/s) per shape: light to loaded for the cluster.
RATES = {"long-context": [0.25, 0.5, 1.0], "bursty": [8.0, 16.0, 24.0], "tiny": [1.0, 2.0, 4.0]}
POLICIES = ("warmserve", "ondemand", "ondemand-tuned", "serverlessllm", "ollama", "static")


def build(shape: str, total_rps: float, seed: int = 0, duration_s: float = 1800.0) -> Scenario:
    """The scenario of one shape at `total_rps` mean total rate, starting at 10:00 of day 8."""
    start = HISTORY_DAYS * DAY + START_HOUR * 3600
    end = start + duration_s
    hours = int(np.ceil(end / 3600))
    if shape == "long-context":
        models = ["llama3-8b"] * 8
        env, share, resize = np.ones((8, hours)), traces.powerlaw(8, 1.0), _long_sizes(seed)
    elif shape == "bursty":
        models = [*MODELS, "llama-7b"]
        share = np.append((1 - BURST_SHARE) * traces.powerlaw(len(MODELS), 2.0), BURST_SHARE)
        env, resize = _burst_envelope(len(models), hours, seed), None
    elif shape == "tiny":
        models = ["llama-7b"] * 200
        env, share, resize = np.ones((200, hours)), traces.powerlaw(200, 1.0), None
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(RATES)}")
    env_w = 600 if shape == "bursty" else 3600
    rank = np.random.default_rng(seed).permutation(len(models))
    if shape != "bursty":  # popularity in a seeded random order; the bursty function stays last
        share = share[rank]
    names = [f"{m}-{i}" for i, m in enumerate(models)]
    bases = traces.azure_bases()
    tr = traces.make_traffic(bases, [i % 2 for i in range(len(models))], total_rps * share, env, env_w, seed)
    sc = assemble(load_profile(), models, names, bases, tr, start, duration_s, seed, 2, 8, DEFAULTS, resize)
    return _long_slo(sc) if shape == "long-context" else sc


def _long_sizes(seed: int):
    def resize(wl: Workload) -> Workload:
        rng = np.random.default_rng(seed + 3)
        n = len(wl)
        prompt = np.exp(rng.uniform(*np.log(LONG_PROMPT), size=n)).astype(np.int32)
        output = np.exp(rng.uniform(*np.log(LONG_OUTPUT), size=n)).astype(np.int32)
        return dataclasses.replace(wl, prompt=prompt, output=output)

    return resize


def _long_slo(sc: Scenario) -> Scenario:
    """Each function's SLO plus the prefill of its 99th-percentile prompt: the part no policy can remove."""
    fns = []
    for i, fn in enumerate(sc.functions):
        mine = sc.workload.prompt[sc.workload.fn == i]
        p99 = int(np.percentile(mine, 99)) if len(mine) else LONG_PROMPT[1]
        fns.append(dataclasses.replace(fn, slo_ttft_s=fn.slo_ttft_s + fn.engine.prefill_s(p99)))
    return dataclasses.replace(sc, functions=fns)


def _burst_envelope(n: int, hours: int, seed: int) -> np.ndarray:
    """600-s windows: 1 for the steady functions; for the last, 6 in one random window per hour, 0 elsewhere."""
    env = np.ones((n, hours * 6))
    pick = np.random.default_rng(seed + 4).integers(0, 6, size=hours)
    env[-1] = 0.0
    env[-1, np.arange(hours) * 6 + pick] = 6.0
    return env


def run(shapes: list[str], duration_s: float, seed: int, policies=POLICIES) -> list[dict]:
    rows = []
    for shape in shapes:
        for rate in RATES[shape]:
            sc = build(shape, rate, seed, duration_s)
            for name in policies:
                try:
                    _, s = run_policy(sc, name)
                except RuntimeError as e:  # static: one replica of every function does not fit
                    s = {"policy": name, "infeasible": str(e)}
                rows.append(s | {"shape": shape, "rate_rps": rate, "functions": len(sc.functions)})
    return rows


def verdict(rows: list[dict]) -> dict:
    """Per shape and rate: warmserve's SLO attainment minus ondemand's (>= 0 is the required outcome)."""
    by = {(r["shape"], r["rate_rps"], r["policy"]): r.get("slo_attainment") for r in rows}
    out = {}
    for shape, rate, p in by:
        if p == "warmserve" and by.get((shape, rate, "ondemand")) is not None:
            out[f"{shape}@{rate:g}"] = round(by[(shape, rate, p)] - by[(shape, rate, "ondemand")], 5)
    return {"warmserve_minus_ondemand": out, "holds": all(v >= 0 for v in out.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(RATES), help="comma-separated")
    ap.add_argument("--duration", type=float, default=1800.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--json", type=Path, default=Path("bench/results/sim_shapes.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    shapes, policies = args.shapes.split(","), args.policies.split(",")
    rows = run(shapes, args.duration, args.seed, policies)
    out = {
        "experiment": "workload shapes (sim/shapes.py)",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": f"python -m sim.shapes --shapes {args.shapes} --duration {args.duration:g} --seed {args.seed}"
        f" --policies {args.policies}",
        "rates_rps": {s: RATES[s] for s in shapes},
        "results": rows,
        "verdict": verdict(rows),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(f"{r['shape']}\t{r['rate_rps']:g}\t{r['policy']}\t{r.get('slo_attainment', 'n/a')}")
    print(json.dumps(out["verdict"], indent=1))


if __name__ == "__main__":
    main()
