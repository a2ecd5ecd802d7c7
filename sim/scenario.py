"""A scenario = cluster + functions + workload (+ forecaster history); runs one policy on it.

Shared by the CLI, the paper's experiment and the tests, so every policy gets exactly the same inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol.settings import DEFAULTS, Settings
from sim import policies, sizing, traces
from sim.cluster import Sim, SimFunction
from sim.engine_model import EngineModel, Profile
from sim.models import MODELS, ModelShape
from sim.report import summarize
from sim.traces import Workload

# A workload transformation applied before functions are sized (e.g. long-context request sizes)
Resize = Callable[[Workload], Workload]

log = logging.getLogger("sim")

POLICIES = ("warmserve", "ondemand", "ondemand-tuned", "serverlessllm", "ollama", "static", "always-warm")
# warmserve with one technique taken away (or, for the oracle, made perfect): sim/ablation.py
ABLATIONS = ("warmserve-reactive", "warmserve-oracle", "warmserve-firstfit", "warmserve-nolend")


@dataclass
class Scenario:
    profile: Profile
    functions: list[SimFunction]
    workload: Workload
    n_nodes: int
    gpus_per_node: int
    history: np.ndarray  # (functions, settings.window_s windows) counts before workload.start_s, for forecasters
    warmup_s: float = 120.0  # requests arriving earlier are served but not measured
    settings: Settings = DEFAULTS  # the warmer's tunables: the warmserve policy plans as the live warmer does

    @property
    def mean_rps(self) -> np.ndarray:
        """The true mean rate of each function over the run (oracle input of static / always-warm)."""
        return np.bincount(self.workload.fn, minlength=len(self.functions)) / self.workload.duration_s


def assemble(
    profile: Profile,
    models: list[str | ModelShape],
    names: list[str],
    bases: list[traces.Requests],
    traffic: list[traces.Traffic],
    start_s: float,
    duration_s: float,
    seed: int,
    n_nodes: int,
    gpus_per_node: int,
    settings: Settings = DEFAULTS,
    resize: Resize | None = None,
) -> Scenario:
    """Arrivals of `traffic` over the run, the forecaster's history before it, and functions sized from both."""
    wl = traces.arrivals(bases, traffic, tuple(names), start_s, duration_s, seed + 1)
    if resize is not None:
        wl = resize(wl)
    hist = traces.window_counts(bases, traffic, start_s, settings.window_s, seed + 2)
    peak = recent_peak_rps(hist, settings.window_s)
    fns = make_functions(profile, models, names, wl, keep_alive_s=60.0, peak_rps=peak)
    warmup = min(120.0, duration_s / 10)  # short runs still measure most of their requests
    return Scenario(profile, fns, wl, n_nodes, gpus_per_node, hist, warmup_s=warmup, settings=settings)


def make_functions(
    profile: Profile,
    models: list[str | ModelShape],
    names: list[str],
    workload: Workload,
    keep_alive_s: float,
    peak_rps: np.ndarray | None = None,
) -> list[SimFunction]:
    """Functions sized from their own requests in `workload` and their recent peak rates (sim/sizing.py): batch,
    KV pool and capacity. A model is a name in sim.models.MODELS or a shape (bench/replay.py's checkpoints)."""
    out = []
    for i, (name, model) in enumerate(zip(names, models, strict=True)):
        if not isinstance(model, ModelShape) and model not in MODELS:
            raise ValueError(f"unknown model {model!r} (have {', '.join(MODELS)})")
        shape = model if isinstance(model, ModelShape) else MODELS[model]
        eng = EngineModel(profile, shape)
        mine = workload.fn == i
        peak = None if peak_rps is None else float(peak_rps[i])
        # An engine that owns its memory (the baselines) batches as far as it fits; warmserve's pool is sized
        # for the function's own traffic.
        full = sizing.size(eng, profile.usable_bytes, workload.prompt[mine], workload.output[mine])
        pool = sizing.size(eng, profile.usable_bytes, workload.prompt[mine], workload.output[mine], peak)
        out.append(
            SimFunction(
                name=name,
                model=shape.name,
                engine=eng,
                slo_ttft_s=eng.slo_ttft_s(),
                capacity_rps=full.capacity_rps,
                keep_alive_s=keep_alive_s,
                target_concurrency=max(1, int(full.batch * profile.capacity_headroom)),
                kv_full_bytes=full.pool_bytes,
                kv_pool_bytes=pool.pool_bytes,
                pool_capacity_rps=pool.capacity_rps,
            )
        )
    return out


