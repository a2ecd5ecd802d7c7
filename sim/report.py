"""Summaries, plots and the markdown report of simulator runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.states import ARRIVAL_ORDER

STATE_NAMES = tuple(s.value for s in ARRIVAL_ORDER)


def measured(sim, warmup_s: float) -> np.ndarray:
    """Indices of requests that count: arrived after the warm-up, and not refused as unfittable (the client's
    error, answered 400 at once by every policy alike)."""
    return np.flatnonzero((sim.w.t >= sim.w.start_s + warmup_s) & ~sim.refused)


def ttfts(sim, idx: np.ndarray) -> np.ndarray:
    """TTFT per request; a request that never got a token counts with its wait until the end of the simulation."""
    ft = sim.first_token[idx]
    return np.where(np.isnan(ft), sim.now, ft) - sim.w.t[idx]


def summarize(sim, policy: str, warmup_s: float, wall_s: float) -> dict:
    idx = measured(sim, warmup_s)
    tt = ttfts(sim, idx)
    slo = np.array([f.slo_ttft_s for f in sim.fns])[sim.w.fn[idx].astype(np.int64)]
    done = ~np.isnan(sim.finish[idx])
    span = sim.w.duration_s - warmup_s
    return {
        "policy": policy,
        "requests": int(len(idx)),
        "ttft_p50_s": float(np.percentile(tt, 50)) if len(tt) else 0.0,
        "ttft_p99_s": float(np.percentile(tt, 99)) if len(tt) else 0.0,
        "slo_attainment": float(np.mean((tt <= slo) & ~np.isnan(sim.first_token[idx]))) if len(tt) else 1.0,
        "throughput_rps": float(done.sum() / span) if span > 0 else 0.0,
        "gpu_seconds": float(sim.gpu_seconds),
        "hot_or_warm_fraction": float(np.mean(sim.arrival_state[idx] <= 1)) if len(idx) else 1.0,
        "states": dict(zip(STATE_NAMES, np.bincount(sim.arrival_state[idx], minlength=5).tolist(), strict=True)),
        "unfinished": int((~done).sum()),
        "ttft_mean_s": float(tt.mean()) if len(tt) else 0.0,
        "gpus": sim.n_gpus,
        "max_gpu_mem_frac": round(sim.max_mem_frac, 4),
        "events": sim.events,
        "wall_s": round(wall_s, 2),
        "counters": dict(sim.counters) | dict(getattr(sim.policy, "counters", {})),
    }


def plot_ttft_cdf(runs: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    q = np.concatenate([np.linspace(0, 0.99, 500), np.linspace(0.99, 1.0, 500)])  # resolve the tail
    for name, tt in runs.items():
        if len(tt):
            ax.plot(np.maximum(np.quantile(tt, q), 1e-3), q, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("CDF")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(timelines: dict[str, list[tuple]], path: Path, title: str) -> None:
    """GPU memory (weights, KV) and instance states over time, one row per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timelines), 2, figsize=(10, 2.2 * len(timelines)), squeeze=False)
    for row, (name, tl) in enumerate(timelines.items()):
        a = np.array(tl, dtype=float)
        if not len(a):
            continue
        t = (a[:, 0] - a[0, 0]) / 60
        axes[row, 0].stackplot(t, a[:, 1], a[:, 2], labels=["weights", "KV"])
        axes[row, 0].set_ylabel(f"{name}\nGB")
        for j, lab in zip((3, 4, 5), ("LOADING", "WARM", "HOT"), strict=True):
            axes[row, 1].plot(t, a[:, j], label=lab)
        axes[row, 1].set_ylabel("instances")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[0, 1].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("minutes")
    axes[-1, 1].set_xlabel("minutes")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    keys = ["policy", "requests", "ttft_p50_s", "ttft_p99_s", "slo_attainment", "throughput_rps", "gpu_seconds", "gpus"]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
