"""What one worker serves: each function's model, in its state, behind one streaming-engine interface.

The builtin engine lives in the worker's memory pool (`gpu_runtime.memory.ModelHost`), which owns the
COLD/HOST/WARM/HOT ladder. A function's model is registered in the pool under a key that names its serving
identity (model dir, dtype, max_model_len), so redeploying a function with another model registers a new one and
sends the old one to COLD. The transformers reference engine has no pool: it is either COLD or HOT.

HOT engines are kept in a plain dict so the worker's hot path (stepping, aborting) never waits on the pool's lock,
which a long load can hold for seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from functions.spec import FunctionSpec
from gpu_runtime.engine.engine import DTYPES
from gpu_runtime.memory import ModelHost
from gpu_runtime.reference_engine import ReferenceEngine
from invoker.states import COLD, HOT

KV_SEQS = 8  # KV reserved per HOT model: this many sequences at max_model_len


def kv_bytes_for(spec: FunctionSpec) -> int:
    """KV cache a HOT instance reserves: K and V for every layer, KV_SEQS full-length sequences."""
    cfg = json.loads((Path(spec.model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * DTYPES[spec.dtype].itemsize
    return per_token * spec.max_model_len * KV_SEQS


def identity(spec: FunctionSpec) -> str:
    """What the loaded model depends on; a redeploy that changes it needs a new load."""
    return f"{spec.engine}:{spec.model}:{spec.dtype}:{spec.max_model_len}"


class ServingModels:
    def __init__(self, device: str, **memory: Any) -> None:
        self.device = device
        self.host = ModelHost(device=device, **memory)
        self.reference: dict[str, ReferenceEngine] = {}
        self.keys: dict[str, str] = {}  # function -> its registration in the pool
        self.engines: dict[str, Any] = {}  # function -> HOT engine

    def _key(self, spec: FunctionSpec) -> str:
        key = f"{spec.name}@{hashlib.sha1(identity(spec).encode()).hexdigest()[:8]}"
        old = self.keys.get(spec.name)
        if old != key:
            if old is not None:  # redeployed with another model: the old one leaves the device and host cache
                self.host.evict(old, to="COLD")
            if key not in self.host.states():
                self.host.register(
                    key, spec.model, spec.dtype, kv_bytes_for(spec), engine_kwargs={"max_model_len": spec.max_model_len}
                )
            self.keys[spec.name] = key
        return key

    def apply(self, action: str, spec: FunctionSpec) -> str:
        """Run one control action on `spec`'s model; returns its new state. Every action is idempotent."""
        if spec.engine == "transformers":
            if action == "evict":
                self.reference.pop(spec.name, None)
            elif spec.name not in self.reference:  # no pool: any step up loads it whole, deactivate keeps it
                self.reference[spec.name] = ReferenceEngine(spec.model, self.device, spec.dtype)
            state = HOT if spec.name in self.reference else COLD
            engine = self.reference.get(spec.name)
        else:
            key = self._key(spec)
            if action == "evict":
                self.host.evict(key, to="HOST")
            else:
                getattr(self.host, action)(key)
            state = self.host.state(key).name
            engine = self.host.engine(key) if state == HOT else None
        if engine is None:
            self.engines.pop(spec.name, None)
        else:
            self.engines[spec.name] = engine
        return state

    def hot_engine(self, function: str):
        return self.engines.get(function)

    def drop(self, function: str) -> None:
        """Forget a removed (or redeployed) function's model: off the device and out of the host cache."""
        self.engines.pop(function, None)
        self.reference.pop(function, None)
        key = self.keys.pop(function, None)
        if key is not None:
            self.host.evict(key, to="COLD")

    def states(self) -> dict[str, str]:
        pool = self.host.states()
        out = {fn: pool[key].name for fn, key in self.keys.items()}
        out.update({fn: HOT for fn in self.reference})
        return out

    def memory(self) -> dict[str, int]:
        rep = self.host.report()
        return {k: int(rep.get(k, 0)) for k in ("total_bytes", "free_bytes", "lendable_kv_bytes")}
