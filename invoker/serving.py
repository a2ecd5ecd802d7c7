"""What one worker serves: each function's model, in its state, behind one streaming-engine interface.

The builtin engine lives in the worker's memory pool (`gpu_runtime.memory.ModelHost`), which owns the
COLD/HOST/WARM/HOT ladder. The transformers reference engine has no pool: it is either COLD or HOT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from functions.spec import FunctionSpec
from gpu_runtime.memory import ModelHost
from gpu_runtime.reference_engine import ReferenceEngine
from invoker.states import COLD, HOT

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_SEQS = 8  # KV reserved per HOT model: this many sequences at max_model_len


def kv_bytes_for(spec: FunctionSpec) -> int:
    """KV cache a HOT instance reserves: K and V for every layer, KV_SEQS full-length sequences."""
    cfg = json.loads((Path(spec.model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[spec.dtype]
    return per_token * spec.max_model_len * KV_SEQS


class ServingModels:
    def __init__(self, device: str, **memory: Any) -> None:
        self.device = device
        self.host = ModelHost(device=device, **memory)
        self.reference: dict[str, ReferenceEngine] = {}
        self.builtin: set[str] = set()

    def apply(self, action: str, spec: FunctionSpec) -> str:
        """Run one control action on `spec`'s model; returns its new state."""
        if spec.engine == "transformers":
            if action == "evict":
                self.reference.pop(spec.name, None)
                return COLD
            if spec.name not in self.reference:  # any upward step loads it whole
                self.reference[spec.name] = ReferenceEngine(spec.model, self.device, spec.dtype)
            return HOT
        if spec.name not in self.builtin:
            self.host.register(
                spec.name,
                spec.model,
                spec.dtype,
                kv_bytes_for(spec),
                engine_kwargs={"max_model_len": spec.max_model_len},
            )
            self.builtin.add(spec.name)
        if action == "evict":
            self.host.evict(spec.name, to="HOST")
        else:
            getattr(self.host, action)(spec.name)
        return str(self.host.state(spec.name).name)

    def engine(self, spec: FunctionSpec):
        """The function's running engine, activating it first if needed."""
        if self.states().get(spec.name) != HOT:
            self.apply("activate", spec)
        return self.hot_engine(spec.name)

    def hot_engine(self, name: str):
        if name in self.reference:
            return self.reference[name]
        if name in self.builtin and self.host.state(name).name == HOT:
            return self.host.engine(name)
        return None

    def states(self) -> dict[str, str]:
        out = {name: str(state.name) for name, state in self.host.states().items()}
        out.update({name: HOT for name in self.reference})
        return out

    def drop(self, name: str) -> None:
        self.reference.pop(name, None)
        if name in self.builtin:
            self.host.evict(name, to="COLD")

    def memory(self) -> dict[str, int]:
        rep = self.host.report()
        return {
            "total_bytes": int(rep.get("total_bytes", 0)),
            "free_bytes": int(rep.get("free_bytes", 0)),
            "lendable_kv_bytes": int(rep.get("lendable_kv_bytes", 0)),
        }
