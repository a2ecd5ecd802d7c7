"""A scenario = cluster + functions + workload (+ forecaster history); runs one policy on it.

Shared by the CLI, the paper's experiment and the tests, so every policy gets exactly the same inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from protocol.settings import DEFAULTS, Settings
from sim import policies
from sim.cluster import Sim, SimFunction
from sim.engine_model import EngineModel, Profile
from sim.models import MODELS
from sim.report import summarize
from sim.traces import Workload

log = logging.getLogger("sim")

POLICIES = ("warmserve", "ondemand", "lru", "static", "always-warm")


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


def make_functions(
    profile: Profile, models: list[str], names: list[str], mean_prompt: float, mean_output: float, keep_alive_s: float
) -> list[SimFunction]:
    out = []
    for name, model in zip(names, models, strict=True):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r} (have {', '.join(MODELS)})")
        eng = EngineModel(profile, MODELS[model])
        out.append(
            SimFunction(
                name=name,
                model=model,
                engine=eng,
                slo_ttft_s=eng.slo_ttft_s(),
                capacity_rps=eng.capacity_rps(mean_prompt, mean_output),
                keep_alive_s=keep_alive_s,
                target_concurrency=max(1, int(profile.capacity_batch * profile.capacity_headroom)),
            )
        )
    return out


def make_policy(name: str, sc: Scenario) -> policies.Policy:
    w = sc.workload
    # KV bytes per GPU of one instance running at its capacity batch: WarmServe's KV reservation, and the
    # static policy's KV budget per replica.
    tokens = float(w.prompt.mean()) + float(w.output.mean()) if len(w) else 1.0
    kv = [sc.profile.capacity_batch * tokens * f.engine.m.kv_bytes_per_token / f.engine.m.tp for f in sc.functions]
    if name == "warmserve":
        return policies.WarmServe(sc.history, kv, sc.settings)
    if name == "ondemand":
        return policies.OnDemand()
    if name == "lru":
        return policies.LRU()
    if name == "static":
        return policies.Static(sc.mean_rps, kv)
    if name == "always-warm":
        return policies.AlwaysWarm(sc.mean_rps)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


def run_policy(sc: Scenario, name: str, sample_s: float = 10.0) -> tuple[Sim, dict]:
    """Simulate one policy; returns the finished Sim and its summary (sim/report.py)."""
    pol = make_policy(name, sc)
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
