"""ModelHost under concurrency: one model's slow load or eviction never stalls another model.

A gate blocks one step of model ``a`` (building its engine, reading its host image, copying it out) until the
test opens it. While ``a`` waits inside its transition, everything done to the other models must finish and
``a``'s future must still be pending: had any of it waited for ``a``, it would have waited for the gate. The
gate opens by itself after ``GATE_S`` so that a regression fails the assertions instead of hanging.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from engine_models import build_model, prompts

from gpu_runtime import Engine, SamplingParams
from gpu_runtime.memory import HostCacheFull, LoadYielded, ModelHost, loader
from gpu_runtime.memory.host_cache import HostCache
from protocol.states import ModelState

CHUNK = 64 * 1024  # tiny models: ~5 weight chunks each, KV blocks of 8 KiB (8 per chunk)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
KW = dict(max_num_seqs=8, max_num_batched_tokens=512)
GATE_S = 30.0

pytestmark = pytest.mark.timeout(120)  # a deadlock fails the test rather than the suite


class Gate:
    """Holds whoever calls ``wait`` until ``open`` (or GATE_S); ``entered`` tells that someone is held."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.entered_at = 0.0

    def wait(self) -> None:
        self.entered_at = time.monotonic()
        self.entered.set()
        self.opened.wait(GATE_S)

    def open(self) -> None:
        self.opened.set()


class WatchedLock:
    """A model's lock that tells when some thread has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waited = threading.Event()

    def acquire(self, blocking: bool = True) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if blocking:
            self.waited.set()
            return self._lock.acquire()
        return False

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three tiny Llama models on disk, with reference greedy tokens for short prompts."""
    out = {}
    for seed, name in enumerate("abc"):
        path = str(tmp_path_factory.mktemp(name))
        build_model(path, "llama", seed=seed)
        ps = prompts(128, [5, 9], seed=seed)
        ref = Engine.from_pretrained(path, num_kv_blocks=64, **KW).generate(ps, GREEDY)
        out[name] = (path, ps, [r.token_ids for r in ref])
    return out


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=2) as ex:
        yield ex


def weight_chunks(tiny) -> int:
    probe = ModelHost("cpu", gpu_bytes=64 * CHUNK, chunk_bytes=CHUNK)
    probe.register("a", tiny["a"][0], "float32", kv_bytes=CHUNK)
    return probe.models["a"].weights.n_slots


def make_host(tiny, gpu_chunks: int, kv_chunks: dict[str, int], host_cache_chunks: int = 64, **kw) -> ModelHost:
    host = ModelHost("cpu", gpu_bytes=gpu_chunks * CHUNK, host_cache_bytes=host_cache_chunks * CHUNK,
                     chunk_bytes=CHUNK, engine_kwargs=KW, **kw)  # fmt: skip
    for name, kv in kv_chunks.items():
        host.register(name, tiny[name][0], "float32", kv_bytes=kv * CHUNK)
    return host


def gated_factory(gates: dict[str, Gate]):
    """The default engine factory, held at the gate of the model whose directory it builds."""

    def factory(model_dir, *args, **kwargs):
        if model_dir in gates:
            gates[model_dir].wait()
        return Engine.from_weights(model_dir, *args, **kwargs)

    return factory


def serves_reference(host: ModelHost, tiny, name: str) -> bool:
    _, ps, ref = tiny[name]
    return [o.token_ids for o in host.engine(name).generate(ps, GREEDY)] == ref


def entered(gate: Gate, fut: Future) -> None:
    assert gate.entered.wait(GATE_S), "the gated step never started"
    assert not fut.done(), fut.exception()


def still_held(gate: Gate, fut: Future) -> None:
    """Everything since ``entered`` ran while the gated model was mid-move, well within the gate's delay."""
    assert not fut.done() and time.monotonic() - gate.entered_at < GATE_S / 3


