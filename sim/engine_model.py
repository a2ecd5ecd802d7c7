"""Step times of an LLM engine from a calibration profile (sim/profiles/default.json; docs/simulator.md) and a
model shape (sim/models.py).

A roofline per step, no per-token events:
- prefill of n tokens is compute bound: 2 * params / tp * n FLOPs at `flops * prefill_mfu`, plus the step overhead;
- a decode step of batch B is memory bound: it reads the weight shard and the batch's KV cache once at
  `hbm_bytes_per_s * hbm_efficiency`, plus a fixed step overhead, a small per-sequence cost, and two all-reduces per
  layer when tp > 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sim.models import ModelShape

DEFAULT_PROFILE = Path(__file__).parent / "profiles" / "default.json"


@dataclass(frozen=True)
class Profile:
    source: str
    gpu_memory_bytes: int
    gpu_reserved_bytes: int  # CUDA context, activations, allocator slack: never holds weights or KV
    hbm_bytes_per_s: float
    hbm_efficiency: float
    flops: float
    prefill_mfu: float
    pcie_bytes_per_s: float  # host -> device per GPU, pinned memory
    disk_bytes_per_s: float  # per worker (host), shared by its loads
    host_memory_bytes: int  # per worker: pinned cache of weights
    step_overhead_s: float
    per_seq_step_s: float
    allreduce_s_per_layer: float
    max_batch: int
    prefill_token_budget: int
    capacity_batch: int
    capacity_headroom: float
    cold_engine_start_s: float  # a new engine process (baselines) after its weights arrive
    warm_bind_s: float  # a universal worker binds freshly copied weights (no process start)
    activate_s: float  # WARM -> HOT: map KV pages
    slo_prefill_multiple: float
    slo_prefill_tokens: int
    slo_floor_s: float

    @property
    def usable_bytes(self) -> int:
        return self.gpu_memory_bytes - self.gpu_reserved_bytes


def load_profile(path: str | Path = DEFAULT_PROFILE) -> Profile:
    """Read and validate a profile; a bad file raises ValueError naming the file and the field."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"profile {path}: cannot read JSON: {e}") from None

    def get(section: str, key: str, kind=float, positive=True):
        try:
            v = kind(d[section][key])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"profile {path}: field {section}.{key} missing or not a {kind.__name__}") from None
        if positive and v <= 0:
            raise ValueError(f"profile {path}: field {section}.{key} must be > 0, got {v}")
        return v

    if "models" in d:  # a second source of model sizes would drift from what workers reserve
        raise ValueError(f"profile {path}: field models is not read: model shapes come from sim/models.py")
    p = Profile(
        source=str(d.get("source", path.name)),
        gpu_memory_bytes=get("gpu", "memory_bytes", int),
        gpu_reserved_bytes=get("gpu", "reserved_bytes", int, positive=False),
        hbm_bytes_per_s=get("gpu", "hbm_bytes_per_s"),
        hbm_efficiency=get("gpu", "hbm_efficiency"),
        flops=get("gpu", "flops"),
        prefill_mfu=get("gpu", "prefill_mfu"),
        pcie_bytes_per_s=get("links", "pcie_h2d_bytes_per_s"),
        disk_bytes_per_s=get("links", "disk_bytes_per_s"),
        host_memory_bytes=get("links", "host_memory_bytes", int),
        step_overhead_s=get("engine", "step_overhead_s"),
        per_seq_step_s=get("engine", "per_seq_step_s", positive=False),
        allreduce_s_per_layer=get("engine", "allreduce_s_per_layer", positive=False),
        max_batch=get("engine", "max_batch", int),
        prefill_token_budget=get("engine", "prefill_token_budget", int),
        capacity_batch=get("engine", "capacity_batch", int),
        capacity_headroom=get("engine", "capacity_headroom"),
        cold_engine_start_s=get("startup", "cold_engine_start_s", positive=False),
        warm_bind_s=get("startup", "warm_bind_s", positive=False),
        activate_s=get("startup", "activate_s", positive=False),
        slo_prefill_multiple=get("slo", "ttft_prefill_multiple"),
        slo_prefill_tokens=get("slo", "ttft_prefill_tokens", int),
        slo_floor_s=get("slo", "ttft_floor_s", positive=False),
    )
    if p.usable_bytes <= 0:
        raise ValueError(f"profile {path}: gpu.reserved_bytes must be below gpu.memory_bytes")
    return p


class EngineModel:
    """Step times for one model shape under one profile. Called on every scheduling event: keep it cheap."""

    def __init__(self, profile: Profile, shape: ModelShape):
        self.p, self.m = profile, shape
        bw = profile.hbm_bytes_per_s * profile.hbm_efficiency
        comm = 2 * shape.layers * profile.allreduce_s_per_layer if shape.tp > 1 else 0.0
        self._decode_fixed = profile.step_overhead_s + comm + shape.shard_bytes / bw
        self._kv_s_per_token = shape.kv_bytes_per_token / shape.tp / bw
        self._prefill_fixed = profile.step_overhead_s + comm
        self._prefill_s_per_token = 2 * shape.params / shape.tp / (profile.flops * profile.prefill_mfu)

    def prefill_s(self, tokens: int) -> float:
        return self._prefill_fixed + tokens * self._prefill_s_per_token

    def decode_step_s(self, batch: int, kv_tokens: float) -> float:
        """One decode step of `batch` sequences holding `kv_tokens` tokens of KV in total."""
        return self._decode_fixed + batch * self.p.per_seq_step_s + kv_tokens * self._kv_s_per_token

    def capacity_rps(self, mean_prompt: float, mean_output: float, batch: int | None = None) -> float:
        """Requests/s one instance sustains at `batch` (default `capacity_batch`), derated by `capacity_headroom`.

        In steady state at rate r each second spends r * prefill on prefills; the rest runs decode steps of B
        sequences: r * out tokens = B * (1 - r * prefill) / step  =>  r = B / (out * step + B * prefill)."""
        b = batch or self.p.capacity_batch
        step = self.decode_step_s(b, b * (mean_prompt + mean_output / 2))
        r = b / (mean_output * step + b * self.prefill_s(int(mean_prompt)))
        return r * self.p.capacity_headroom

    def slo_ttft_s(self) -> float:
        return max(self.p.slo_floor_s, self.p.slo_prefill_multiple * self.prefill_s(self.p.slo_prefill_tokens))
