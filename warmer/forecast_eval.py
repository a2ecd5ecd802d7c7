"""Evaluate the forecasters on the ServeGen 14-day language traces (see docs/forecasting.md).

Rolling origin, one window ahead: for every window t of the test days the forecaster sees the counts of all windows
before t (days 1..t, capped at the method's max_history_days) and predicts window t. Windows are ServeGen's native
600 s; the methods take window_s and derive their periods from it, so the live warmer runs the same code at 300 s.

    python -m warmer.forecast_eval                   # history days 1-7, test days 8-14 -> bench/results/forecast.json
    python -m warmer.forecast_eval --split validate  # history days 1-5, test days 6-7 (for tuning, never 8-14)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from warmer.forecast import DAY_S, METHODS, make_forecaster

log = logging.getLogger("warmer.forecast_eval")

TRACE_DIR = Path(__file__).resolve().parent.parent / "traces" / "servegen_alibaba"
MODELS_CSV = TRACE_DIR / "aggregate_rate_language_14d.csv"
CLIENTS_CSV = TRACE_DIR / "client_counts_language_14d.csv.gz"
WINDOW_S = 600  # ServeGen's native window
# MAPE is taken only over windows with at least this many requests per minute: a window of 0 actual requests has
# no percentage error, and 1 request vs 3 predicted is "200 %" yet irrelevant to provisioning. WAPE covers all.
MAPE_FLOOR_RPM = 1.0
# Trace gaps: ServeGen's m-mid and m-small aggregates drop by >99 % for 10 min to 2 h and recover at once (e.g.
# m-small 921,772 -> 0 x4 -> 707,656 requests per window), with every client of the model silent: lost data or an
# outage, not demand. Windows whose model aggregate is under GAP_FRACTION of the centred 12-h median are not scored
# (for the model and all its clients); the forecasters still see them in their history, as a live warmer would.
GAP_FRACTION, GAP_HALF_WINDOW = 0.1, 36
RISE_FACTOR = 1.2
SPLITS = {"test": (7, 14), "validate": (5, 7)}  # (history days before the first test window, last test day)


@dataclass(frozen=True)
class Series:
    name: str
    group: str  # "model" | "client_top" | "client_random"
    counts: np.ndarray  # requests per WINDOW_S window
    gaps: np.ndarray  # bool per window: trace gap of the series' model, not scored

    @property
    def model(self) -> str:
        return self.name.split("/")[0]


def gap_mask(aggregate: np.ndarray) -> np.ndarray:
    """Windows where a model's total traffic collapses far below its centred rolling median (see GAP_FRACTION)."""
    n, h = len(aggregate), GAP_HALF_WINDOW
    med = np.array([np.median(aggregate[max(0, t - h) : t + h + 1]) for t in range(n)])
    return aggregate < GAP_FRACTION * med


