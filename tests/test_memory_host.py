"""ModelHost on CPU (host-memory backend): states, zero-copy activation, fixed addresses, KV lending, failures.

Every model serves through the real engine; tokens are compared with a plain ``Engine.from_pretrained`` on the
same files, so a weight or KV page that was lost, poisoned (unmapped host slots read as NaN) or overwritten by
a borrower shows up as different tokens.
"""

from __future__ import annotations

import os

import pytest
import torch
from engine_models import build_model, prompts

from gpu_runtime import Engine, SamplingParams
from gpu_runtime.memory import ModelHost, ModelLoadError, ModelTooLarge, PoolExhausted, loader
from gpu_runtime.memory.host_cache import HostCache
from gpu_runtime.weights import load_weights, plan_weights
from protocol.states import ModelState

CHUNK = 64 * 1024  # the tiny models below: ~5 weight chunks, KV blocks of 8 KiB (8 per chunk)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
KW = dict(max_num_seqs=8, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three tiny Llama models on disk and their reference greedy tokens for fixed prompts."""
    out = {}
    for seed in range(3):
        path = str(tmp_path_factory.mktemp(f"m{seed}"))
        build_model(path, "llama", seed=seed)
        ps = prompts(128, [5, 9], seed=seed)
        ref = Engine.from_pretrained(path, num_kv_blocks=64, **KW).generate(ps, GREEDY)
        out[f"m{seed}"] = (path, ps, [r.token_ids for r in ref])
    return out


def make_host(tiny, names, gpu_chunks: int, kv_chunks: int = 4, **kw) -> ModelHost:
    host = ModelHost("cpu", gpu_bytes=gpu_chunks * CHUNK, host_cache_bytes=64 * CHUNK, chunk_bytes=CHUNK,
                     engine_kwargs=KW, **kw)  # fmt: skip
    for n in names:
        host.register(n, tiny[n][0], "float32", kv_bytes=kv_chunks * CHUNK)
    return host


def serves_reference(host: ModelHost, tiny, name: str) -> bool:
    _, ps, ref = tiny[name]
    return [o.token_ids for o in host.engine(name).generate(ps, GREEDY)] == ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loader_matches_reference_loader(tiny, dtype):
    """Pieces cross 4 KiB chunk boundaries, and bf16 converts from the files' float32."""
    layout = plan_weights(tiny["m0"][0], dtype)
    want = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    load_weights(layout, want)
    cache = HostCache(1 << 24, 4096, pinned=False)
    host = cache.allocate("m0", -(-layout.total_bytes // 4096), on_drop=lambda n: None)
    got = torch.full((len(host) * 4096,), 0xFF, dtype=torch.uint8)
    stats = loader.load(layout, host, got, read_files=True, threads=4)
    assert stats.nbytes == layout.total_bytes
    for s in layout.slots:  # padding between slots is never read by the engine
        assert torch.equal(got[s.offset : s.offset + s.nbytes], want[s.offset : s.offset + s.nbytes]), s.name


def test_states_up_and_down_keep_addresses_and_tokens(tiny):
    host = make_host(tiny, ["m0", "m1"], gpu_chunks=40)
    assert host.states() == {"m0": ModelState.COLD, "m1": ModelState.COLD}
    eng = host.activate("m0")  # COLD -> HOST -> WARM -> HOT in one call
    assert host.state("m0") == ModelState.HOT and serves_reference(host, tiny, "m0")
    wptr = eng.model  # engine object and its weight views are kept for the life of the worker
    addr = host.pool.view(host.models["m0"].weights).data_ptr()
    host.deactivate("m0")
    assert host.state("m0") == ModelState.WARM
    with pytest.raises(Exception, match="not HOT"):
        host.engine("m0")
    assert host.activate("m0") is eng and eng.model is wptr and serves_reference(host, tiny, "m0")
    for to, expect in (("HOST", ModelState.HOST), ("COLD", ModelState.COLD)):
        host.evict("m0", to=to)
        assert host.state("m0") == expect
        host.check()
        assert host.activate("m0") is eng and serves_reference(host, tiny, "m0")
        assert host.pool.view(host.models["m0"].weights).data_ptr() == addr
    host.load_host("m1")
    host.prewarm("m1")
    assert host.state("m1") == ModelState.WARM
    rep = host.report()
    assert rep["models"]["m0"]["state"] == "HOT" and rep["models"]["m0"]["kv_chunks_mapped"] == 4
    assert rep["models"]["m1"]["kv_chunks_mapped"] == 0 and rep["models"]["m1"]["weight_chunks_own"] > 0
    assert rep["used_bytes"] + rep["free_bytes"] == rep["total_bytes"]
    host.check()


def _wchunks(host, name):
    return host.models[name].weights.n_slots


def test_warm_weights_borrow_idle_kv_and_are_evicted_when_the_lender_needs_it(tiny):
    probe = make_host(tiny, ["m0"], gpu_chunks=40)
    w = _wchunks(probe, "m0")
    kv = 2 * w + 2
    # m0 HOT with a big KV promise; exactly nothing left free afterwards.
    host = make_host(tiny, ["m0", "m1"], gpu_chunks=w + kv, kv_chunks=kv)
    host.activate("m0")
    assert host.pool.free_count == 0
    host.prewarm("m1")  # all of m1's weights sit on m0's idle KV pages
    rep = host.report()
    assert rep["models"]["m1"]["borrowed_from"] == {"m0": w}
    assert rep["models"]["m0"]["kv_chunks_lent"] == w and rep["lent_bytes"] == w * CHUNK
    host.check()
    assert serves_reference(host, tiny, "m0")  # short prompts fit below the lowered limit
    # Requests needing more than the lowered limit, within the promise: the pressure hook evicts m1 to HOST.
    eng = host.engine("m0")
    blocks_all = kv * CHUNK // eng.kv_block_bytes
    long = prompts(128, [200] * 7, seed=7)
    assert 7 * 13 <= blocks_all and 7 * 13 > eng.blocks.limit
    ref = Engine.from_pretrained(tiny["m0"][0], num_kv_blocks=128, **KW).generate(long, GREEDY)
    assert [o.token_ids for o in eng.generate(long, GREEDY)] == [r.token_ids for r in ref]
    assert host.state("m1") == ModelState.HOST
    assert host.report()["models"]["m0"]["kv_chunks_lent"] == 0
    host.check()
    assert serves_reference(host, tiny, "m0")


def test_activating_a_borrower_moves_it_onto_own_chunks(tiny):
    w = _wchunks(make_host(tiny, ["m0"], gpu_chunks=40), "m0")
    host = make_host(tiny, ["m0", "m2"], gpu_chunks=4 * w - 1, kv_chunks=w + 1)
    host.register("m1", tiny["m1"][0], "float32", kv_bytes=CHUNK)
    host.activate("m0")
    host.prewarm("m2")
    host.prewarm("m1")  # 2 chunks short: borrowed from m0's idle KV
    assert host.report()["models"]["m1"]["borrowed_from"] == {"m0": 2}
    host.activate("m1")  # evicts WARM m2 for room, then moves the 2 borrowed chunks onto own ones
    rep = host.report()["models"]
    assert host.state("m2") == ModelState.HOST
    assert rep["m1"]["weight_chunks_borrowed"] == 0 and rep["m0"]["kv_chunks_lent"] == 0
    assert rep["m0"]["kv_chunks_mapped"] == w + 1
    host.check()
    assert serves_reference(host, tiny, "m1") and serves_reference(host, tiny, "m0")
    # A lender that deactivates while lending: the borrower keeps (now owns) the chunks.
    host.evict("m1", "HOST")
    host.prewarm("m2")
    host.prewarm("m1")
    assert host.report()["models"]["m1"]["weight_chunks_borrowed"] == 2
    host.deactivate("m0")
    assert host.report()["models"]["m1"]["weight_chunks_borrowed"] == 0
    host.check()


def test_failures_name_the_model_and_leave_others_serving(tiny, tmp_path):
    host = make_host(tiny, ["m0"], gpu_chunks=14, kv_chunks=4)
    host.activate("m0")
    # A truncated file is refused at registration.
    bad = tmp_path / "bad"
    build_model(str(bad), "llama", seed=5)
    st = bad / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="'bad'.*truncated"):
        host.register("bad", str(bad), "float32", kv_bytes=CHUNK)
    # A file that breaks after registration fails its load, not the worker.
    later = tmp_path / "later"
    build_model(str(later), "llama", seed=6)
    host.register("later", str(later), "float32", kv_bytes=CHUNK)
    before = host.report()
    os.truncate(later / "model.safetensors", 1000)
    with pytest.raises(ModelLoadError, match="'later'"):
        host.prewarm("later")
    assert host.state("later") == ModelState.COLD
    host.check()
    assert host.report()["free_bytes"] == before["free_bytes"]
    # Too large for the device at all.
    with pytest.raises(ModelTooLarge, match="'huge'"):
        host.register("huge", tiny["m1"][0], "float32", kv_bytes=100 * CHUNK)
    # Pool exhausted: m1 (weights + KV) does not fit next to HOT m0, and nothing is lendable enough.
    host.register("m1", tiny["m1"][0], "float32", kv_bytes=4 * CHUNK)
    host.prewarm("m1")
    with pytest.raises(PoolExhausted, match="'m1'"):
        host.activate("m1")
    assert host.state("m0") == ModelState.HOT and host.state("m1") == ModelState.WARM
    host.check()
    assert serves_reference(host, tiny, "m0")
    # Bad arguments.
    with pytest.raises(KeyError, match="nope"):
        host.activate("nope")
    with pytest.raises(ValueError, match="dtype"):
        host.register("x", tiny["m2"][0], "int3", kv_bytes=CHUNK)
    with pytest.raises(ValueError, match="HOST or COLD"):
        host.evict("m0", to="WARM")


def test_cuda_driver_errors_name_the_call():
    from gpu_runtime.memory.cuda_vmm import CudaVmmError, _check, _runs, cu

    with pytest.raises(CudaVmmError, match="cuMemMap failed: CUDA_ERROR_INVALID_VALUE"):
        _check((cu.CUresult.CUDA_ERROR_INVALID_VALUE,), "cuMemMap")
    assert _check((cu.CUresult.CUDA_SUCCESS, 7), "cuMemCreate") == 7
    assert _runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 2), (9, 1)]


def test_per_model_engine_settings(tiny):
    host = make_host(tiny, [], gpu_chunks=20)
    host.register("short", tiny["m0"][0], "float32", kv_bytes=4 * CHUNK, engine_kwargs={"max_model_len": 64})
    assert host.activate("short").max_model_len == 64


def test_deactivate_refused_while_serving(tiny):
    host = make_host(tiny, ["m0"], gpu_chunks=20)
    eng = host.activate("m0")
    eng.add_request("r", tiny["m0"][1][0], GREEDY)
    eng.step()
    with pytest.raises(RuntimeError, match="still running"):
        host.evict("m0", "HOST")
    assert host.state("m0") == ModelState.HOT
    host.check()
