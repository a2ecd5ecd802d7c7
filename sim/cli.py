"""`warmserve sim ...` / `python -m sim ...`: run the simulator.

python -m sim run --rate 16 --policies warmserve,ondemand --duration 900
python -m sim day --rate 14 --policies warmserve          # a day of traffic (1M+ requests), timed
python -m sim paper [--quick]                             # the paper's experiment -> results JSON + report
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from protocol.settings import DEFAULTS
from sim import paper_setup
from sim.engine_model import DEFAULT_PROFILE
from sim.report import markdown_table, measured, plot_timeline, plot_ttft_cdf, ttfts
from sim.scenario import ABLATIONS, POLICIES, run_policy
from warmer.forecast import METHODS

log = logging.getLogger("sim")


def _policies(s: str) -> list[str]:
    names = [p.strip() for p in s.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES + ABLATIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(POLICIES + ABLATIONS)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="warmserve sim", description="Discrete-event simulator of a WarmServe cluster")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("run", "one scenario at one total rate"), ("day", "a day of traffic (ServeGen envelope)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--rate", type=float, default=16.0 if name == "run" else 14.0, help="mean total req/s")
        p.add_argument("--policies", type=_policies, default=list(POLICIES), help="comma-separated")
        p.add_argument("--duration", type=float, default=3600.0 if name == "run" else 86400.0, help="seconds")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--alpha", type=float, default=2.0, help="popularity power law (i+1)^-alpha")
        p.add_argument("--envelope", choices=("flat", "servegen"), default="flat" if name == "run" else "servegen")
        p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="calibration profile JSON")
        p.add_argument("--forecast", choices=METHODS, default=DEFAULTS.forecast_method,
                       help="warmserve policy's forecaster (default: the live warmer's)")  # fmt: skip
        p.add_argument("--json", type=Path, help="write the summaries here")
        p.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    p = sub.add_parser("paper", help="the WarmServe paper's experiment: rate sweep, all policies")
    p.add_argument("--quick", action="store_true", help="3 rates, 15 minutes each (a smoke run)")
    p.add_argument("--part", choices=("all", "sweep", "diurnal"), default="all", help="diurnal: add to --json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench/results/sim_paper_setup.json"))
    p.add_argument("--report", type=Path, default=Path("docs/sim_paper_report.md"))
    p.add_argument("--plots", type=Path, default=Path("bench/out/sim"))
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "paper":
            out = paper_setup.main(args.quick, args.seed, args.json, args.report, args.plots, args.part)
            print(
                json.dumps(
                    {k: out[k]["analysis"] if k == "diurnal" else out[k] for k in ("analysis", "diurnal") if k in out},
                    indent=1,
                )
            )
            return 0
        sc = paper_setup.build(args.rate, seed=args.seed, duration_s=args.duration, profile_path=args.profile,
                               alpha=args.alpha, envelope=args.envelope,
                               settings=replace(DEFAULTS, forecast_method=args.forecast))  # fmt: skip
    except (ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    log.info("%d requests over %.0f s, %d functions", len(sc.workload), sc.workload.duration_s, len(sc.functions))
    rows, sims = [], {}
    for name in args.policies:
        sim, s = run_policy(sc, name)
        s["rate_rps"] = args.rate
        s["requests_simulated"] = len(sc.workload)
        rows.append(s)
        sims[name] = sim
    print(markdown_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.plots:
        tts = {n: ttfts(sim, measured(sim, sc.warmup_s)) for n, sim in sims.items()}
        plot_ttft_cdf(tts, args.plots / "ttft_cdf.png", f"TTFT CDF, {args.rate:g} req/s")
        plot_timeline({n: sim.timeline for n, sim in sims.items()}, args.plots / "timeline.png", "GPU memory / states")
    return 0