def test_slow_load_of_one_model_blocks_nothing_of_another(tiny, pool):
    w = weight_chunks(tiny)
    gates: dict[str, Gate] = {}
    # b HOT with a KV promise of w + 2 chunks; a's weights take the last free chunks; c borrows b's idle KV.
    host = make_host(tiny, 3 * w + 2, {"a": 2, "b": w + 2, "c": 2}, engine_factory=gated_factory(gates))
    gate = gates[host.models["a"].model_dir] = Gate()
    host.activate("b")
    loading = pool.submit(host.prewarm, "a")
    entered(gate, loading)

    host.prewarm("c")  # another load runs alongside a's
    assert host.states() == {"a": ModelState.COLD, "b": ModelState.HOT, "c": ModelState.WARM}
    assert host.report()["models"]["c"]["borrowed_from"] == {"b": w}
    assert serves_reference(host, tiny, "b")
    # More KV than b's lowered limit: the engine's pressure hook evicts c, b's borrower, to HOST.
    eng = host.engine("b")
    long = prompts(128, [100, 100, 100], seed=11)
    assert 3 * 7 > eng.blocks.limit
    ref = Engine.from_pretrained(tiny["b"][0], num_kv_blocks=64, **KW).generate(long, GREEDY)
    assert [o.token_ids for o in eng.generate(long, GREEDY)] == [r.token_ids for r in ref]
    assert host.state("c") == ModelState.HOST and host.report()["models"]["b"]["kv_chunks_lent"] == 0
    host.deactivate("b")
    assert host.activate("b") is eng and serves_reference(host, tiny, "b")
    assert host.state("a") == ModelState.COLD
    still_held(gate, loading)

    gate.open()
    loading.result(GATE_S)
    assert host.state("a") == ModelState.WARM
    host.check()
    host.evict("b")
    host.activate("a")
    assert serves_reference(host, tiny, "a")
    host.check()


def test_lender_pressure_evicts_idle_borrowers_first_and_waits_for_loading_ones(tiny, pool):
    w = weight_chunks(tiny)
    gates: dict[str, Gate] = {}
    # b HOT with nothing free: c's and then a's weights all sit on b's idle KV pages.
    host = make_host(tiny, 3 * w + 2, {"a": 2, "b": 2 * w + 2, "c": 2}, engine_factory=gated_factory(gates))
    gate = gates[host.models["a"].model_dir] = Gate()
    eng = host.activate("b")
    host.prewarm("c")
    a_lock = host.models["a"].lock = WatchedLock()
    loading = pool.submit(host.prewarm, "a")
    entered(gate, loading)
    assert host.report()["models"]["b"]["kv_chunks_lent"] == 2 * w

    assert eng.kv_pressure_hook(8) >= 8  # c is idle: evicted at once, a left loading
    assert host.state("c") == ModelState.HOST and host.state("a") == ModelState.COLD
    assert host.report()["models"]["b"]["kv_chunks_lent"] == w
    assert serves_reference(host, tiny, "b")
    still_held(gate, loading)
    # Only a, still loading, holds the rest: the hook waits for its load to end, then evicts it.
    reclaim = pool.submit(eng.kv_pressure_hook, w * 8)
    assert a_lock.waited.wait(GATE_S) and not reclaim.done() and not loading.done()
    gate.open()
    loading.result(GATE_S)
    assert reclaim.result(GATE_S) >= w * 8
    assert host.state("a") == ModelState.HOST and host.report()["models"]["b"]["kv_chunks_lent"] == 0
    host.check()
    host.evict("b")
    host.activate("a")
    assert serves_reference(host, tiny, "a")
    host.check()


def test_lender_pressure_stops_a_load_from_disk_onto_its_pages(tiny, pool, monkeypatch):
    """The step thread serves every model of a worker: a lender that needs its pages back must not wait out a
    borrower's whole load (seconds from disk for an 8B model, every model's requests stalled meanwhile)."""
    w = weight_chunks(tiny)
    host = make_host(tiny, 2 * w + 2, {"a": 2, "b": w + 2})  # b HOT: a's weights fit only on b's idle KV
    eng = host.activate("b")
    a = host.models["a"]
    gate = Gate()
    read_piece = loader._read_piece

    def slow_read(p, *args):  # a's reads crawl until the gate opens or the load is told to stop
        if p.file.startswith(a.model_dir):
            gate.entered_at = gate.entered_at or time.monotonic()
            gate.entered.set()
            while not (gate.opened.is_set() or a.yield_pages.is_set()):
                time.sleep(0.005)
        return read_piece(p, *args)

    monkeypatch.setattr(loader, "_read_piece", slow_read)
    loading = pool.submit(host.prewarm, "a")
    entered(gate, loading)
    assert host.report()["models"]["b"]["kv_chunks_lent"] == w

    assert eng.kv_pressure_hook(w * 8) >= w * 8  # returns without the gate: the load stopped
    with pytest.raises(LoadYielded, match="'a'"):
        loading.result(GATE_S)
    assert time.monotonic() - gate.entered_at < GATE_S / 3  # well before the gate would have opened
    assert host.state("a") == ModelState.COLD and host.report()["models"]["b"]["kv_chunks_lent"] == 0
    assert serves_reference(host, tiny, "b")
    host.check()
    gate.open()
    host.evict("b")
    host.activate("a")  # a stopped load leaves nothing behind: loading again works
    assert serves_reference(host, tiny, "a")
    host.check()


