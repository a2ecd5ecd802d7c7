"""Workloads for the simulator from real traces (traces/*/README.md give source and license).

- Azure LLM 2023 (Splitwise): per-request arrival time and sizes of a code and a conversation service, ~1 h each.
  These give second-level burstiness and request sizes.
- ServeGen (Alibaba Bailian): per-client request counts per 10-minute window over 14 days. These give each
  function a daily/weekly rate envelope with real day-to-day variation.
- Popularity: function i gets a share proportional to (i+1)^-alpha of the total rate.

How one function's arrivals are made (vectorised, no per-request Python): its base Azure trace, stretched to
exactly one hour and tiled, is overlaid `k` times with different circular offsets (k = enough copies to reach the
function's highest rate), and each arrival is kept with probability rate(t) / (k * base rate). The offsets are
fixed per function, so the same function has the same within-hour shape every hour and every day: that is the
periodicity a forecaster may learn; the thinning is random per day. Sizes travel with the arrivals they came with.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
AZURE_DIR = REPO / "traces" / "azure_llm_2023"
SERVEGEN_CLIENTS = REPO / "traces" / "servegen_alibaba" / "client_counts_language_14d.csv.gz"
SPAN_S = 3600.0  # base traces are stretched to exactly this period so tiles align with forecast windows


@dataclass(frozen=True)
class Requests:
    """One base trace: sorted arrival offsets within [0, SPAN_S) and per-request sizes."""

    name: str
    t: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    @property
    def rate_rps(self) -> float:
        return len(self.t) / SPAN_S


def _open_text(path: Path):
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return io.StringIO(raw.decode())


def load_azure(path: str | Path) -> Requests:
    """Read an Azure LLM 2023 CSV (TIMESTAMP, ContextTokens, GeneratedTokens; .csv or .csv.gz)."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(_open_text(path)))
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise ValueError(f"trace {path}: cannot read: {e}") from None
    if not rows:
        raise ValueError(f"trace {path}: no rows")
    try:
        ts = np.array([r["TIMESTAMP"][:26].replace(" ", "T") for r in rows], dtype="datetime64[us]")
        prompt = np.array([int(r["ContextTokens"]) for r in rows], dtype=np.int32)
        output = np.array([int(r["GeneratedTokens"]) for r in rows], dtype=np.int32)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"trace {path}: bad row ({e}); want TIMESTAMP, ContextTokens, GeneratedTokens") from None
    t = (ts - ts.min()).astype(np.float64) / 1e6
    order = np.argsort(t, kind="stable")
    t = t[order] * (SPAN_S / max(t.max() * (1 + 1 / len(t)), 1e-9))
    return Requests(path.name.split(".")[0], t, prompt[order], np.maximum(output[order], 1))


def azure_bases(directory: str | Path = AZURE_DIR) -> list[Requests]:
    """The conversation and code traces, in that order."""
    d = Path(directory)
    return [load_azure(_find(d, "AzureLLMInferenceTrace_conv")), load_azure(_find(d, "AzureLLMInferenceTrace_code"))]


def _find(d: Path, stem: str) -> Path:
    for suffix in (".csv.gz", ".csv"):
        if (d / (stem + suffix)).exists():
            return d / (stem + suffix)
    raise ValueError(f"trace {stem}.csv(.gz) not found in {d}")


def powerlaw(n: int, alpha: float) -> np.ndarray:
    """Shares (i+1)^-alpha, normalised to sum 1."""
    w = (np.arange(n) + 1.0) ** -alpha
    return w / w.sum()


def servegen_envelopes(n: int, seed: int, path: str | Path = SERVEGEN_CLIENTS, min_mean: float = 20.0) -> np.ndarray:
    """n client count series (600-s windows, 14 days) scaled to mean 1, picked at random among clients with at
    least `min_mean` requests per window and no empty day (a function that vanishes for days is not a test of
    prewarming). Returns shape (n, windows)."""
    path = Path(path)
    try:
        rows = list(csv.reader(_open_text(path)))
        data = np.array(rows[1:], dtype=np.float64)
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"trace {path}: cannot read client counts: {e}") from None
    counts = data[:, 1:]
    days = counts.reshape(-1, 144, counts.shape[1]).sum(axis=1)
    ok = np.flatnonzero((counts.mean(axis=0) >= min_mean) & (days.min(axis=0) > 0))
    if len(ok) < n:
        raise ValueError(f"trace {path}: only {len(ok)} clients qualify, need {n}")
    pick = np.random.default_rng(seed).choice(ok, size=n, replace=False)
    env = counts[:, pick].T
    return env / env.mean(axis=1, keepdims=True)


