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
    torch.cuda.synchronize()
    # Remap slot 1 to a fresh chunk holding other bytes: same address, new content, graph sees it.
    be.unmap(rng, [1])
    be.map(rng, [(1, chunks[4])])
    fresh = torch.randn(be.chunk_bytes // 4, device="cuda")
    view[be.chunk_bytes : 2 * be.chunk_bytes].copy_(fresh.view(torch.uint8))
    g.replay()
    torch.cuda.synchronize()
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
        torch.cuda.synchronize()
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
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst[:nbytes].copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["vmm", "all"], default="all")
    ap.add_argument("--out", default="bench/results/memory.json")
    args = ap.parse_args()
    res: dict = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    res.update(vmm_check())
    print(res, flush=True)
    res["chunk_costs"] = chunk_costs()
    res["pinned_h2d_gbps"] = pinned_h2d_gbps()
    be = CudaVmmBackend(torch.device("cuda:0"), 512 * MiB)
    hs = [be.create_chunk() for _ in range(8)]
    rng = be.reserve(8)
    be.map(rng, list(enumerate(hs)))
    res["pinned_h2d_into_vmm_gbps"] = pinned_h2d_gbps(into=be.view(rng))
    print({k: res[k] for k in ("pinned_h2d_gbps", "pinned_h2d_into_vmm_gbps")}, flush=True)
    if args.part == "vmm":
        out = os.path.join(os.environ.get("OUT", "/tmp"), "memory_vmm.json")
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        return


if __name__ == "__main__":
    main()
