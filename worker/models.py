"""Each function's model on this worker, and the one table of control actions that moves it.

The builtin engine lives in the worker's memory pool (`gpu_runtime.memory.ModelHost`), which owns the
COLD/HOST/WARM/HOT ladder and lets one model move while others serve. A function's model is registered in the
pool under a key naming its serving identity (model dir, dtype, max_model_len), so redeploying a function with
another model registers a new one and sends the old one to COLD. The transformers reference engine has no pool:
it is either COLD or HOT.

Locking: `lock(fn)` serialises one function's transitions, request starts and engine steps (callers take it);
`_lock` guards this object's own dicts for a moment at a time, so reporting never waits on a load.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from functions.spec import FunctionSpec, footprint
from gpu_runtime.memory import ModelHost
from gpu_runtime.tokenizer import Tokenizer
from protocol.messages import SamplingParams
from protocol.settings import Settings
from protocol.states import ControlAction, ModelState
from worker.fairlock import FairLock

log = logging.getLogger(__name__)


class ServingEngine(Protocol):
    """What the worker needs of an engine (the builtin `Engine` and the `ReferenceEngine` both are one)."""

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...
    def abort(self, request_id: str, index: int | None = None) -> None: ...
    def has_unfinished(self) -> bool: ...
    def step(self) -> list: ...


def identity(spec: FunctionSpec) -> str:
    """What the loaded model depends on; a redeploy that changes it needs a new load."""
    return f"{spec.engine}:{spec.model}:{spec.dtype}:{spec.max_model_len}"


class PooledModels:
    """Builtin-engine models in the memory pool, one registration per serving identity."""

    def __init__(self, host: ModelHost, settings: Settings) -> None:
        self.host = host
        self.settings = settings
        self.keys: dict[str, str] = {}  # function -> its registration in the pool

    def key(self, spec: FunctionSpec) -> str:
        key = f"{spec.name}@{hashlib.sha1(identity(spec).encode()).hexdigest()[:8]}"
        old = self.keys.get(spec.name)
        if old != key:
            if old is not None:  # redeployed with another model: the old one leaves the device and host cache
                self.host.evict(old, to=ModelState.COLD)
            if key not in self.host.states():
                kv_bytes = footprint(spec, self.settings.kv_seqs).kv_bytes
                # The prefix cache's salt is the serving identity: blocks never outlive the model they came from.
                kwargs = {
                    "max_model_len": spec.max_model_len,
                    "prefix_salt": identity(spec),
                    "max_num_seqs": self.settings.engine_max_num_seqs,
                }
                self.host.register(key, spec.model, spec.dtype, kv_bytes, kwargs)
            self.keys[spec.name] = key
        return key

    def load_host(self, spec: FunctionSpec) -> None:
        self.host.load_host(self.key(spec))

    def prewarm(self, spec: FunctionSpec) -> None:
        self.host.prewarm(self.key(spec))

    def activate(self, spec: FunctionSpec) -> None:
        self.host.activate(self.key(spec))

    def deactivate(self, spec: FunctionSpec) -> None:
        self.host.deactivate(self.key(spec))

    def evict(self, spec: FunctionSpec) -> None:
        self.host.evict(self.key(spec), to=ModelState.HOST)

    def engine(self, spec: FunctionSpec) -> ServingEngine | None:
        key = self.keys.get(spec.name)
        return self.host.engine(key) if key and self.host.state(key) == ModelState.HOT else None

    def drop(self, function: str) -> None:
        key = self.keys.pop(function, None)
        if key is not None:
            self.host.evict(key, to=ModelState.COLD)

    def states(self) -> dict[str, ModelState]:
        pool = self.host.states()
        return {fn: pool[key] for fn, key in list(self.keys.items()) if key in pool}


class ReferenceModels:
    """transformers models: no pool to stage them in, so any step up loads the whole model and only evict
    unloads it (deactivate keeps it HOT)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.loaded: dict[str, Any] = {}

    def up(self, spec: FunctionSpec) -> None:
        if spec.name not in self.loaded:
            from gpu_runtime.reference_engine import ReferenceEngine  # needs transformers: import on use

            self.loaded[spec.name] = ReferenceEngine(spec.model, self.device, spec.dtype)

    load_host = prewarm = activate = up

    def deactivate(self, spec: FunctionSpec) -> None:
        return None

    def evict(self, spec: FunctionSpec) -> None:
        self.loaded.pop(spec.name, None)

    def engine(self, spec: FunctionSpec) -> ServingEngine | None:
        return self.loaded.get(spec.name)

    def drop(self, function: str) -> None:
        self.loaded.pop(function, None)

    def states(self) -> dict[str, ModelState]:
        return {fn: ModelState.HOT for fn in list(self.loaded)}


