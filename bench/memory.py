"""Memory benchmark of the universal worker (issue 4). Run on the lent GPU from the repo root:

    python3 bench/memory.py --part vmm      # CUDA VMM pool correctness + chunk-size costs (no engine needed)
    python3 bench/memory.py --part all      # everything; writes bench/results/memory.json

See docs/benchmarks.md, section Memory, for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gpu_runtime.memory.cuda_vmm import CudaVmmBackend, CudaVmmError  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def _expect_error(fn, call: str) -> str:
    try:
        fn()
    except CudaVmmError as exc:
        assert call in str(exc), f"error should name {call}: {exc}"
        return str(exc)
    raise AssertionError(f"{call} misuse did not raise")


def vmm_check() -> dict:
    """Map, write through a torch view, unmap/remap at the same address, graph replay, error paths."""
    be = CudaVmmBackend(torch.device("cuda:0"), 2 * MiB)
    chunks = [be.create_chunk() for _ in range(5)]
    rng = be.reserve(4)
    be.map(rng, [(i, chunks[i]) for i in range(4)])
    view = be.view(rng)
    addr = view.data_ptr()
    assert addr == rng.base and view.numel() == 4 * be.chunk_bytes
    pattern = torch.randint(0, 255, (view.numel(),), dtype=torch.uint8, device="cuda")
    view.copy_(pattern)
    assert torch.equal(view, pattern)
    # CUDA graph over slot 1, captured before the remap.
    f32 = view[be.chunk_bytes : 2 * be.chunk_bytes].view(torch.float32)
    out = torch.empty_like(f32)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.mul(f32, 1.0, out=out)
        with torch.cuda.graph(g, stream=s):
            torch.mul(f32, 1.0, out=out)
    _sync()
    # Remap slot 1 to a fresh chunk holding other bytes: same address, new content, graph sees it.
    be.unmap(rng, [1])
    be.map(rng, [(1, chunks[4])])
    fresh = torch.randn(be.chunk_bytes // 4, device="cuda")
    view[be.chunk_bytes : 2 * be.chunk_bytes].copy_(fresh.view(torch.uint8))
    g.replay()
    _sync()
    assert torch.equal(out, fresh), "graph replay after remap did not read the new chunk"
    assert torch.equal(view[: be.chunk_bytes], pattern[: be.chunk_bytes]), "slot 0 changed"
    # The old chunk kept its bytes while unmapped: map it back.
    be.unmap(rng, [1])
    be.map(rng, [(1, chunks[1])])
    assert torch.equal(view, pattern), "content lost across unmap/remap"
    # Migration: content moves to another chunk, address stays.
    be.migrate(rng, 2, chunks[2], chunks[4])
    assert view.data_ptr() == addr and torch.equal(view, pattern), "migrate lost content"
    errors = [
        _expect_error(lambda: be.map(rng, [(0, chunks[0])]), "cuMemMap"),  # already mapped
        _expect_error(lambda: be.set_access(be.reserve(1), 0, 1), "cuMemSetAccess"),  # nothing mapped
    ]
    be.unmap(rng, [0, 1, 2, 3])
    for h in chunks:
        be.release_chunk(h)
    be.close()
    return {"vmm_check": "ok", "errors_seen": errors}


def chunk_costs(total: int = 4 * GiB) -> list[dict]:
    """Driver cost of create / map / set access / unmap for one model-sized region, per chunk size."""
    rows = []
    for chunk_mib in (2, 8, 32, 128, 512):
        be = CudaVmmBackend(torch.device("cuda:0"), chunk_mib * MiB)
        n = total // be.chunk_bytes
        t0 = time.perf_counter()
        handles = [be.create_chunk() for _ in range(n)]
        t_create = time.perf_counter() - t0
        rng_a, rng_b = be.reserve(n), be.reserve(n)
        t0 = time.perf_counter()
        be.map(rng_a, list(enumerate(handles)))  # one set-access call over the whole run
        t_map_run = time.perf_counter() - t0
        be.unmap(rng_a, list(range(n)))
        _sync()
        t0 = time.perf_counter()
        for i, h in enumerate(handles):  # one set-access call per chunk
            be.map(rng_b, [(i, h)])
        t_map_each = time.perf_counter() - t0
        t0 = time.perf_counter()
        be.unmap(rng_b, list(range(n)))
        t_unmap = time.perf_counter() - t0
        for h in handles:
            be.release_chunk(h)
        be.close()
        rows.append(
            {
                "chunk_mib": chunk_mib,
                "gib": total / GiB,
                "create_ms": t_create * 1e3,
                "map_access_per_run_ms": t_map_run * 1e3,
                "map_access_per_chunk_ms": t_map_each * 1e3,
                "unmap_ms": t_unmap * 1e3,
            }
        )
        print(rows[-1], flush=True)
    return rows


def pinned_h2d_gbps(nbytes: int = 4 * GiB, into=None) -> float:
    """Pinned host -> device bandwidth (GB/s, 1e9), median of 5, into ``into`` or a plain allocation."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(7)
    dst = into if into is not None else torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        _sync()
        t0 = time.perf_counter()
        dst[:nbytes].copy_(src, non_blocking=True)
        _sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9


LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)
LLAMA32_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
)


def write_model(path: str, shape: dict, shard_bytes: int = 4 * GiB, seed: int = 0, device: str = "cuda") -> str:
    """A Llama-shaped bf16 checkpoint with random weights, generated on the GPU, written in shards."""
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": hd,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "bfloat16", **shape}  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,))]
    if not shape["tie_word_embeddings"]:
        tensors.append(("lm_head.weight", (v, h)))
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict = {}
    size, weight_map, files = 0, {}, []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, shp in tensors:
        if len(shp) == 1:
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shp, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes * (len(files) + 1):
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, f)
    return path


# --dry-run: the same code on CPU with tiny shapes, to check the script before spending device time.
DRY = {"cpu": dict(gpu_bytes=2 * GiB, chunk_bytes=2 * MiB, host_cache_bytes=512 * MiB)}
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128256,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _greedy(eng, prompt: list[int], n: int) -> list[int]:
    from gpu_runtime import SamplingParams

    return eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].token_ids


def _checksum(buffer: torch.Tensor, nbytes: int) -> int:
    return int(buffer[:nbytes].view(torch.int32).sum(dtype=torch.int64))


def _weights_match_files(host, name: str) -> bool:
    """Every tensor in the model's pool range equals the tensor in its safetensors file."""
    from safetensors import safe_open

    m = host.models[name]
    buffer = host.pool.view(m.weights)
    by_file: dict[str, list] = {}
    for s in m.layout.slots:
        by_file.setdefault(s.file, []).append(s)
    for file, slots in by_file.items():
        with safe_open(file, framework="pt", device=str(host.device)) as f:
            for s in slots:
                if not torch.equal(m.layout.view(buffer, s.name), f.get_tensor(s.name).to(m.dtype)):
                    print(f"MISMATCH {name} {s.name}", flush=True)
                    return False
    return True


def _first_token_s(eng, prompt: list[int]) -> float:
    from gpu_runtime import SamplingParams

    t0 = time.perf_counter()
    out = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 1
    return time.perf_counter() - t0


def bench_big(res: dict, path: str, device: str = "cuda:0") -> None:
    """Llama-3-8B-shaped bf16: DISK(page cache)->HOT, HOST->HOT, WARM->first token, and the two baselines."""
    from gpu_runtime.memory import ModelHost

    dry = device == "cpu"
    host = ModelHost(device, **DRY.get(device, dict(host_cache_bytes=20 * GiB)))
    t0 = time.perf_counter()
    host.host_cache.grow(256 * MiB if dry else 17 * GiB)
    res["host_cache_pin_s"] = time.perf_counter() - t0
    host.register("llama8b", path, "bfloat16", kv_bytes=64 * MiB if dry else 8 * GiB)
    wbytes = host.models["llama8b"].layout.total_bytes
    res["weights_bytes"] = wbytes
    t0 = time.perf_counter()
    eng = host.activate("llama8b")  # COLD -> HOST -> WARM -> HOT
    _sync()
    res["disk_to_hot_s"] = time.perf_counter() - t0
    res["weights_match_files_after_disk_to_hot"] = _weights_match_files(host, "llama8b")
    buffer = host.pool.view(host.models["llama8b"].weights)
    addr, checksum = buffer.data_ptr(), _checksum(buffer, wbytes)
    prompt = torch.randint(3, 128000, (512,)).tolist()
    first_eng = eng
    decode_tokens = _greedy(eng, prompt, 8)  # captures decode CUDA graphs for this KV address
    graphs = len(eng.runner.graphs)
    stable = True
    for _ in range(3):
        _first_token_s(eng, prompt)
    res["prefill_ms"] = _median([_first_token_s(eng, prompt) for _ in range(7)]) * 1e3
    warm, hot = [], []
    for _ in range(5):
        host.deactivate("llama8b")
        t0 = time.perf_counter()
        eng = host.activate("llama8b")
        warm.append(time.perf_counter() - t0 + _first_token_s(eng, prompt))
        host.evict("llama8b", "HOST")
        _sync()
        t0 = time.perf_counter()
        eng = host.activate("llama8b")
        _sync()
        hot.append(time.perf_counter() - t0)
        stable &= eng is first_eng and buffer.data_ptr() == addr and _checksum(buffer, wbytes) == checksum
    # Same engine, same addresses, same tokens, and the decode graphs were replayed, not captured again.
    res["same_tokens_after_cycles"] = _greedy(eng, prompt, 8) == decode_tokens
    res["decode_graphs_reused"] = len(eng.runner.graphs) == graphs
    res["weights_address_and_checksum_stable"] = bool(stable)
    res["weights_match_files_after_cycles"] = _weights_match_files(host, "llama8b")
    res["warm_to_first_token_ms"] = _median(warm) * 1e3
    res["host_to_hot_s"] = _median(hot)
    res["host_to_hot_gbps"] = wbytes / res["host_to_hot_s"] / 1e9
    res["report_after_big"] = {k: v for k, v in host.report().items() if k != "models"}
    print({k: res[k] for k in ("disk_to_hot_s", "prefill_ms", "warm_to_first_token_ms", "host_to_hot_s",
                               "host_to_hot_gbps")}, flush=True)  # fmt: skip
    host.evict("llama8b", "COLD")
    host.close()
    del eng, host
    _free()
    res["safetensors_load_s"] = _safetensors_load(path, device)
    res["transformers_load_s"] = _transformers_load(path, device)
    print({k: res[k] for k in ("safetensors_load_s", "transformers_load_s")}, flush=True)


