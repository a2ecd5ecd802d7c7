"""bench/replay.py's inputs: checkpoints, functions, their arrivals and history, and the simulator's prediction.

Arrivals come from the simulator's generator (sim/traces.py: Azure LLM 2023 timing and sizes, popularity
(i+1)^-alpha over a seeded order, each function's rate shaped by a real ServeGen client's day), generated in real
time and then compressed by `scale`: a run of `duration` live seconds is `duration * scale` seconds of the trace,
and the forecaster's history is the same generator's earlier windows. Every time constant of the system is
divided by `scale` too (forecast window, lead, history buckets, keep-alives; see `scaled_settings`); model
movement is not: loads take what they take.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from modelinfo import config_from_dict
from protocol.settings import DEFAULTS, Settings
from sim import traces
from sim.cluster import SimFunction
from sim.engine_model import Profile
from sim.models import ModelShape, shape
from sim.paper_setup import HISTORY_DAYS, START_HOUR
from sim.scenario import Scenario, assemble, make_functions, recent_peak_rps

DAY = 86_400
# Layer shapes of Llama 3.2 1B, Llama 3.2 3B and Llama 3.1 8B; the vocabulary is tinymodel's trained tokenizer's
# (384 tokens), so a checkpoint is its layers' size: 1.9, 5.6 and 14.0 GB in bfloat16.
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
    "tiny": {},  # tinymodel's defaults: the CPU dry run
}  # fmt: skip
VOCAB = 384  # warmserve.tinymodel.train_tokenizer's vocabulary


@dataclass(frozen=True)
class Setup:
    """What one replay serves and how hard: fixed for every policy and rate of a run."""

    sizes: list[str]  # per function: a key of SHAPES
    dtype: str
    max_model_len: int
    prompt_cap: int
    output_cap: int
    scale: float  # live seconds are `scale` trace seconds
    duration_s: float  # live seconds of arrivals per run
    alpha: float
    seed: int
    host_cache_bytes: int  # the worker's pinned host cache (--host-cache-bytes), told to the simulator

    @property
    def names(self) -> list[str]:
        return [f"{size}-{i}" for i, size in enumerate(self.sizes)]


def config(size: str, dtype: str, max_model_len: int) -> dict:
    """The config.json of a checkpoint of `size` (as warmserve.tinymodel.llama_config writes it; bos 1, eos 2)."""
    from warmserve.tinymodel import llama_config  # torch: only where checkpoints are written

    return llama_config(VOCAB, 1, 2, torch_dtype=dtype, max_position_embeddings=max_model_len, **SHAPES[size])


def model_shape(size: str, dtype: str, max_model_len: int) -> ModelShape:
    return shape(size, config_from_dict(config(size, dtype, max_model_len)), tp=1, dtype=dtype)


def function_mix(gpu_bytes: int, dtype: str, max_model_len: int) -> list[str]:
    """16 functions (5 x 1B, 5 x 3B, 6 x 8B), plus 8B ones until their weights are 1.5x the GPU's memory: most
    cannot be resident at once, so where each is matters."""
    sizes = ["1b"] * 5 + ["3b"] * 5 + ["8b"] * 6
    weights = {s: model_shape(s, dtype, max_model_len).weight_bytes for s in ("1b", "3b", "8b")}
    while sum(weights[s] for s in sizes) < 1.5 * gpu_bytes:
        sizes.append("8b")
    return sizes


def build_checkpoints(models_dir: Path, sizes: set[str], dtype: str, max_model_len: int, device: str) -> dict:
    """One checkpoint per size on disk (functions of a size share it; each is its own model in GPU memory).
    Existing ones are kept: writing 14 GB of random weights is the slow part of a GPU run."""
    from warmserve.tinymodel import build_tiny_llama

    out = {}
    for size in sorted(sizes):
        path = models_dir / f"replay-{size}-{dtype}-{max_model_len}"
        cfg = config(size, dtype, max_model_len)
        over = {k: v for k, v in cfg.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")}
        out[size] = build_tiny_llama(path, seed=1, device=device, **over)
    return out


def scaled_settings(scale: float, base: Settings = DEFAULTS) -> Settings:
    """The platform's time constants compressed by `scale` (what every process of the stack runs with)."""
    return replace(
        base,
        window_s=round(base.window_s / scale),
        lead_s=base.lead_s / scale,
        history_bucket_s=max(1, round(base.history_bucket_s / scale)),
        warmer_interval_s=max(0.25, base.warmer_interval_s / scale),  # planning costs CPU time: not below 0.25 s
        time_scale=scale,
    )