Backend = PooledModels | ReferenceModels
# Adding a control action touches the enum (protocol.states), this table and the backends' methods.
ACTIONS: dict[ControlAction, Callable[[Backend, FunctionSpec], None]] = {
    ControlAction.LOAD_HOST: lambda b, spec: b.load_host(spec),
    ControlAction.PREWARM: lambda b, spec: b.prewarm(spec),
    ControlAction.ACTIVATE: lambda b, spec: b.activate(spec),
    ControlAction.DEACTIVATE: lambda b, spec: b.deactivate(spec),
    ControlAction.EVICT: lambda b, spec: b.evict(spec),
}


class Models:
    def __init__(self, device: str, settings: Settings, host: ModelHost | None = None, **memory: Any) -> None:
        self.pooled = PooledModels(host or ModelHost(device=device, **memory), settings)
        self.reference = ReferenceModels(device)
        self._lock = threading.Lock()
        self._fn_locks: dict[str, FairLock] = {}  # fair: see worker/fairlock.py
        self._moving: set[str] = set()  # functions a transition is moving right now (reported LOADING)
        self._engines: dict[str, ServingEngine] = {}  # function -> HOT engine: the hot path never asks the pool
        self._tokenizers: dict[str, Tokenizer] = {}  # by serving identity, so a redeploy loads the new one

    def lock(self, function: str) -> FairLock:
        with self._lock:
            return self._fn_locks.setdefault(function, FairLock())

    def backend(self, spec: FunctionSpec) -> Backend:
        return self.reference if spec.engine == "transformers" else self.pooled

    def apply(self, action: ControlAction, spec: FunctionSpec) -> ModelState:
        """Run one control action on `spec`'s model (the caller holds `lock(spec.name)`); every action is
        idempotent. Returns the model's new state; reports it LOADING meanwhile."""
        backend = self.backend(spec)
        t0 = time.perf_counter()
        with self._lock:
            self._moving.add(spec.name)
        try:
            ACTIONS[action](backend, spec)
        finally:
            engine = backend.engine(spec)
            with self._lock:
                self._moving.discard(spec.name)
                if engine is None:
                    self._engines.pop(spec.name, None)
                else:
                    self._engines[spec.name] = engine
        state = self.state(spec.name)
        log.info("%s %s -> %s in %.1f ms", action, spec.name, state, (time.perf_counter() - t0) * 1e3)
        return state

    def engine_for_request(self, spec: FunctionSpec) -> ServingEngine:
        """The HOT engine of `spec` (caller holds its lock): a WARM model is activated on its first request."""
        engine = self.hot_engine(spec.name)
        if engine is None:
            self.apply(ControlAction.ACTIVATE, spec)
            engine = self.hot_engine(spec.name)
        assert engine is not None, f"{spec.name}: activate left no engine"
        return engine

    def moving(self, function: str) -> bool:
        """Whether a transition (load, eviction) is moving `function`'s model right now."""
        with self._lock:
            return function in self._moving

    def hot_engine(self, function: str) -> ServingEngine | None:
        with self._lock:
            return self._engines.get(function)

    def unfinished(self) -> set[str]:
        """Functions whose HOT engine holds work, including requests aborted since their last step."""
        with self._lock:
            engines = list(self._engines.items())
        return {fn for fn, engine in engines if engine.has_unfinished()}

    def hot_functions(self) -> list[str]:
        """Functions HOT in the memory pool (transformers models hold no pool memory)."""
        with self._lock:
            return [fn for fn in self._engines if fn not in self.reference.loaded]

    def tokenizer(self, spec: FunctionSpec) -> Tokenizer:
        key = identity(spec)
        with self._lock:
            tok = self._tokenizers.get(key)
        if tok is None:
            tok = Tokenizer.from_pretrained(spec.model)
            with self._lock:
                self._tokenizers[key] = tok
        return tok

    def drop(self, function: str) -> None:
        """Forget a removed (or redeployed) function's model: off the device and out of the host cache."""
        with self._lock:
            self._engines.pop(function, None)
        self.reference.drop(function)
        self.pooled.drop(function)

    def state(self, function: str) -> ModelState:
        return self.states().get(function, ModelState.COLD)

    def states(self) -> dict[str, ModelState]:
        out = {**self.pooled.states(), **self.reference.states()}
        with self._lock:
            out.update({fn: ModelState.LOADING for fn in self._moving})
        return out

    def memory(self) -> dict[str, int]:
        rep = self.pooled.host.report()
        return {k: int(rep.get(k, 0)) for k in ("total_bytes", "free_bytes", "lendable_kv_bytes")}