def test_eviction_copy_of_one_model_blocks_no_activation(tiny, pool, monkeypatch):
    w = weight_chunks(tiny)
    # The host cache holds two images: warming c drops a's, so evicting a must copy its weights out.
    host = make_host(tiny, 3 * w + 3, {"a": 2, "b": 4, "c": 2}, host_cache_chunks=2 * w)
    for name in "abc":
        host.prewarm(name)
    assert not host.host_cache.has("a")
    gate = Gate()
    a_weights = host.pool.view(host.models["a"].weights).data_ptr()
    copy_to_host = loader.copy_to_host

    def gated_copy(device_buffer, *args):
        if device_buffer.data_ptr() == a_weights:
            gate.wait()
        return copy_to_host(device_buffer, *args)

    monkeypatch.setattr(loader, "copy_to_host", gated_copy)
    evicting = pool.submit(host.evict, "a", "HOST")
    entered(gate, evicting)

    # b's KV needs a victim: a is least recently used but moving, so c goes instead.
    assert host.states() == {"a": ModelState.WARM, "b": ModelState.WARM, "c": ModelState.WARM}
    host.activate("b")
    assert host.states() == {"a": ModelState.WARM, "b": ModelState.HOT, "c": ModelState.HOST}
    assert serves_reference(host, tiny, "b")
    still_held(gate, evicting)

    gate.open()
    evicting.result(GATE_S)
    assert host.state("a") == ModelState.HOST
    host.check()
    host.evict("b")
    host.activate("a")  # from the image the eviction copied
    assert serves_reference(host, tiny, "a")
    host.check()


def test_a_host_image_being_copied_from_is_never_dropped(tiny, pool, monkeypatch):
    w = weight_chunks(tiny)
    host = make_host(tiny, 4 * w, {"a": 2, "c": 2}, host_cache_chunks=w)  # room for one image
    host.load_host("a")
    gate = Gate()
    a_dir = host.models["a"].model_dir
    load = loader.load

    def gated_load(layout, host_chunks, device_buffer, read_files, *args, **kwargs):
        if layout.model_dir == a_dir and device_buffer is not None:
            gate.wait()
        return load(layout, host_chunks, device_buffer, read_files, *args, **kwargs)

    monkeypatch.setattr(loader, "load", gated_load)
    warming = pool.submit(host.prewarm, "a")  # HOST -> WARM reads a's image
    entered(gate, warming)

    with pytest.raises(HostCacheFull, match="'c'"):
        host.load_host("c")  # the only image that could make room is in use
    assert host.host_cache.has("a") and host.state("c") == ModelState.COLD
    host.prewarm("c")  # too big to cache now: staged through chunks of its own
    assert host.state("c") == ModelState.WARM
    still_held(gate, warming)

    gate.open()
    warming.result(GATE_S)
    host.check()
    host.activate("a")
    assert serves_reference(host, tiny, "a")
    host.check()


def test_host_cache_never_drops_held_images():
    cache = HostCache(4 * 16, 16, pinned=False)
    dropped: list[str] = []
    for name in "xy":
        cache.allocate(name, 2, on_drop=dropped.append)
    cache.hold("x")  # x is least recently used, but a copy is reading it
    cache.allocate("z", 2, on_drop=dropped.append)
    assert dropped == ["y"] and cache.has("x")
    cache.hold("z")
    with pytest.raises(HostCacheFull, match="'v'"):
        cache.allocate("v", 1, on_drop=dropped.append)
    assert dropped == ["y"] and cache.has("x") and cache.has("z")
    cache.unhold("x")
    cache.allocate("v", 1, on_drop=dropped.append)
    assert dropped == ["y", "x"]