def env_of(settings: Settings) -> dict[str, str]:
    """`settings`' scaled fields as the WARMSERVE_* variables every process of the stack reads."""
    names = ("window_s", "lead_s", "history_bucket_s", "warmer_interval_s", "time_scale")
    return {f"WARMSERVE_{n.upper()}": str(getattr(settings, n)) for n in names}


def scenario(setup: Setup, rate_rps: float, profile: Profile, settings: Settings) -> Scenario:
    """Arrivals at `rate_rps` live requests/s and the history before them, compressed to live time, with the
    simulator's functions for them (one worker of one GPU)."""
    n, k = len(setup.sizes), setup.scale
    shapes = [model_shape(s, setup.dtype, setup.max_model_len) for s in setup.sizes]
    bases = traces.azure_bases()
    rng = np.random.default_rng(setup.seed)
    share = traces.powerlaw(n, setup.alpha)[rng.permutation(n)]
    start = HISTORY_DAYS * DAY + START_HOUR * 3600
    duration = setup.duration_s * k
    env = traces.servegen_envelopes(n, setup.seed)
    mean = env[:, int(start // 600) : int(np.ceil((start + duration) / 600))].mean(axis=1, keepdims=True)
    env = env / np.where(mean > 0, mean, 1.0)  # mean 1 over the run, as sim/paper_setup.py does
    tr = traces.make_traffic(bases, [i % 2 for i in range(n)], rate_rps / k * share, env, 600, setup.seed)

    def capped(wl: traces.Workload) -> traces.Workload:
        return replace(
            wl, prompt=np.clip(wl.prompt, 1, setup.prompt_cap), output=np.clip(wl.output, 1, setup.output_cap)
        )

    sc = assemble(profile, shapes, setup.names, bases, tr, start, duration, setup.seed, 1, 1, DEFAULTS, capped)
    w = sc.workload
    live = replace(w, t=w.t / k, start_s=w.start_s / k, duration_s=w.duration_s / k)
    # sized as assemble does, for the live clock: rates k times the trace's, keep-alive k times shorter
    peak = recent_peak_rps(sc.history, DEFAULTS.window_s) * k
    fns = make_functions(profile, shapes, setup.names, live, keep_alive_s=60.0 / k, peak_rps=peak)
    pairs = enumerate(zip(fns, shapes, strict=True))
    fns = [live_pool(f, m, live, i, setup.max_model_len, profile) for i, (f, m) in pairs]
    return replace(sc, workload=live, functions=fns, settings=settings, warmup_s=sc.warmup_s / k)


def live_pool(f: SimFunction, m: ModelShape, wl: traces.Workload, i: int, max_model_len: int, profile: Profile
              ) -> SimFunction:  # fmt: skip
    """`f` with the KV the live worker reserves for every HOT model, whatever the policy: `kv_seqs` sequences at
    `max_model_len` (worker/models.py), and the batch and capacity that pool gives the function's requests. The
    simulator's own sizing (from request statistics) is not what the replay's worker does, so it would not
    predict it."""
    per_tok = m.kv_bytes_per_token / m.tp
    pool = per_tok * max_model_len * DEFAULTS.kv_seqs
    mine = wl.fn == i
    prompt = float(np.mean(wl.prompt[mine])) if mine.any() else float(profile.slo_prefill_tokens)
    output = float(np.mean(wl.output[mine])) if mine.any() else 1.0
    batch = int(min(DEFAULTS.engine_max_num_seqs, max(1, pool // ((prompt + output) * per_tok))))
    cap = f.engine.capacity_rps(prompt, output, batch)
    return replace(f, kv_full_bytes=pool, kv_pool_bytes=pool, capacity_rps=cap, pool_capacity_rps=cap,
                   target_concurrency=max(1, int(batch * profile.capacity_headroom)))  # fmt: skip
