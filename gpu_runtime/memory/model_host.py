"""ModelHost: the universal worker's memory. Many models, each COLD / HOST / WARM / HOT, on one device.

- COLD -> HOST: the loader reads the safetensors into the host cache (pinned, LRU).
- HOST -> WARM: weight chunks are mapped into the model's fixed virtual range and filled from the host image;
  the engine is built over that range once and kept (its tensors and captured graphs point at addresses that
  never change). From COLD, reading and copying overlap.
- WARM -> HOT: KV chunks are mapped into the model's fixed KV range and attached to the engine. No weight moves.
- Down again: HOT -> WARM unmaps the KV; WARM -> HOST unmaps the weights (copying them to the host cache first
  if the cache had dropped them); HOST -> COLD drops the host image.

Weights may sit on chunks lent by HOT models' idle KV pages (``kv_reservation``); when a lender needs its pages
back, the engine's pressure hook evicts borrowers to HOST. Activating a borrower first moves its weights onto
its own chunks, so HOT models never hold loans and a promise can always be kept.

Locking: one model's load never stalls another model.
- The pool lock (``_lock``) guards bookkeeping only: the pool's chunks, ranges and loans, the host cache's
  entries, every model's state, account and engine hook. It is held for mapping, unmapping and attaching KV,
  never across file reads, host<->device copies, pinning new host memory or building an engine.
- Each model's ``lock`` serialises that model's transitions; the long parts run under it alone. A transition
  holds it from start to end, so "locked" means "moving".
- Order: a model's lock, then the pool lock. Holding the pool lock, other models' locks are only tried, never
  waited for. A thread waits for at most one model's lock while holding none (``check`` and ``close``: all,
  in name order, before the pool lock), so no cycle forms.

Races, and what settles each:
- Victims. Activation (``_claim_victims``) and the pressure hook pick models to evict by trying their locks
  under the pool lock, so a model mid-transition is never evicted under its feet; a victim stays locked until
  evicted. Activation skips moving models (PoolExhausted if the rest cannot make room). The hook evicts idle
  borrowers first; if only moving ones hold the pages it needs, it tells a load onto them to stop (LoadYielded:
  the borrower rolls back within one piece's read) and waits for that move to end, then evicts what still
  borrows. It does not return fewer blocks instead: an engine with nothing running finishes a request it cannot
  fit as hopeless, which would break the lender's promise.
- Host images. A copy's image is held in the host cache (HOST->WARM reads it; loads and WARM->HOST write it),
  so another model's allocation never drops it; if only held images could make room, HostCacheFull.
- Readers. A moving model keeps its old state until the move's last bookkeeping step (``engine`` answers once
  it is HOT); ``state``, ``states``, ``report`` and ``engine`` take the pool lock only. Mid-move, ``report`` may already
  count the chunks being filled; ``check`` waits for moves in flight to finish.
- HOST -> COLD happens without the model's lock when the host cache drops an idle image, so HOST-or-COLD is
  decided under the pool lock.
- Room for KV. Chunks freed by evicting victims may go to another thread first: activation takes chunks in the
  same pool-lock step that finds them free, otherwise picks more victims or raises PoolExhausted. Only under
  such contention can it fail after evicting; the victims are then consistently HOST.
- Lenders. A lender that deactivates while a borrower is mid-load gives it the chunks (as when idle); the
  borrower's commit or rollback reads ``lender`` under the pool lock. The pressure hook runs on the lender's
  step thread and does not take the lender's lock; it rereads the account under the pool lock at each step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from gpu_runtime.engine.engine import DTYPES
from gpu_runtime.memory import kv_reservation as kvr
from gpu_runtime.memory import loader
from gpu_runtime.memory.host_cache import HostCache, HostCacheFull
from gpu_runtime.memory.pool import ModelMemoryError, Pool, PoolExhausted, VRange
from gpu_runtime.weights import WeightLayout, plan_weights
from modelinfo.config import ModelFileError
from protocol.states import ModelState

log = logging.getLogger("warmserve.memory")

GiB = 1 << 30
MiB = 1 << 20


class ModelTooLarge(ModelMemoryError):
    """A model cannot fit the device (weights + KV) at all."""


class ModelLoadError(ModelMemoryError):
    """A model's files could not be read; the message names the model and the file."""


