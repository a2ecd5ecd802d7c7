"""What each WarmServe technique earns: the warmserve policy against itself with one technique taken away
(forecasting: reactive only; evict-aware placement: first-fit; KV lending) or with a perfect (oracle) forecast,
next to the baselines, on the paper's cluster and functions.

Outputs bench/results/sim_ablation.json. Run: python -m sim.ablation [--rates 24,32] [--duration 900]
[--envelope servegen --start-hour 14] (a periodic day: ServeGen clients' diurnal series) [--override
gpu_memory_bytes=48e9] (memory short: where lending has something to do) [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sim import paper_setup
from sim.scenario import ABLATIONS, run_policy

VARIANTS = ("warmserve", *ABLATIONS, "static", "ondemand", "ondemand-tuned", "serverlessllm")


def run(rates: list[float], duration_s: float, seed: int, envelope: str = "flat", start_hour: int | None = None,
        overrides: dict | None = None, variants=VARIANTS) -> dict:  # fmt: skip
    """Each variant at each total rate on the paper's cluster; `overrides` replaces profile fields."""
    start = None if start_hour is None else paper_setup.HISTORY_DAYS * paper_setup.DAY + start_hour * 3600
    rows = []
    for rate in rates:
        sc = paper_setup.build(rate, seed=seed, duration_s=duration_s, envelope=envelope, start_s=start,
                               overrides=overrides)  # fmt: skip
        for name in variants:
            _, s = run_policy(sc, name)
            rows.append(s | {"rate_rps": rate})
    return {
        "experiment": "warmserve ablation on the paper setup (sim/ablation.py)",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "setup": {"envelope": envelope, "start_hour": start_hour, "overrides": overrides or {}},
        "results": rows,
    }


def _number(text: str) -> int | float:
    x = float(text)
    return int(x) if x.is_integer() else x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="24,32", help="total req/s, comma-separated")
    ap.add_argument("--duration", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--envelope", choices=("flat", "servegen"), default="flat")
    ap.add_argument("--start-hour", type=int, help="hour of day 8 the run starts (default: the paper's)")
    ap.add_argument("--override", action="append", default=[], help="profile field=value, repeatable")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated policies")
    ap.add_argument("--json", type=Path, default=Path("bench/results/sim_ablation.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    overrides = {k: _number(v) for k, v in (o.split("=", 1) for o in args.override)}
    out = run([float(r) for r in args.rates.split(",")], args.duration, args.seed, args.envelope, args.start_hour,
              overrides, args.variants.split(","))  # fmt: skip
    out["command"] = "python -m sim.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    for r in out["results"]:
        print(f"{r['rate_rps']:g}\t{r['policy']}\t{r['slo_attainment']:.4f}\t{r['ttft_p99_s']:.3f}")


if __name__ == "__main__":
    main()