def _safetensors_load(path: str, device: str) -> float:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    tensors = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            tensors.update({k: v.to(device) for k, v in load_file(os.path.join(path, f)).items()})
    _sync()
    dt = time.perf_counter() - t0
    del tensors
    _free()
    return dt


def _transformers_load(path: str, device: str) -> float:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    _sync()
    dt = time.perf_counter() - t0
    del model
    _free()
    return dt


def bench_switch(res: dict, path: str, rounds: int = 3, device: str = "cuda:0") -> None:
    """As many 1B-shaped models WARM as fit; round-robin activate -> first token -> deactivate."""
    from gpu_runtime.memory import ModelHost

    mem = DRY.get(device, dict(host_cache_bytes=8 * GiB))
    host = ModelHost(device, engine_kwargs=dict(max_num_seqs=8), **mem)
    kv = 16 * MiB if device == "cpu" else 1 * GiB
    host.register("m0", path, "bfloat16", kv_bytes=kv)
    w = host.models["m0"].weights.n_slots
    n_max = (host.pool.capacity - host.pool.n_chunks(kv)) // w
    for i in range(1, n_max):
        host.register(f"m{i}", path, "bfloat16", kv_bytes=kv)
    t0 = time.perf_counter()
    for i in range(n_max):
        host.prewarm(f"m{i}")
    res["switch_models_max"] = n_max
    res["switch_prewarm_all_s"] = time.perf_counter() - t0
    prompt = torch.randint(3, 128000, (32,)).tolist()
    counts = sorted({c for c in (1, 2, 4, 8, 16, 32, n_max) if c <= n_max})
    by_count, activate_only = {}, {}
    prev = None
    for count in counts:
        full, act = [], []
        for r in range(rounds + 1):
            for i in range(count):
                name = f"m{i}"
                t0 = time.perf_counter()
                if prev is not None:  # with one model: its own HOT -> WARM -> HOT
                    host.deactivate(prev)
                eng = host.activate(name)
                t1 = time.perf_counter()
                ft = _first_token_s(eng, prompt)
                prev = name
                if r:  # round 0 warms up (kernels, first use of each engine)
                    act.append(t1 - t0)
                    full.append(t1 - t0 + ft)
        by_count[count] = _median(full) * 1e3
        activate_only[count] = _median(act) * 1e3
        print(f"models={count}: switch+first token {by_count[count]:.2f} ms, switch {activate_only[count]:.2f} ms",
              flush=True)  # fmt: skip
    res["switch_ms_by_model_count"] = by_count
    res["switch_activate_only_ms_by_model_count"] = activate_only
    assert all(s in ("WARM", "HOT") for s in (m["state"] for m in host.report()["models"].values()))
    host.close()


