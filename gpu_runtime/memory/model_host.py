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

Every public method takes the host's lock; the engine's pressure hook takes it too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpu_runtime.engine.config import ModelFileError
from gpu_runtime.memory import kv_reservation as kvr
from gpu_runtime.memory import loader
from gpu_runtime.memory.host_cache import HostCache, HostCacheFull
from gpu_runtime.memory.pool import ModelMemoryError, Pool, PoolExhausted, VRange
from gpu_runtime.memory.states import ModelState, parse_state
from gpu_runtime.weights import WeightLayout, plan_weights

log = logging.getLogger("warmserve.memory")

GiB = 1 << 30
MiB = 1 << 20
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class ModelTooLarge(ModelMemoryError):
    """A model cannot fit the device (weights + KV) at all."""


class ModelLoadError(ModelMemoryError):
    """A model's files could not be read; the message names the model and the file."""


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


def _default_engine_factory(model_dir, layout, weights, device, dtype, **kwargs):
    from gpu_runtime import Engine

    return Engine.from_weights(model_dir, layout, weights, device, dtype, **kwargs)


class ModelHost:
    """The memory of one worker device. See the module docstring for the states and what each step does.

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
        self._lock = threading.RLock()

    # registration -------------------------------------------------------------------------------------------
    def register(self, name: str, model_dir: str, dtype: str, kv_bytes: int, engine_kwargs: dict | None = None) -> None:
        """Make a model known, COLD. Reads config and safetensors headers; ModelLoadError if they are broken,
        ModelTooLarge if weights plus KV exceed the pool. ``engine_kwargs`` (e.g. ``max_model_len``) add to
        the host's own for this model's engine."""
        with self._lock:
            if name in self.models:
                raise ValueError(f"model {name!r} is already registered")
            if dtype not in DTYPES:
                raise ValueError(f"model {name!r}: dtype {dtype!r} not one of {sorted(DTYPES)}")
            if kv_bytes <= 0:
                raise ValueError(f"model {name!r}: kv_bytes must be > 0, got {kv_bytes}")
            try:
                layout = plan_weights(model_dir, DTYPES[dtype])
            except ModelFileError as e:
                raise ModelLoadError(f"model {name!r}: {e}") from e
            need = self.pool.n_chunks(layout.total_bytes) + self.pool.n_chunks(kv_bytes)
            if need > self.pool.capacity:
                raise ModelTooLarge(
                    f"model {name!r}: weights {layout.total_bytes / GiB:.2f} GiB + KV {kv_bytes / GiB:.2f} GiB "
                    f"exceed the pool's {self.pool.capacity * self.pool.chunk_bytes / GiB:.2f} GiB"
                )
            weights = self.pool.reserve(name, "weights", layout.total_bytes)
            kv = self.pool.reserve(name, "kv", kv_bytes)
            self.models[name] = _Model(name, layout.model_dir, DTYPES[dtype], kv_bytes, layout, weights, kv)
            self.models[name].engine_kwargs = {**self.engine_kwargs, **(engine_kwargs or {})}
            log.info("%s: registered (%.2f GiB weights, %.2f GiB KV)", name, layout.total_bytes / GiB, kv_bytes / GiB)

    # queries ------------------------------------------------------------------------------------------------
    def state(self, name: str) -> ModelState:
        return self._get(name).state

    def states(self) -> dict[str, ModelState]:
        with self._lock:
            return {n: m.state for n, m in self.models.items()}

    def engine(self, name: str):
        m = self._get(name)
        if m.state != ModelState.HOT:
            raise ModelMemoryError(f"model {name!r} is {m.state}, not HOT: no engine to serve with")
        return m.engine

    # transitions up -----------------------------------------------------------------------------------------
    def load_host(self, name: str) -> None:
        """COLD -> HOST. No-op if the model is already HOST or above."""
        with self._lock:
            m = self._get(name)
            if m.state >= ModelState.HOST:
                return
            t0 = time.perf_counter()
            chunks = self._host_alloc(m)
            try:
                stats = loader.load(m.layout, chunks, None, read_files=True)
            except (ModelFileError, OSError) as e:
                self.host_cache.drop(name)
                raise ModelLoadError(f"model {name!r}: {e}") from e
            m.state = ModelState.HOST
            self._log_step(m, "COLD->HOST", t0, stats.nbytes)

    def prewarm(self, name: str) -> None:
        """-> WARM (from COLD through HOST, reading and copying overlapped). No-op if WARM or HOT."""
        with self._lock:
            m = self._get(name)
            if m.state >= ModelState.WARM:
                m.last_used = time.monotonic()
                return
            self._to_warm(m)

    def activate(self, name: str):
        """-> HOT; returns the engine. Copies no weights when the model is WARM. May evict least recently used
        WARM models to HOST to make room for the KV cache; raises PoolExhausted (touching nothing) if even that
        cannot make room."""
        with self._lock:
            m = self._get(name)
            m.last_used = time.monotonic()
            if m.state == ModelState.HOT:
                return m.engine
            if m.state < ModelState.WARM:
                self._to_warm(m)
            t0 = time.perf_counter()
            borrowed = [s for s in m.weights.mapped() if self.pool.chunks[m.weights.slots[s]].lender]
            self._make_free(len(borrowed) + m.kv.n_slots, m.name)
            for slot in borrowed:  # HOT models never hold loans: move those weights onto own chunks
                (new,) = self.pool.take(1, name)
                old = self.pool.migrate(m.weights, slot, new)
                self._return_loan(old)
            chunks = self.pool.take(m.kv.n_slots, name)
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
            eng.kv_pressure_hook = lambda more, _name=name: self._on_kv_pressure(_name, more)
            m.state = ModelState.HOT
            self._log_step(m, "WARM->HOT", t0, detail=f"mapped {m.kv.n_slots} KV chunks, {eng.num_kv_blocks} blocks")
            return eng

    # transitions down ---------------------------------------------------------------------------------------
    def deactivate(self, name: str) -> None:
        """HOT -> WARM: unmap the KV cache (the engine must be idle). Chunks this model had lent stay with their
        borrowers, which now own them. No-op below HOT."""
        with self._lock:
            m = self._get(name)
            if m.state != ModelState.HOT:
                return
            t0 = time.perf_counter()
            m.engine.detach_kv()  # raises if requests are still running; nothing has changed yet
            m.engine.kv_pressure_hook = None
            for i in kvr.lent_by(self.pool, name):
                self.pool.chunks[i].lender = None
            self.pool.put(self.pool.unmap(m.kv, m.kv.mapped()))
            m.account = None
            m.state = ModelState.WARM
            self._log_step(m, "HOT->WARM", t0)

    def evict(self, name: str, to: str | ModelState = "HOST") -> None:
        """Down to HOST (weights kept in the host cache) or COLD (host copy dropped too)."""
        target = parse_state(to)
        if target not in (ModelState.HOST, ModelState.COLD):
            raise ValueError(f"evict({name!r}): target must be HOST or COLD, got {target}")
        with self._lock:
            m = self._get(name)
            if m.state == ModelState.HOT:
                self.deactivate(name)
            if m.state == ModelState.WARM:
                self._warm_to_host(m, keep_host=target == ModelState.HOST)
            if target == ModelState.COLD and m.state == ModelState.HOST:
                self.host_cache.drop(name)
                m.state = ModelState.COLD
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
                    "state": m.state.name,
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
        """Assert every invariant of the pool and the KV promises (used by tests; cheap enough for debugging)."""
        with self._lock:
            self.pool.check()
            for m in self.models.values():
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
                if m.state >= ModelState.WARM:
                    assert len(w_mapped) == m.weights.n_slots, f"{m.name}: weights partly mapped"
                else:
                    assert not w_mapped, f"{m.name}: {m.state} model has weights mapped"
                if m.state == ModelState.HOST:
                    assert self.host_cache.has(m.name), f"{m.name}: HOST without a host copy"
            for c in self.pool.chunks:
                if c.lender is not None:
                    assert self.models[c.lender].state == ModelState.HOT, f"chunk {c.index} lent by non-HOT"
                    assert c.purpose == "weights", f"chunk {c.index} lent but holds {c.purpose}"
            assert self.host_cache.used_chunks <= self.host_cache.capacity

    def close(self) -> None:
        """Unmap and release all device memory (worker shutdown)."""
        with self._lock:
            for m in self.models.values():
                if m.state == ModelState.HOT:
                    m.engine.detach_kv()
            self.pool.release_all()

    # internals ----------------------------------------------------------------------------------------------
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

    def _host_alloc(self, m: _Model) -> list[torch.Tensor]:
        n = self.pool.n_chunks(m.layout.total_bytes)
        return self.host_cache.allocate(m.name, n, on_drop=self._host_dropped)

    def _host_dropped(self, name: str) -> None:
        m = self.models[name]
        if m.state == ModelState.HOST:
            m.state = ModelState.COLD
            log.info("%s: HOST->COLD (host cache full, least recently used)", name)

    def _to_warm(self, m: _Model) -> None:
        """COLD/HOST -> WARM. On failure the model is back where it was and nothing else moved."""
        t0 = time.perf_counter()
        n = m.weights.n_slots
        chunks = self._acquire_for_weights(n, m.name)
        self.pool.map(m.weights, list(enumerate(chunks)))
        buffer = self.pool.view(m.weights)
        cached = self.host_cache.has(m.name)
        try:
            if cached:
                host = self.host_cache.get(m.name)
            else:
                try:
                    host = self._host_alloc(m)
                except HostCacheFull:  # too big to cache: stage through chunks kept only for this load
                    host = [self.host_cache.new_chunk() for _ in range(n)]
            stats = loader.load(m.layout, host, buffer, read_files=not cached)
            if m.engine is None:
                m.engine = self.engine_factory(
                    m.model_dir, m.layout, buffer[: m.layout.total_bytes], self.device, m.dtype, **m.engine_kwargs
                )
        except Exception as e:
            self._unmap_weights(m)
            if not cached:
                self.host_cache.drop(m.name)
            m.state = ModelState.HOST if self.host_cache.has(m.name) else ModelState.COLD
            if isinstance(e, (ModelFileError, OSError)):
                raise ModelLoadError(f"model {m.name!r}: {e}") from e
            raise
        m.state = ModelState.WARM
        m.last_used = time.monotonic()
        step = "HOST->WARM" if cached else "COLD->HOST->WARM (read and copy overlapped)"
        self._log_step(m, step, t0, stats.nbytes)

    def _acquire_for_weights(self, n: int, name: str) -> list[int]:
        """Own free chunks first, then idle KV pages lent by HOT models; PoolExhausted (all loans undone)."""
        own = self.pool.take(min(n, self.pool.free_count), name)
        loans: list[int] = []
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
            for i in loans:
                self._return_loan(i)
            self.pool.put(own)
            raise PoolExhausted(
                f"model {name!r}: needs {n} chunks of {self.pool.chunk_bytes >> 20} MiB for its weights; "
                f"{len(own)} free and {len(loans)} idle KV chunks lendable"
            )
        if loans:
            log.info("%s: borrows %d idle KV chunks of HOT models", name, len(loans))
        return own + loans

    def _idle_slots(self, m: _Model) -> int:
        """KV slots of HOT model ``m`` above every block in use: what it could lend now. Exact if the block
        manager exposes ``high_water`` (highest used id + 1); otherwise an upper bound from the used count.
        Only ranks lenders and feeds the report: ``kv_reservation.lend`` asks the engine itself."""
        blocks = m.engine.blocks
        used_top = getattr(blocks, "high_water", None)
        used_top = blocks.num_used if used_top is None else used_top
        mapped = m.account.mapped()
        k = 0
        while k < mapped and m.account.blocks(mapped - k - 1) >= used_top:
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

    def _warm_to_host(self, m: _Model, keep_host: bool) -> None:
        t0 = time.perf_counter()
        copied = 0
        if keep_host and not self.host_cache.has(m.name):
            try:
                host = self._host_alloc(m)
                copied = loader.copy_to_host(self.pool.view(m.weights), host, m.layout.total_bytes).nbytes
            except HostCacheFull as e:
                log.warning("%s: %s; dropping to COLD instead of HOST", m.name, e)
                keep_host = False
        self._unmap_weights(m)
        if keep_host:
            self.host_cache.get(m.name)  # most recently used
            m.state = ModelState.HOST
        else:
            self.host_cache.drop(m.name)
            m.state = ModelState.COLD
        self._log_step(m, f"WARM->{m.state.name}", t0, copied)

    def _make_free(self, need: int, for_model: str) -> None:
        """Evict least recently used WARM models to HOST until ``need`` chunks are free, or raise first."""
        if self.pool.free_count >= need:
            return
        warm = sorted(
            (x for x in self.models.values() if x.state == ModelState.WARM and x.name != for_model),
            key=lambda x: x.last_used,
        )
        freeable = sum(1 for x in warm for i in x.weights.slots if i is not None and self.pool.chunks[i].lender is None)
        if self.pool.free_count + freeable < need:
            raise PoolExhausted(
                f"model {for_model!r}: needs {need} free chunks of {self.pool.chunk_bytes >> 20} MiB; "
                f"{self.pool.free_count} free and {freeable} held by idle WARM models"
            )
        for x in warm:
            if self.pool.free_count >= need:
                break
            log.info("%s: evicted to HOST to make room for %s", x.name, for_model)
            self._warm_to_host(x, keep_host=True)

    def _on_kv_pressure(self, name: str, more_blocks: int) -> int:
        """Engine hook: the HOT model ``name`` wants ``more_blocks`` more KV blocks. Evict borrowers of its
        pages to HOST until enough are mapped back; returns the blocks made available."""
        with self._lock:
            m = self.models[name]
            if m.account is None:
                return 0
            before = m.account.limit()
            target = m.account.mapped() + kvr.slots_for(m.account, more_blocks)
            while m.account.mapped() < target:
                counts: dict[str, int] = {}
                for i in kvr.lent_by(self.pool, name):
                    owner = self.pool.chunks[i].owner
                    counts[owner] = counts.get(owner, 0) + 1
                if not counts:
                    break
                victim = max(counts, key=lambda b: (counts[b], -self.models[b].last_used))
                log.info("%s: KV pressure, evicting borrower %s to HOST", name, victim)
                self._warm_to_host(self.models[victim], keep_host=True)
            return m.account.limit() - before
