"""A periodic, memory-short workload: where prewarming ahead of a predictable burst and KV lending have work to do
(issue 12's required outcomes "forecasting beats reactive-only by a clear margin on periodic workloads" and
"lending shows a measured gain").

- `STEADY` functions (two Llama-13B, two Llama-7B) carry `STEADY_SHARE` of the mean rate all the time: they stay
  HOT, and their KV pools (sized for their recent peak) are mostly idle: the memory lending can use.
- `GROUPS` x `PER_GROUP` Llama-7B functions carry the rest in bursts: each group sends all of its traffic in one
  fixed 5-minute window of every hour (`burst_window`: group g at minute 5 + 10 g, a 5-minute gap between two
  groups' bursts), the same window every hour of every day, so a forecaster that has seen yesterday knows when;
  the functions of a group arrive together, cold.
- One worker of `GPUS` 48-GB GPUs (`--override gpu_memory_bytes=48e9`) cannot hold every function's weights
  (24 x 13.5 GB of bursty ones next to 79 GB of steady ones, against 352 GB): between two bursts the next group
  must be swapped in, which is what prewarming is for. With 3 groups (until issue 12's fourth round) every
  weight stayed on the GPUs and reacting cost only a pool activation. With `host_gb` below the weights' total
  the host cache cannot hold them either: a cold copy is a disk read.

Outputs bench/results/sim_periodic.json. Run: python -m sim.periodic [--rates 4,8] [--duration 3600]
[--host-gb 512,64] [--override gpu_memory_bytes=48e9] [--variants ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from protocol.settings import DEFAULTS, Settings
from sim import traces
from sim.engine_model import load_profile
from sim.paper_setup import HISTORY_DAYS, START_HOUR
from sim.scenario import Scenario, assemble, run_policy

DAY = 86_400
STEADY = ["llama-13b", "llama-13b", "llama-7b", "llama-7b"]
STEADY_SHARE = 0.5
GROUPS, PER_GROUP = 6, 4
GPUS = 8
BURSTY = "llama-7b"
SLOT_S = 300  # one forecast window: a burst fills exactly one
VARIANTS = ("warmserve", "warmserve-reactive", "warmserve-oracle", "warmserve-nolend", "ondemand")


def build(total_rps: float, seed: int = 0, duration_s: float = 3600.0, host_gb: float = 512.0,
          overrides: dict | None = None, settings: Settings = DEFAULTS) -> Scenario:  # fmt: skip
    """The periodic scenario at `total_rps` mean total rate, starting at 10:00 of day 8 after 7 days of history."""
    profile = dataclasses.replace(load_profile(), host_memory_bytes=int(host_gb * 1e9), **(overrides or {}))
    start = HISTORY_DAYS * DAY + START_HOUR * 3600
    models = STEADY + [BURSTY] * (GROUPS * PER_GROUP)
    names = [f"steady-{i}" for i in range(len(STEADY))] + [
        f"burst{g}-{i}" for g in range(GROUPS) for i in range(PER_GROUP)
    ]
    n_burst = GROUPS * PER_GROUP
    steady = STEADY_SHARE * traces.powerlaw(len(STEADY), 1.0)
    share = np.concatenate([steady, np.full(n_burst, (1 - STEADY_SHARE) / n_burst)])
    env = _envelope(len(STEADY), int(np.ceil((start + duration_s) / 3600)))
    # Every function on the conversation trace: on the code trace the pools' Little's-law sizing leaves the
    # bursty functions ~1 GB pools here, and KV queueing would hide what this workload is for.
    bases = traces.azure_bases()
    tr = traces.make_traffic(bases, [0] * len(models), total_rps * share, env, SLOT_S, seed)
    return assemble(profile, models, names, bases, tr, start, duration_s, seed, 1, GPUS, settings)


def _envelope(n_steady: int, hours: int) -> np.ndarray:
    """5-minute windows: 1 for the steady functions; a bursty function of group g sends its whole hour's traffic
    (x 12) in window 2 + 4 g of every hour and nothing elsewhere."""
    per_hour = 3600 // SLOT_S
    env = np.ones((n_steady + GROUPS * PER_GROUP, hours * per_hour))
    for g in range(GROUPS):
        rows = slice(n_steady + g * PER_GROUP, n_steady + (g + 1) * PER_GROUP)
        env[rows] = 0.0
        env[rows, np.arange(hours) * per_hour + burst_window(g)] = per_hour
    return env


def burst_window(g: int) -> int:
    """The 5-minute window of every hour in which group g sends its traffic: groups evenly spaced over the hour."""
    spacing = 3600 // SLOT_S // GROUPS
    return spacing // 2 + spacing * g


def run(rates: list[float], duration_s: float, seed: int, host_gbs: list[float], overrides: dict | None,
        variants=VARIANTS, settings: Settings = DEFAULTS) -> list[dict]:  # fmt: skip
    rows = []
    for host_gb in host_gbs:
        for rate in rates:
            sc = build(rate, seed, duration_s, host_gb, overrides, settings)
            for name in variants:
                _, s = run_policy(sc, name)
                rows.append(s | {"rate_rps": rate, "host_gb": host_gb, "forecast": settings.forecast_method})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="4,8", help="total req/s, comma-separated")
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host-gb", default="512,64", help="host cache per worker, GB, comma-separated")
    ap.add_argument("--override", action="append", default=[], help="profile field=value, repeatable")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--forecast", default=DEFAULTS.forecast_method, help="the warmer's forecaster (warmer.forecast)")
    ap.add_argument("--json", type=Path, default=Path("bench/results/sim_periodic.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    overrides = {k: float(v) for k, v in (o.split("=", 1) for o in args.override)}
    rows = run([float(r) for r in args.rates.split(",")], args.duration, args.seed,
               [float(h) for h in args.host_gb.split(",")], overrides, args.variants.split(","),
               dataclasses.replace(DEFAULTS, forecast_method=args.forecast))  # fmt: skip
    out = {
        "experiment": "periodic bursts of cold functions on a memory-short worker (sim/periodic.py)",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": "python -m sim.periodic " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "steady": STEADY,
            "steady_share": STEADY_SHARE,
            "groups": GROUPS,
            "per_group": PER_GROUP,
            "gpus": GPUS,
            "overrides": overrides,
        },  # fmt: skip
        "results": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        c = r["counters"]
        print(
            f"{r['host_gb']:g}GB\t{r['rate_rps']:g}\t{r['policy']}\t{r['slo_attainment']:.4f}\t{r['ttft_p99_s']:.3f}"
            f"\tloads {c['loads']} disk {c['disk_loads']} borrowed {c.get('borrowed_pools', 0)}"
        )


if __name__ == "__main__":
    main()
