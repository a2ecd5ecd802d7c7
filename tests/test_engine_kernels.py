"""The engine's Triton kernels on CPU through Triton's interpreter, against their torch references at small shapes:
the batch-1 GEMV (bf16 and FP8 weights, several rows per program) and the paged decode attention with its
split-context variant.

Skipped without triton (the CI venv has none). The interpreter must be on before triton is first imported, so this
file sets TRITON_INTERPRET=1 itself and skips when an earlier test file imported the kernels compiled for a GPU: run
it alone (``pytest tests/test_engine_kernels.py``) or with TRITON_INTERPRET=1 in the environment. The interpreter's
tl.dot multiplies bfloat16 as integers, so attention is checked in float16 (the kernel is the same for both).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from gpu_runtime import fp8  # noqa: E402
from gpu_runtime.engine import attention, ops  # noqa: E402

pytestmark = pytest.mark.skipif(
    not isinstance(ops._gemv_kernel, InterpretedFunction),
    reason="triton was imported before TRITON_INTERPRET=1: run this file alone or with TRITON_INTERPRET=1",
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# batch-1 GEMV ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("block_k", [32, 128])
@pytest.mark.parametrize("quantized", [False, True])
def test_gemv_matches_float32(rows: int, block_k: int, quantized: bool):
    g = torch.Generator().manual_seed(rows * block_k)
    n, k = 37, 96  # N not a multiple of ROWS, K not of BLOCK_K (or shorter than it)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    if quantized:
        w, scale = fp8.quantize_rows(w)
        dense = w.float() * scale[:, None]
    else:
        scale, dense = None, w.float()
    want = x.float() @ dense.T + bias.float()
    out = ops.gemv(x, w, bias, scale, ops.GemvConfig(rows, block_k, num_warps=4, num_stages=1))
    assert out.shape == (1, n) and out.dtype == torch.bfloat16
    assert rel_err(out, want) < 5e-3  # the bf16 rounding of the output


@pytest.mark.parametrize("quantized", [False, True])
def test_linear_takes_the_gemv_with_the_default_configs(monkeypatch, quantized: bool):
    monkeypatch.setattr(ops, "_fused", lambda t: True)  # the CUDA dispatch, on CPU tensors
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    w = torch.randn(80, 256, generator=g).to(torch.bfloat16)
    weight = fp8.Fp8Weight(*fp8.quantize_rows(w)) if quantized else w
    want = fp8.emulated_linear(x, weight) if quantized else (x.float() @ w.float().T)
    assert rel_err(ops.linear(x, weight), want) < 5e-3


def test_gemv_shape_override(monkeypatch):
    cfg = ops.GemvConfig(4, 1024, 8, 2)
    monkeypatch.setitem(ops.GEMV_SHAPES, ("fp8", 80, 256), cfg)
    assert ops.gemv_config(True, 80, 256) == cfg
    assert ops.gemv_config(False, 80, 256) == ops.GEMV_CONFIG["bf16"]


# paged decode attention ------------------------------------------------------------------------------------------


def decode_case(heads: int, kv_heads: int, lens: list[int], shared: bool = False, seed: int = 0):
    """q, caches, block tables and lengths. Each row has its own pages, or with ``shared`` all rows have one
    sequence's; cache slots no row reads hold NaN (a recycled page may hold anything)."""
    g = torch.Generator().manual_seed(seed)
    bs, d = 16, 64
    width = -(-max(lens) // bs) + 8
    blocks = width if shared else width * len(lens)
    cache = torch.randn(blocks, 2, bs, kv_heads, d, generator=g).to(torch.float16)
    pages = torch.randperm(blocks, generator=g).view(-1, width)
    tables = pages.repeat(len(lens), 1) if shared else pages
    for table, n in zip(tables, [max(lens)] * len(lens) if shared else lens, strict=True):
        for p in range(n, width * bs):
            cache[table[p // bs], :, p % bs] = float("nan")
    q = torch.randn(len(lens), heads, d, generator=g).to(torch.float16)
    return q, cache[:, 0], cache[:, 1], tables.int(), torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_paged_decode_matches_torch(heads: int, kv_heads: int, splits: int):
    lens = [1, 16, 17, 100, 333, 0]  # 0: a CUDA graph padding row
    q, k, v, tables, lengths = decode_case(heads, kv_heads, lens)
    want = attention.paged_decode_torch(q[:5], k, v, tables[:5].long(), lengths[:5])
    out = attention.paged_decode_triton(q, k, v, tables, lengths, splits=splits)
    assert torch.isfinite(out).all()
    assert rel_err(out[:5], want) < 2e-3
    assert out[5].abs().max() == 0  # no context: zeros, as the unsplit kernel writes


def test_split_decode_matches_unsplit_on_a_prefix_hit():
    # 16 rows of one sequence over a long cached prefix (the prefix-cache hit's tail run as decode rows).
    lens = list(range(1009, 1025))
    q, k, v, tables, lengths = decode_case(8, 2, lens, shared=True, seed=1)
    splits = attention.decode_splits(len(lens), 2, tables.shape[1] * k.shape[1], q.device)
    assert splits > 1
    one = attention.paged_decode_triton(q, k, v, tables, lengths, splits=1)
    split = attention.paged_decode_triton(q, k, v, tables, lengths)
    want = attention.paged_decode_torch(q, k, v, tables.long(), lengths)
    assert rel_err(split, one) < 2e-3 and rel_err(split, want) < 2e-3


def test_decode_splits_by_rows():
    cpu = torch.device("cpu")  # 132 SMs assumed, as an H100
    assert attention.decode_splits(1, 8, 8192, cpu) == attention.MAX_SPLITS
    assert attention.decode_splits(16, 8, 8192, cpu) == 5  # 128 programs -> about 4 a SM
    assert attention.decode_splits(64, 8, 8192, cpu) == 1  # 512 programs fill the GPU
    assert attention.decode_splits(1, 8, 512, cpu) == 2  # no split shorter than MIN_SPLIT_TOKENS