@dataclass(frozen=True)
class Traffic:
    """One function's arrival process over absolute time (0 = start of its history)."""

    base: int  # index into the base traces
    rate_rps: np.ndarray  # mean rate per envelope window
    env_window_s: int
    offsets: np.ndarray  # one circular offset per overlaid copy (s)


def make_traffic(
    bases: list[Requests],
    fn_base: list[int],
    mean_rps: np.ndarray,
    envelopes: np.ndarray,
    env_window_s: int,
    seed: int,
) -> list[Traffic]:
    """Per function: rate = mean_rps[i] * envelopes[i] (envelopes have mean ~1); offsets drawn from `seed`."""
    if env_window_s <= 0 or SPAN_S % env_window_s and env_window_s % SPAN_S:
        raise ValueError(f"env_window_s must divide or be a multiple of {SPAN_S:.0f} s, got {env_window_s}")
    rng = np.random.default_rng(seed)
    out = []
    for i, b in enumerate(fn_base):
        rate = mean_rps[i] * envelopes[i]
        k = max(1, int(np.ceil(rate.max() / bases[b].rate_rps)))
        out.append(Traffic(b, rate, env_window_s, rng.uniform(0, SPAN_S, size=k)))
    return out


@dataclass(frozen=True)
class Workload:
    t: np.ndarray  # arrival time (s, absolute), sorted
    fn: np.ndarray  # function index
    prompt: np.ndarray
    output: np.ndarray
    functions: tuple[str, ...]
    start_s: float
    duration_s: float

    def __len__(self) -> int:
        return len(self.t)


def _keep_prob(tr: Traffic, bases: list[Requests], t: np.ndarray) -> np.ndarray:
    w = np.minimum((t // tr.env_window_s).astype(np.int64), len(tr.rate_rps) - 1)
    return tr.rate_rps[w] / (len(tr.offsets) * bases[tr.base].rate_rps)


def arrivals(
    bases: list[Requests],
    traffic: list[Traffic],
    names: tuple[str, ...],
    start_s: float,
    duration_s: float,
    seed: int,
    prompt_cap: int = 1024,
) -> Workload:
    """All requests arriving in [start_s, start_s + duration_s), merged and sorted by time."""
    rng = np.random.default_rng(seed)
    end = start_s + duration_s
    parts = []
    for i, tr in enumerate(traffic):
        base = bases[tr.base]
        for off in tr.offsets:
            shifted = (base.t + off) % SPAN_S
            order = np.argsort(shifted, kind="stable")
            st, sp, so = shifted[order], base.prompt[order], base.output[order]
            for tile in range(int(start_s // SPAN_S), int(np.ceil(end / SPAN_S))):
                t = tile * SPAN_S + st
                lo, hi = np.searchsorted(t, [start_s, end])
                t = t[lo:hi]
                keep = rng.random(len(t)) < _keep_prob(tr, bases, t)
                parts.append((t[keep], np.full(int(keep.sum()), i, np.int16), sp[lo:hi][keep], so[lo:hi][keep]))
    if not parts:
        raise ValueError("workload: no functions given")
    t = np.concatenate([p[0] for p in parts])
    order = np.argsort(t, kind="stable")
    cat = [np.concatenate([p[j] for p in parts])[order] for j in range(1, 4)]
    return Workload(
        t[order], cat[0], np.minimum(cat[1], prompt_cap).astype(np.int32), cat[2], names, start_s, duration_s
    )


def window_counts(bases: list[Requests], traffic: list[Traffic], end_s: float, window_s: int, seed: int) -> np.ndarray:
    """Per-window arrival counts over [0, end_s) for every function, shape (functions, windows), drawn from the
    same process as `arrivals` without making the requests (binomial thinning of each copy's per-window counts).
    Used as the forecaster's history of the days before a run. window_s must divide SPAN_S and env_window_s."""
    if SPAN_S % window_s:
        raise ValueError(f"window_s must divide {SPAN_S:.0f} s, got {window_s}")
    rng = np.random.default_rng(seed)
    n_win = int(end_s // window_s)
    per_span = int(SPAN_S // window_s)
    mids = (np.arange(n_win) + 0.5) * window_s
    out = np.zeros((len(traffic), n_win), dtype=np.int64)
    for i, tr in enumerate(traffic):
        base = bases[tr.base]
        p = np.minimum(_keep_prob(tr, bases, mids), 1.0)
        for off in tr.offsets:
            hist = np.bincount((((base.t + off) % SPAN_S) // window_s).astype(np.int64), minlength=per_span)
            n = hist[np.arange(n_win) % per_span]
            out[i] += rng.binomial(n, p)
    return out