def load_models(path: Path = MODELS_CSV) -> dict[str, np.ndarray]:
    """Per-model aggregate series (rate columns) as counts per window."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    cols = [c for c in rows[0] if c != "window_start_s"]
    return {c.removeprefix("language_"): np.array([float(r[c]) for r in rows]) * WINDOW_S for c in cols}


def load_clients(path: Path = CLIENTS_CSV) -> dict[str, np.ndarray]:
    """Per-client series `model/client_id` -> integer counts per window."""
    with gzip.open(path, "rt") as f:
        header = f.readline().strip().split(",")
        data = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if header[0] != "window_start_s" or data.shape[1] != len(header):
        raise ValueError(f"{path}: expected header window_start_s,<model/client>..., got {header[:3]}...")
    return {name: data[:, i].astype(float) for i, name in enumerate(header) if i > 0}


def select_clients(
    clients: dict[str, np.ndarray], gaps: dict[str, np.ndarray], fit_windows: int, top_n: int, random_n: int, seed: int
) -> list[Series]:
    """Top `top_n` clients per model by fit-period volume, plus `random_n` drawn (seeded) from the rest.

    Ranked on the history part only, so the choice does not peek at the test days. Random draws need at least one
    request in both parts: a client that is silent throughout has nothing to forecast."""
    by_model: dict[str, list[str]] = {}
    for name in clients:
        by_model.setdefault(name.split("/")[0], []).append(name)
    picked: list[Series] = []
    rest = []
    for names in by_model.values():
        names.sort(key=lambda n: -clients[n][:fit_windows].sum())
        picked += [Series(n, "client_top", clients[n], gaps[n.split("/")[0]]) for n in names[:top_n]]
        rest += [n for n in names[top_n:] if clients[n][:fit_windows].sum() > 0 and clients[n][fit_windows:].sum() > 0]
    rng = np.random.default_rng(seed)
    for n in sorted(rng.choice(sorted(rest), size=min(random_n, len(rest)), replace=False)):
        picked.append(Series(str(n), "client_random", clients[n], gaps[str(n).split("/")[0]]))
    return picked


def run_series(x: np.ndarray, method: str, start: int, stop: int, window_s: int = WINDOW_S) -> tuple:
    """One-step-ahead forecasts for windows start..stop-1; returns (mean counts, peak counts) per window."""
    fc = make_forecaster(method, window_s=window_s)
    mean, peak = np.empty(stop - start), np.empty(stop - start)
    for i, t in enumerate(range(start, stop)):
        p = fc.predict(x[:t])
        mean[i], peak[i] = p.mean * window_s, p.peak * window_s
    return mean, peak


def metrics(
    actual: np.ndarray, mean: np.ndarray, peak: np.ndarray, previous: np.ndarray, window_s: int = WINDOW_S
) -> dict:
    """MAPE over windows above the floor; WAPE and bias over all windows; how often the peak is exceeded, and by how
    much the peak over-provisions (sum of predicted peak / sum of actual).

    Rises (windows above the floor with at least RISE_FACTOR x the previous window's requests) are where
    prewarming pays: a reactive policy, and the `last` forecast, are behind on every one of them by definition.
    So the peak's miss rate is also reported on rises alone."""
    tot = actual.sum()
    big = actual >= MAPE_FLOOR_RPM * window_s / 60
    rise = big & (actual >= RISE_FACTOR * previous)
    return {
        "mape": float(np.mean(np.abs(mean[big] - actual[big]) / actual[big])) if big.any() else None,
        "mape_windows": int(big.sum()),
        "wape": float(np.abs(mean - actual).sum() / tot) if tot > 0 else None,
        "bias": float((mean - actual).sum() / tot) if tot > 0 else None,
        "peak_under_rate": float(np.mean(actual > peak)),
        "peak_headroom": float(peak.sum() / tot) if tot > 0 else None,
        "rise_windows": int(rise.sum()),
        "peak_under_rate_rises": float(np.mean(actual[rise] > peak[rise])) if rise.any() else None,
        "mean_rate_rps": float(actual.mean() / window_s),
    }


def _column(rows: list[dict], method: str, key: str) -> np.ndarray:
    return np.array([r["methods"][method][key] for r in rows if r["methods"][method][key] is not None])


def _best_count(rows: list[dict], method: str, methods: tuple[str, ...]) -> int:
    """Series on which `method` has the lowest MAPE (ties count for each tied method)."""
    scored = [r["methods"] for r in rows if all(r["methods"][k]["mape"] is not None for k in methods)]
    return sum(1 for r in scored if r[method]["mape"] == min(r[k]["mape"] for k in methods))


def _summary(per_series: list[dict], methods: tuple[str, ...]) -> dict:
    """Per group: medians across series (per-series MAPE is heavy-tailed on bursty clients), mean miss rate."""
    out = {}
    for group in sorted({s["group"] for s in per_series}):
        rows = [s for s in per_series if s["group"] == group]
        out[group] = {"series": len(rows)} | {
            m: {
                "mape_median": float(np.median(_column(rows, m, "mape"))),
                "mape_mean": float(np.mean(_column(rows, m, "mape"))),
                "wape_median": float(np.median(_column(rows, m, "wape"))),
                "peak_under_rate_mean": float(np.mean(_column(rows, m, "peak_under_rate"))),
                "peak_headroom_median": float(np.median(_column(rows, m, "peak_headroom"))),
                "rise_windows": int(_column(rows, m, "rise_windows").sum()),
                "peak_under_rate_rises_mean": float(np.mean(_column(rows, m, "peak_under_rate_rises"))),
                "best_mape_count": _best_count(rows, m, methods),
            }
            for m in methods
        }
    return out


def evaluate(series: list[Series], methods: tuple[str, ...], split: str) -> dict:
    hist_days, end_day = SPLITS[split]
    day = DAY_S // WINDOW_S
    start, stop = hist_days * day, end_day * day
    per_series = []
    for s in series:
        keep = ~s.gaps[start:stop]
        actual = s.counts[start:stop][keep]
        previous = s.counts[start - 1 : stop - 1][keep]
        row = {"name": s.name, "group": s.group, "gap_windows": int((~keep).sum()), "methods": {}}
        for m in methods:
            t0 = time.perf_counter()
            mean, peak = run_series(s.counts, m, start, stop)
            row["methods"][m] = metrics(actual, mean[keep], peak[keep], previous) | {
                "seconds": round(time.perf_counter() - t0, 3)
            }
        per_series.append(row)
        log.info("%-22s %s", s.name, "  ".join(f"{m}={row['methods'][m]['mape'] or float('nan'):.3f}" for m in methods))
    return {
        "split": split,
        "history_days": hist_days,
        "test_days": [hist_days + 1, end_day],
        "window_s": WINDOW_S,
        "mape_floor_rpm": MAPE_FLOOR_RPM,
        "gap_rule": {"fraction_of_rolling_median": GAP_FRACTION, "half_window": GAP_HALF_WINDOW},
        "methods": list(methods),
        "summary": _summary(per_series, methods),
        "series": per_series,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(SPLITS), default="test")
    ap.add_argument("--top-n", type=int, default=5, help="top clients per model by volume")
    ap.add_argument("--random-n", type=int, default=15, help="random clients over all models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/forecast.json for --split test")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = tuple(a.methods.split(","))
    for m in methods:
        make_forecaster(m, WINDOW_S)  # unknown names fail here, before minutes of work
    fit_windows = SPLITS[a.split][0] * DAY_S // WINDOW_S
    models = load_models()
    gaps = {n: gap_mask(x) for n, x in models.items()}
    series = [Series(n, "model", x, gaps[n]) for n, x in models.items()]
    series += select_clients(load_clients(), gaps, fit_windows, a.top_n, a.random_n, a.seed)
    t0 = time.perf_counter()
    result = evaluate(series, methods, a.split)
    result |= {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m warmer.forecast_eval", *(argv or [])]),
        "selection": {"top_n_per_model": a.top_n, "random_n": a.random_n, "seed": a.seed},
        "traces": [
            str(MODELS_CSV.relative_to(TRACE_DIR.parent.parent)),
            str(CLIENTS_CSV.relative_to(TRACE_DIR.parent.parent)),
        ],
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    out = a.out or (Path("bench/results/forecast.json") if a.split == "test" else None)
    for group, g in result["summary"].items():
        log.info("%s (%d series)", group, g["series"])
        for m in methods:
            r = g[m]
            log.info(
                "  %-10s MAPE median %.3f mean %.3f | WAPE median %.3f | best on %d | "
                "peak missed %.3f (on rises %.3f), headroom %.2fx",
                m, r["mape_median"], r["mape_mean"], r["wape_median"], r["best_mape_count"],
                r["peak_under_rate_mean"], r["peak_under_rate_rises_mean"], r["peak_headroom_median"],
            )  # fmt: skip
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        log.info("wrote %s", out)


if __name__ == "__main__":
    main()
