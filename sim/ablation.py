"""What each WarmServe technique earns: the warmserve policy against itself with one technique taken away
(forecasting: reactive only; evict-aware placement: first-fit; KV lending) or with a perfect (oracle) forecast,
next to the baselines, on the paper's cluster and functions.

Outputs bench/results/sim_ablation.json. Run: python -m sim.ablation [--rates 24,32] [--duration 900]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from sim import paper_setup
from sim.scenario import ABLATIONS, run_policy

VARIANTS = ("warmserve", *ABLATIONS, "static", "ondemand", "ondemand-tuned", "serverlessllm")


def run(rates: list[float], duration_s: float, seed: int) -> dict:
    rows = []
    for rate in rates:
        sc = paper_setup.build(rate, seed=seed, duration_s=duration_s)
        for name in VARIANTS:
            _, s = run_policy(sc, name)
            rows.append(s | {"rate_rps": rate})
    return {
        "experiment": "warmserve ablation on the paper setup (sim/ablation.py)",
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": f"python -m sim.ablation --rates {','.join(f'{r:g}' for r in rates)} --duration {duration_s:g}"
        f" --seed {seed}",
        "results": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="24,32", help="total req/s, comma-separated")
    ap.add_argument("--duration", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("bench/results/sim_ablation.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    out = run([float(r) for r in args.rates.split(",")], args.duration, args.seed)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    for r in out["results"]:
        print(f"{r['rate_rps']:g}\t{r['policy']}\t{r['slo_attainment']:.4f}\t{r['ttft_p99_s']:.3f}")


if __name__ == "__main__":
    main()