class LoadYielded(ModelMemoryError):
    """A load onto lent KV pages stopped because their HOT lender needed them back (its requests come first);
    the model is back where it was, and loading it again is safe."""


@dataclass
class _Model:
    name: str
    model_dir: str
    dtype: torch.dtype
    kv_bytes: int
    layout: WeightLayout
    weights: VRange
    kv: VRange
    state: ModelState = ModelState.COLD
    engine: object | None = None
    engine_kwargs: dict = field(default_factory=dict)
    account: kvr.KvAccount | None = None
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # held while the model moves
    # set by a lender's pressure hook: a load onto its pages stops at its next piece (see _on_kv_pressure)
    yield_pages: threading.Event = field(default_factory=threading.Event, repr=False)


def _default_engine_factory(model_dir, layout, weights, device, dtype, **kwargs):
    from gpu_runtime import Engine

    return Engine.from_weights(model_dir, layout, weights, device, dtype, **kwargs)


class ModelHost:
    """The memory of one worker device. See the module docstring for the states, what each step does and the
    locking (every method is thread-safe; one model's load or eviction never blocks another model).

    ``gpu_bytes``: how much device memory the pool may take (default: free memory at start minus a headroom of
    max(4 GiB, 10%) left to torch for activations and graphs; on CPU, 4 GiB of emulated device memory).
    ``chunk_bytes``: pool granularity (default 64 MiB on CUDA: mapping costs ~0.4 ms per GiB there, against
    ~17 ms per GiB with 2 MiB chunks, see docs/benchmarks.md; 2 MiB on CPU, where models are tiny).
    ``engine_factory(model_dir, layout, weights_buffer, device, dtype, **engine_kwargs)`` builds an engine over
    a weight buffer without copying it (default ``Engine.from_weights``).
    """

    def __init__(
        self,
        device: str = "cpu",
        gpu_bytes: int | None = None,
        host_cache_bytes: int = 32 * GiB,
        chunk_bytes: int | None = None,
        engine_factory: Callable | None = None,
        engine_kwargs: dict | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            from gpu_runtime.memory.cuda_vmm import CudaVmmBackend

            backend = CudaVmmBackend(self.device, chunk_bytes or 64 * MiB)
            self.device = backend.device
            if gpu_bytes is None:
                free, total = torch.cuda.mem_get_info(self.device)
                gpu_bytes = free - max(4 * GiB, total // 10)
        elif self.device.type == "cpu":
            from gpu_runtime.memory.host_backend import HostBackend

            backend = HostBackend(chunk_bytes or 2 * MiB)
            gpu_bytes = 4 * GiB if gpu_bytes is None else gpu_bytes
        else:
            raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda[:N]'")
        self.pool = Pool(backend, max(0, gpu_bytes) // backend.chunk_bytes)
        self.host_cache = HostCache(host_cache_bytes, backend.chunk_bytes, pinned=self.device.type == "cuda")
        self.engine_factory = engine_factory or _default_engine_factory
        self.engine_kwargs = engine_kwargs or {}
        self.models: dict[str, _Model] = {}
        self._lock = threading.Lock()  # the pool lock: bookkeeping only, see the module docstring

    # registration -------------------------------------------------------------------------------------------
    def register(self, name: str, model_dir: str, dtype: str, kv_bytes: int, engine_kwargs: dict | None = None) -> None:
        """Make a model known, COLD. Reads config and safetensors headers; ModelLoadError if they are broken,
        ModelTooLarge if weights plus KV exceed the pool. ``engine_kwargs`` (e.g. ``max_model_len``) add to
        the host's own for this model's engine."""
        if dtype not in DTYPES:
            raise ValueError(f"model {name!r}: dtype {dtype!r} not one of {sorted(DTYPES)}")
        if kv_bytes <= 0:
            raise ValueError(f"model {name!r}: kv_bytes must be > 0, got {kv_bytes}")
        try:
            layout = plan_weights(model_dir, DTYPES[dtype])  # file reads: outside the pool lock
        except ModelFileError as e:
            raise ModelLoadError(f"model {name!r}: {e}") from e
        need = self.pool.n_chunks(layout.total_bytes) + self.pool.n_chunks(kv_bytes)
        if need > self.pool.capacity:
            raise ModelTooLarge(
                f"model {name!r}: weights {layout.total_bytes / GiB:.2f} GiB + KV {kv_bytes / GiB:.2f} GiB "
                f"exceed the pool's {self.pool.capacity * self.pool.chunk_bytes / GiB:.2f} GiB"
            )
        with self._lock:
            if name in self.models:
                raise ValueError(f"model {name!r} is already registered")
            weights = self.pool.reserve(name, "weights", layout.total_bytes)
            kv = self.pool.reserve(name, "kv", kv_bytes)
            kwargs = {**self.engine_kwargs, **(engine_kwargs or {})}
            self.models[name] = _Model(
                name, layout.model_dir, DTYPES[dtype], kv_bytes, layout, weights, kv, engine_kwargs=kwargs
            )
        log.info("%s: registered (%.2f GiB weights, %.2f GiB KV)", name, layout.total_bytes / GiB, kv_bytes / GiB)

    # queries: the pool lock only, so they answer while other models move ------------------------------------
    def state(self, name: str) -> ModelState:
        with self._lock:
            return self._get(name).state

    def states(self) -> dict[str, ModelState]:
        with self._lock:
            return {n: m.state for n, m in self.models.items()}

    def engine(self, name: str):
        with self._lock:
            m = self._get(name)
            if m.state != ModelState.HOT:
                raise ModelMemoryError(f"model {name!r} is {m.state}, not HOT: no engine to serve with")
            return m.engine

    # transitions up -----------------------------------------------------------------------------------------
    def load_host(self, name: str) -> None:
        """COLD -> HOST. No-op if the model is already HOST or above."""
        m = self._get(name)
        with m.lock:
            with self._lock:
                if m.state.level >= ModelState.HOST.level:
                    return
            t0 = time.perf_counter()
            image = self._new_image(m)
            try:
                stats = loader.load(m.layout, image, None, read_files=True)
            except Exception as e:
                with self._lock:
                    self.host_cache.drop(name)
                if isinstance(e, (ModelFileError, OSError)):
                    raise ModelLoadError(f"model {name!r}: {e}") from e
                raise
            with self._lock:
                self.host_cache.unhold(name)
                self.host_cache.get(name)  # most recently used
                m.state = ModelState.HOST
            self._log_step(m, "COLD->HOST", t0, stats.nbytes)

    def prewarm(self, name: str) -> None:
        """-> WARM (from COLD through HOST, reading and copying overlapped). No-op if WARM or HOT."""
        m = self._get(name)
        with m.lock:
            m.last_used = time.monotonic()
            if m.state.level < ModelState.WARM.level:  # WARM and HOT change only under m.lock
                self._to_warm(m)

    def activate(self, name: str):
        """-> HOT; returns the engine. Copies no weights when the model is WARM. May evict least recently used
        WARM models to HOST to make room for the KV cache; raises PoolExhausted (touching nothing, unless
        another thread took the room made) if even that cannot make room."""
        m = self._get(name)
        with m.lock:
            m.last_used = time.monotonic()
            if m.state == ModelState.HOT:
                return m.engine
            if m.state.level < ModelState.WARM.level:
                self._to_warm(m)
            t0 = time.perf_counter()
            eng = self._to_hot(m)
            self._log_step(m, "WARM->HOT", t0, detail=f"mapped {m.kv.n_slots} KV chunks, {eng.num_kv_blocks} blocks")
            return eng

    # transitions down ---------------------------------------------------------------------------------------
    def deactivate(self, name: str) -> None:
        """HOT -> WARM: unmap the KV cache (the engine must be idle). Chunks this model had lent stay with their
        borrowers, which now own them. No-op below HOT."""
        m = self._get(name)
        with m.lock:
            self._deactivate(m)

    def evict(self, name: str, to: str | ModelState = "HOST") -> None:
        """Down to HOST (weights kept in the host cache) or COLD (host copy dropped too)."""
        target = ModelState.parse(to)
        if target not in (ModelState.HOST, ModelState.COLD):
            raise ValueError(f"evict({name!r}): target must be HOST or COLD, got {target}")
        m = self._get(name)
        with m.lock:
            self._deactivate(m)
            if m.state == ModelState.WARM:
                self._warm_to_host(m, keep_host=target == ModelState.HOST)
            if target == ModelState.COLD:
                with self._lock:
                    dropped = m.state == ModelState.HOST
                    if dropped:
                        self.host_cache.drop(name)
                        m.state = ModelState.COLD
                if dropped:
                    log.info("%s: HOST->COLD (host copy dropped)", name)

    # report -------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Device, pool totals and per-model placement, for operators and the warmer."""
        with self._lock:
            cb = self.pool.chunk_bytes
            lent = sum(c.lender is not None for c in self.pool.chunks)
            models = {}
            lendable = 0
            for n, m in self.models.items():
                own = borrowed = 0
                lenders: dict[str, int] = {}
                for i in m.weights.slots:
                    if i is None:
                        continue
                    lender = self.pool.chunks[i].lender
                    if lender:
                        borrowed += 1
                        lenders[lender] = lenders.get(lender, 0) + 1
                    else:
                        own += 1
                kv_blocks = m.account.limit() if m.account else 0
                if m.account is not None:
                    lendable += self._idle_slots(m) * cb
                models[n] = {
                    "state": m.state.value,
                    "weight_bytes": m.layout.total_bytes,
                    "weight_chunks_own": own,
                    "weight_chunks_borrowed": borrowed,
                    "borrowed_from": lenders,
                    "kv_chunks_mapped": len(m.kv.mapped()),
                    "kv_chunks_lent": len(kvr.lent_by(self.pool, n)),
                    "kv_blocks": kv_blocks,
                    "in_host_cache": self.host_cache.has(n),
                }
            used = self.pool.capacity - self.pool.free_count
            return {
                "device": str(self.device),
                "chunk_bytes": cb,
                "total_bytes": self.pool.capacity * cb,
                "free_bytes": self.pool.free_count * cb,
                "used_bytes": used * cb,
                "lent_bytes": lent * cb,
                "lendable_kv_bytes": lendable,
                "host_cache_bytes": self.host_cache.capacity * cb,
                "host_cache_used_bytes": self.host_cache.used_chunks * cb,
                "models": models,
            }

    def check(self) -> None:
        """Assert every invariant of the pool and the KV promises (used by tests; cheap enough for debugging).
        Waits for the moves in flight to finish: mid-move a model's chunks and state disagree on purpose."""
        with self._quiet() as quiet:
            self.pool.check()
            for m in quiet:
                lent = kvr.lent_by(self.pool, m.name)
                w_mapped = m.weights.mapped()
                if m.state == ModelState.HOT:
                    assert m.account is not None
                    assert m.account.mapped() + len(lent) == m.kv.n_slots, f"{m.name}: KV promise broken"
                    assert m.kv.mapped() == list(range(m.account.mapped())), f"{m.name}: KV not a prefix"
                    assert all(self.pool.chunks[m.weights.slots[s]].lender is None for s in w_mapped), (
                        f"{m.name}: HOT model holds borrowed chunks"
                    )
                else:
                    assert not lent and not m.kv.mapped(), f"{m.name}: {m.state} model lends or maps KV"
                if m.state.level >= ModelState.WARM.level:
                    assert len(w_mapped) == m.weights.n_slots, f"{m.name}: weights partly mapped"
                else:
                    assert not w_mapped, f"{m.name}: {m.state} model has weights mapped"
                if m.state == ModelState.HOST:
                    assert self.host_cache.has(m.name), f"{m.name}: HOST without a host copy"
            for c in self.pool.chunks:
                if c.lender is not None:
                    assert self.models[c.lender].state == ModelState.HOT, f"chunk {c.index} lent by non-HOT"
                    assert c.purpose == "weights", f"chunk {c.index} lent but holds {c.purpose}"
            assert not self.host_cache.held, f"host images still held after their copies: {self.host_cache.held}"
            assert self.host_cache.used_chunks <= self.host_cache.capacity

    def close(self) -> None:
        """Unmap and release all device memory (worker shutdown), once the moves in flight are done."""
        with self._quiet() as quiet:
            for m in quiet:
                if m.state == ModelState.HOT:
                    m.engine.detach_kv()
            self.pool.release_all()

    # internals: lookups and logging -------------------------------------------------------------------------
    def _get(self, name: str) -> _Model:
        m = self.models.get(name)
        if m is None:
            raise KeyError(f"model {name!r} is not registered on this worker (known: {sorted(self.models)})")
        return m

    def _log_step(self, m: _Model, step: str, t0: float, copied: int = 0, detail: str = "") -> None:
        """One line per state step: how long it took and, for copies, how fast they ran."""
        dt = time.perf_counter() - t0
        if copied:
            detail = f"copied {copied / GiB:.2f} GiB at {copied / max(dt, 1e-9) / 1e9:.1f} GB/s" + detail
        log.info("%s: %s in %.1f ms%s", m.name, step, dt * 1e3, f" ({detail})" if detail else "")

    @contextmanager
    def _quiet(self) -> Iterator[list[_Model]]:
        """Every model's lock (name order, so two callers cannot deadlock), then the pool lock."""
        with self._lock:
            models = sorted(self.models.values(), key=lambda m: m.name)
        with ExitStack() as stack:
            for m in models:
                stack.enter_context(m.lock)
            stack.enter_context(self._lock)
            yield models

    # internals: host images (call without the pool lock) ----------------------------------------------------
    def _new_image(self, m: _Model) -> list[torch.Tensor]:
        """A fresh host-cache image for ``m``, held; HostCacheFull if it cannot fit. Chunks the cache still has
        to create are made before taking the pool lock: pinning host memory is slow."""
        n = self.pool.n_chunks(m.layout.total_bytes)
        with self._lock:
            short = self.host_cache.shortfall(n)
        if short:
            fresh = [self.host_cache.new_chunk() for _ in range(short)]
            with self._lock:
                self.host_cache.adopt(fresh)
        with self._lock:
            image = self.host_cache.allocate(m.name, n, on_drop=self._host_dropped)
            self.host_cache.hold(m.name)
            return image

    def _image_or_staging(self, m: _Model) -> list[torch.Tensor]:
        try:
            return self._new_image(m)
        except HostCacheFull:  # too big to cache: stage through chunks kept only for this load
            return [self.host_cache.new_chunk() for _ in range(m.weights.n_slots)]

    def _host_dropped(self, name: str) -> None:
        """The host cache dropped an idle image (pool lock held): a HOST model is COLD now."""
        m = self.models[name]
        if m.state == ModelState.HOST:
            m.state = ModelState.COLD
            log.info("%s: HOST->COLD (host cache full, least recently used)", name)

    # internals: steps of one model (its lock held, not the pool lock) ---------------------------------------
    def _to_warm(self, m: _Model) -> None:
        """COLD/HOST -> WARM. On failure the model is back where it was and nothing else moved."""
        t0 = time.perf_counter()
        m.yield_pages.clear()  # before taking pages: only a model that holds some is asked to give them back
        with self._lock:
            chunks = self._acquire_for_weights(m.weights.n_slots, m.name)
            self.pool.map(m.weights, list(enumerate(chunks)))
            buffer = self.pool.view(m.weights)
            cached = self.host_cache.has(m.name)
            if cached:
                image = self.host_cache.get(m.name)
                self.host_cache.hold(m.name)
        try:
            if not cached:
                image = self._image_or_staging(m)
            stats = loader.load(m.layout, image, buffer, read_files=not cached, cancel=m.yield_pages)
            engine = m.engine
            if engine is None and m.yield_pages.is_set():
                raise loader.Cancelled
            if engine is None:  # built once, over the range's fixed address; kept across evictions
                engine = self.engine_factory(
                    m.model_dir, m.layout, buffer[: m.layout.total_bytes], self.device, m.dtype, **m.engine_kwargs
                )
        except Exception as e:
            with self._lock:
                self._unmap_weights(m)
                if cached:
                    self.host_cache.unhold(m.name)
                else:
                    self.host_cache.drop(m.name)
            if isinstance(e, (ModelFileError, OSError)):
                raise ModelLoadError(f"model {m.name!r}: {e}") from e
            if isinstance(e, loader.Cancelled):
                log.info("%s: load stopped after %.1f ms: a HOT lender took its KV pages back", m.name,
                         (time.perf_counter() - t0) * 1e3)  # fmt: skip
                raise LoadYielded(
                    f"model {m.name!r}: its load stopped to give borrowed KV pages back to a HOT model whose "
                    "requests needed them; it is where it was before and may be loaded again"
                ) from None
            raise
        with self._lock:
            self.host_cache.unhold(m.name)
            m.engine = engine
            m.state = ModelState.WARM
            m.last_used = time.monotonic()
        step = "HOST->WARM" if cached else "COLD->HOST->WARM (read and copy overlapped)"
        self._log_step(m, step, t0, stats.nbytes)

    def _warm_to_host(self, m: _Model, keep_host: bool) -> None:
        """WARM -> HOST (``keep_host``; copying the weights out if the cache dropped them) or COLD."""
        t0 = time.perf_counter()
        copied = 0
        with self._lock:
            cached = self.host_cache.has(m.name)
            if keep_host and cached:
                self.host_cache.hold(m.name)
        if keep_host and not cached:
            try:
                image = self._new_image(m)
            except HostCacheFull as e:
                log.warning("%s: %s; dropping to COLD instead of HOST", m.name, e)
                keep_host = False
            else:
                copied = self._copy_out(m, image)
        with self._lock:
            self._unmap_weights(m)
            if keep_host:
                self.host_cache.unhold(m.name)
                self.host_cache.get(m.name)  # most recently used
                m.state = ModelState.HOST
            else:
                self.host_cache.drop(m.name)
                m.state = ModelState.COLD
        self._log_step(m, f"WARM->{m.state}", t0, copied)

    def _to_hot(self, m: _Model):
        """WARM -> HOT, evicting idle WARM models until there is room; returns the engine."""
        while True:
            with self._lock:
                borrowed = [s for s in m.weights.mapped() if self.pool.chunks[m.weights.slots[s]].lender]
                need = len(borrowed) + m.kv.n_slots
                if self.pool.free_count >= need:  # take it in this same step: another thread may want it too
                    return self._make_hot(m, borrowed)
                victims = self._claim_victims(need, m.name)
            self._evict_victims(victims, m.name)

    def _copy_out(self, m: _Model, image: list[torch.Tensor]) -> int:
        """Device weights -> the (held) host image; on failure the image goes and the model stays WARM."""
        try:
            return loader.copy_to_host(self.pool.view(m.weights), image, m.layout.total_bytes).nbytes
        except Exception:
            with self._lock:
                self.host_cache.drop(m.name)
            raise

    def _deactivate(self, m: _Model) -> None:
        """HOT -> WARM in one bookkeeping step (see ``deactivate``); no-op below HOT."""
        with self._lock:
            if m.state != ModelState.HOT:
                return
            t0 = time.perf_counter()
            m.engine.detach_kv()  # raises if requests are still running; nothing has changed yet
            m.engine.kv_pressure_hook = None
            for i in kvr.lent_by(self.pool, m.name):
                self.pool.chunks[i].lender = None
            self.pool.put(self.pool.unmap(m.kv, m.kv.mapped()))
            m.account = None
            m.state = ModelState.WARM
        self._log_step(m, "HOT->WARM", t0)

    def _evict_victims(self, victims: list[_Model], for_model: str) -> None:
        """Evict the models ``_claim_victims`` locked to HOST; their locks go back."""
        try:
            for x in victims:
                log.info("%s: evicted to HOST to make room for %s", x.name, for_model)
                self._warm_to_host(x, keep_host=True)
        finally:
            for x in victims:
                x.lock.release()

    def _on_kv_pressure(self, name: str, more_blocks: int) -> int:
        """Engine hook (the lender's step thread): the HOT model ``name`` wants ``more_blocks`` more KV blocks.
        Evict borrowers of its pages to HOST until enough are mapped back; returns the blocks made available.
        Idle borrowers go first; one that is moving is never evicted under its feet: a load is told to stop
        (within one piece's read: the step thread serves every model of the worker, and waiting out a load from
        disk stalled them all for seconds), and any other move is waited for."""
        m = self.models[name]
        with self._lock:
            if m.account is None:
                return 0
            before = m.account.limit()
            target = m.account.mapped() + kvr.slots_for(m.account, more_blocks)
        while True:
            with self._lock:
                if m.account is None or m.account.mapped() >= target:
                    break
                borrowers = self._borrowers(name)
                victim = next((b for b in borrowers if b.lock.acquire(blocking=False)), None)
            if victim is None:
                if not borrowers:
                    break
                for b in borrowers:  # all are moving: loads stop and give their pages back
                    b.yield_pages.set()
                victim = borrowers[0]
                victim.lock.acquire()  # then wait for one, as the engine drops what it cannot fit
            try:
                with self._lock:
                    still = victim.name in (self.pool.chunks[i].owner for i in kvr.lent_by(self.pool, name))
                if still:
                    log.info("%s: KV pressure, evicting borrower %s to HOST", name, victim.name)
                    self._warm_to_host(victim, keep_host=True)
            finally:
                victim.lock.release()
        with self._lock:
            return max(0, m.account.limit() - before) if m.account else 0

    # internals: bookkeeping (pool lock held) ----------------------------------------------------------------
    def _acquire_for_weights(self, n: int, name: str) -> list[int]:
        """Own free chunks first, then idle KV pages lent by HOT models; PoolExhausted (all loans undone)."""
        own = self.pool.take(min(n, self.pool.free_count), name)
        loans: list[int] = []
        try:
            lenders = sorted(
                (x for x in self.models.values() if x.state == ModelState.HOT and x.name != name),
                key=lambda x: self._idle_slots(x),
                reverse=True,
            )
            for lender in lenders:
                if len(own) + len(loans) >= n:
                    break
                loans += kvr.lend(self.pool, lender.account, n - len(own) - len(loans))
            if len(own) + len(loans) < n:
                raise PoolExhausted(
                    f"model {name!r}: needs {n} chunks of {self.pool.chunk_bytes >> 20} MiB for its weights; "
                    f"{len(own)} free and {len(loans)} idle KV chunks lendable"
                )
        except Exception:  # PoolExhausted, or a lender's engine refusing: nothing may stay taken
            for i in loans:
                self._return_loan(i)
            self.pool.put(own)
            raise
        if loans:
            log.info("%s: borrows %d idle KV chunks of HOT models", name, len(loans))
        return own + loans

    def _make_hot(self, m: _Model, borrowed: list[int]):
        """WARM -> HOT once ``len(borrowed) + m.kv.n_slots`` chunks are free; returns the engine."""
        for slot in borrowed:  # HOT models never hold loans: move those weights onto own chunks
            (new,) = self.pool.take(1, m.name)
            self._return_loan(self.pool.migrate(m.weights, slot, new))
        chunks = self.pool.take(m.kv.n_slots, m.name)
        self.pool.map(m.kv, list(enumerate(chunks)))
        eng = m.engine
        kv_view = self.pool.view(m.kv)
        try:  # whole blocks only: a block may straddle the range's end
            eng.attach_kv(kv_view[: kv_view.numel() // eng.kv_block_bytes * eng.kv_block_bytes])
        except Exception:
            self.pool.put(self.pool.unmap(m.kv, m.kv.mapped()))
            raise
        m.account = kvr.KvAccount(m.kv, eng.kv_block_bytes, eng.set_kv_limit, self.pool.chunk_bytes)
        eng.set_kv_limit(m.account.limit())
        eng.kv_pressure_hook = lambda more, _name=m.name: self._on_kv_pressure(_name, more)
        m.state = ModelState.HOT
        return eng

    def _claim_victims(self, need: int, for_model: str) -> list[_Model]:
        """Lock least recently used idle WARM models until evicting them would make ``need`` chunks free, or
        raise PoolExhausted with nothing locked. A model whose lock is taken is moving: never a victim."""
        victims: list[_Model] = []
        freeable = 0
        warm = (x for x in self.models.values() if x.state == ModelState.WARM and x.name != for_model)
        for x in sorted(warm, key=lambda x: x.last_used):
            if self.pool.free_count + freeable >= need:
                break
            own = sum(1 for i in x.weights.slots if i is not None and self.pool.chunks[i].lender is None)
            if own and x.lock.acquire(blocking=False):
                victims.append(x)
                freeable += own
        if self.pool.free_count + freeable < need:
            for x in victims:
                x.lock.release()
            raise PoolExhausted(
                f"model {for_model!r}: needs {need} free chunks of {self.pool.chunk_bytes >> 20} MiB; "
                f"{self.pool.free_count} free and {freeable} held by idle WARM models"
            )
        return victims

    def _borrowers(self, lender: str) -> list[_Model]:
        """Models holding ``lender``'s pages: most pages first, least recently used first on ties."""
        counts: dict[str, int] = {}
        for i in kvr.lent_by(self.pool, lender):
            owner = self.pool.chunks[i].owner
            counts[owner] = counts.get(owner, 0) + 1
        return [self.models[b] for b in sorted(counts, key=lambda b: (-counts[b], self.models[b].last_used))]

    def _idle_slots(self, m: _Model) -> int:
        """KV slots of HOT model ``m`` whose blocks all lie at or above its used-block count: an upper bound on
        what it could lend now (used blocks pack at the bottom, but a freed one can leave a hole below a used
        one; the block manager exposes only the count). Only ranks lenders and feeds the report:
        ``kv_reservation.lend`` asks the engine itself."""
        used = m.engine.blocks.num_used
        mapped = m.account.mapped()
        k = 0
        while k < mapped and m.account.blocks(mapped - k - 1) >= used:
            k += 1
        return k

    def _return_loan(self, chunk: int) -> None:
        """An unmapped chunk on loan goes back into its lender's KV range."""
        lender = self.models[self.pool.chunks[chunk].lender]
        kvr.restore(self.pool, lender.account, [chunk])

    def _unmap_weights(self, m: _Model) -> None:
        for i in self.pool.unmap(m.weights, m.weights.mapped()):
            if self.pool.chunks[i].lender:
                self._return_loan(i)
            else:
                self.pool.put([i])