def make_policy(name: str, sc: Scenario) -> policies.Policy:
    return named_policy(name, sc.settings, sc.mean_rps, sc.history)


def named_policy(name: str, settings: Settings, mean_rps: np.ndarray, history: np.ndarray) -> policies.Policy:
    """A policy by name, as the simulator and the live warmer (`warmserve warmer --policy`) both build it. Its
    keep-alives are divided by `settings.time_scale` (bench/replay.py compresses time; 1 otherwise)."""
    k = settings.time_scale
    if name.startswith("warmserve"):
        variant = name.removeprefix("warmserve").removeprefix("-")
        if variant and f"warmserve-{variant}" not in ABLATIONS:
            raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES + ABLATIONS)}")
        # its measured rate spans 30 s of real time, at least a second of a compressed clock
        rate_window_s = max(1.0, 30.0 / k)
        return policies.WarmServe(history, settings, policies.Ablation.named(variant), rate_window_s)
    if name == "ondemand":
        return policies.OnDemand(keep_alive_s=60.0 / k)
    if name == "ondemand-tuned":
        return policies.OnDemand(keep_alive_s=policies.TUNED_KEEP_ALIVE_S / k, name="ondemand-tuned")
    if name == "serverlessllm":
        return policies.serverlessllm()
    if name == "ollama":
        return policies.Ollama(keep_alive_s=300.0 / k)
    if name == "static":
        return policies.Static(mean_rps)
    if name == "always-warm":
        return policies.AlwaysWarm(mean_rps)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES + ABLATIONS)}")


def recent_peak_rps(history: np.ndarray, window_s: int, days: float = 1.0) -> np.ndarray:
    """Per function, the highest window rate over the last `days` of history: what a pool is sized for (the
    live gateway records the same counts)."""
    recent = history[:, -max(1, int(days * 86_400 // window_s)) :]
    return recent.max(axis=1) / window_s if recent.size else np.zeros(len(history))


def run_policy(
    sc: Scenario, name: str, sample_s: float = 10.0, max_drain_s: float = 1800.0, policy: policies.Policy | None = None
) -> tuple[Sim, dict]:
    """Simulate one policy (`policy`, or the one `name` builds); returns the finished Sim and its summary
    (sim/report.py). A request unanswered `max_drain_s` after the last arrival counts with its wait until then."""
    pol = policy or make_policy(name, sc)
    nodes = sc.n_nodes
    if name == "always-warm":  # its own GPUs: as many nodes as its dedicated replicas need
        need = policies.AlwaysWarm.gpus_needed(sc.functions, sc.mean_rps)
        nodes = max(nodes, -(-need // sc.gpus_per_node) + 1)
    order = np.argsort(-sc.mean_rps)
    sim = Sim(
        sc.profile,
        sc.functions,
        sc.workload,
        nodes,
        sc.gpus_per_node,
        pol,
        sample_s=sample_s,
        max_drain_s=max_drain_s,
        host_preload=[int(f) for f in order],  # most popular first, as many as fit in host memory
    )
    t0 = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - t0
    s = summarize(sim, name, sc.warmup_s, wall)
    log.info(
        "%s: %d req, p50 %.3fs p99 %.3fs slo %.4f, %.1fs wall (%.0f ev/s)",
        name, s["requests"], s["ttft_p50_s"], s["ttft_p99_s"], s["slo_attainment"], wall, s["events"] / max(wall, 1e-9),
    )  # fmt: skip
    return sim, s