def bench_lending(res: dict, path: str, device: str = "cuda:0") -> None:
    """A HOT lender's idle KV pages hold a WARM borrower; then the lender's load needs them back.

    The pool is sized so that the lender (weights + 4 GiB KV) fills it exactly: the borrower fits only on lent
    pages. 64 requests of 1000 tokens need more KV than the lender kept, so its engine's pressure hook evicts
    the borrower to HOST mid-run. Tokens must equal those of the same requests run without lending.
    """
    from gpu_runtime import SamplingParams
    from gpu_runtime.memory import ModelHost

    dry = device == "cpu"
    chunk = 2 * MiB if dry else 64 * MiB
    kv = 128 * MiB if dry else 4 * GiB
    probe = ModelHost(device, gpu_bytes=64 * GiB if not dry else GiB, chunk_bytes=chunk, host_cache_bytes=chunk)
    probe.register("p", path, "bfloat16", kv_bytes=chunk)
    w = probe.models["p"].weights.n_slots
    probe.close()
    host = ModelHost(device, gpu_bytes=(w + kv // chunk) * chunk, chunk_bytes=chunk, host_cache_bytes=8 * GiB)
    host.register("lender", path, "bfloat16", kv_bytes=kv)
    host.register("borrower", path, "bfloat16", kv_bytes=chunk)
    eng = host.activate("lender")
    n, plen = (8, 120) if dry else (64, 1000)
    g = torch.Generator().manual_seed(3)
    batch = [torch.randint(3, 128000, (plen,), generator=g).tolist() for _ in range(n)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    need = n * -(-(plen + 16) // eng.block_size)
    t0 = time.perf_counter()
    ref = [o.token_ids for o in eng.generate(batch, params)]
    res["lending_generate_no_loan_s"] = time.perf_counter() - t0
    host.prewarm("borrower")
    rep = host.report()
    res["lending_borrowed_chunks"] = rep["models"]["borrower"]["weight_chunks_borrowed"]
    res["lending_limit_blocks_while_lent"] = eng.blocks.limit
    res["lending_blocks_needed"] = need
    reclaims = []
    hook = eng.kv_pressure_hook

    def timed(more: int) -> int:
        t = time.perf_counter()
        given = hook(more)
        reclaims.append((time.perf_counter() - t) * 1e3)
        return given

    eng.kv_pressure_hook = timed
    t0 = time.perf_counter()
    out = [o.token_ids for o in eng.generate(batch, params)]
    res["lending_generate_with_reclaim_s"] = time.perf_counter() - t0
    res["lending_reclaim_ms"] = reclaims
    res["lending_borrower_state_after"] = host.state("borrower").name
    res["lending_same_tokens"] = sum(a == b for a, b in zip(out, ref, strict=True)) / len(ref)
    host.check()
    print({k: v for k, v in res.items() if k.startswith("lending")}, flush=True)
    host.close()


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gpu_runtime.engine.engine").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["vmm", "all"], default="all")
    ap.add_argument(
        "--out", help="default: bench/results/memory.json ($OUT/ on the lent GPU); --part vmm: memory_vmm.json"
    )
    ap.add_argument("--models", default="/tmp/warmserve-bench")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU; checks the script, measures nothing")
    args = ap.parse_args()
    name = "memory.json" if args.part == "all" else "memory_vmm.json"
    args.out = args.out or os.path.join(os.environ.get("OUT", "bench/results"), name)
    if args.dry_run:
        res: dict = {}
        big = write_model(os.path.join(args.models, "dry8b"), {**TINY, "tie_word_embeddings": False}, 4 * MiB, 0, "cpu")
        small = write_model(
            os.path.join(args.models, "dry1b"), {**TINY, "tie_word_embeddings": True}, 4 * MiB, 0, "cpu"
        )
        bench_big(res, big, "cpu")
        bench_switch(res, small, 1, "cpu")
        bench_lending(res, small, "cpu")
        print(json.dumps(res, indent=1))
        return
    res = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["command"] = "python3 bench/memory.py --part " + args.part
    res.update(vmm_check())
    res["chunk_costs"] = chunk_costs()
    res["pinned_h2d_gbps"] = pinned_h2d_gbps()
    be = CudaVmmBackend(torch.device("cuda:0"), 512 * MiB)
    hs = [be.create_chunk() for _ in range(8)]
    rng = be.reserve(8)
    be.map(rng, list(enumerate(hs)))
    res["pinned_h2d_into_vmm_gbps"] = pinned_h2d_gbps(into=be.view(rng))
    be.unmap(rng, list(range(8)))
    for h in hs:
        be.release_chunk(h)
    be.close()
    print({k: res[k] for k in ("pinned_h2d_gbps", "pinned_h2d_into_vmm_gbps")}, flush=True)
    if args.part == "all":
        t0 = time.perf_counter()
        big = write_model(os.path.join(args.models, "llama3-8b"), LLAMA3_8B)
        small = write_model(os.path.join(args.models, "llama3.2-1b"), LLAMA32_1B)
        res["generate_models_s"] = time.perf_counter() - t0
        print(f"models written in {res['generate_models_s']:.1f} s", flush=True)
        _save(res, args.out)
        bench_big(res, big)
        _save(res, args.out)
        bench_switch(res, small)
        _save(res, args.out)
        bench_lending(res, small)
        res["targets"] = {
            "warm_to_first_token_ok": res["warm_to_first_token_ms"] <= res["prefill_ms"] + 20,
            "host_to_hot_ok": res["host_to_hot_gbps"] >= 0.85 * res["pinned_h2d_gbps"],
        }
    _save(res, args.out)
    print(json.dumps(res, indent=1), flush=True)


def _save(res: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
