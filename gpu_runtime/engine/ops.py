"""The elementwise parts of a layer: residual add + RMSNorm, q/k norm + rotary + KV store, SiLU-and-mul.

On CPU they are plain torch ops in transformers' order. On CUDA each is ONE Triton kernel: at batch 1 a decode
step is ~35 tiny kernels per layer in torch, and their launch gaps (even inside a CUDA graph) cost as much as
reading the weights. The kernels round to the activation dtype at the same points torch does (each torch op
rounds its result), so CUDA results stay close to transformers'.

The projections at one row (batch-1 decode) are a Triton GEMV: cuBLAS's batch-1 GEMM leaves bandwidth unused on
the 8-120 MB matrices of 1B-8B models (measured in a CUDA graph on the H200, weights rotated past L2, cuBLAS vs
this kernel: 6.2 vs 4.4 us for 2048x2048, 13.6 vs 10.7 us for 2048x8192, 31.6 vs 28.6 us for 4096x14336).
The same GEMV reads FP8 weights and applies their per-row scale (gpu_runtime/fp8.py has the other FP8 paths).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from gpu_runtime.engine.attention import AttnMeta, store_kv
from gpu_runtime.fp8 import Fp8Weight, fp8_linear

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def _fused(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); with ``residual=None`` the sum is ``x`` itself."""
    if not _fused(x):
        if residual is not None:
            x = x + residual
        return rms_norm(x, weight, eps), x
    n = x.shape[-1]
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, weight, out, res_out, eps,
        N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None,
    )  # fmt: skip
    return out, res_out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qkv_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: tuple[int, int, int],
    qk_norm: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMeta,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused QKV output, apply q/k norm (Qwen3) and rotary, write K/V to the cache.
    Returns q [T, H, D], k [T, KVH, D] (rotated) and v [T, KVH, D]."""
    num_heads, num_kv, d = heads
    q, k, v = qkv.split([num_heads * d, num_kv * d, num_kv * d], dim=-1)
    q, k, v = q.view(-1, num_heads, d), k.view(-1, num_kv, d), v.view(-1, num_kv, d)
    if not _fused(qkv) or d % 2:
        if qk_norm is not None:
            q, k = rms_norm(q, qk_norm[0], eps), rms_norm(k, qk_norm[1], eps)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        store_kv(k, v, k_cache, v_cache, meta)
        return q, k, v
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    norm_q, norm_k = qk_norm if qk_norm is not None else (cos, cos)
    _qkv_rope_store_kernel[(qkv.shape[0], 3)](
        qkv, positions, cos, sin, norm_q, norm_k, q_out, k_out, k_cache, v_cache,
        meta.slot_block, meta.slot_offset, eps, qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        H=num_heads, KVH=num_kv, D=d, H_PAD=triton.next_power_of_2(num_heads),
        KVH_PAD=triton.next_power_of_2(num_kv), HALF_PAD=triton.next_power_of_2(d // 2),
        QK_NORM=qk_norm is not None,
    )  # fmt: skip
    return q_out, k_out, v


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused [T, 2I] gate-up output."""
    if not _fused(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), N=n, BLOCK=block)
    return out


def _gemv_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _fused(x) and x.shape[0] == 1 and weight.stride(1) == 1


class GemvConfig(NamedTuple):
    rows: int  # output rows per program (a power of 2)
    block_k: int  # K tile width (a power of 2)
    num_warps: int
    num_stages: int


# The batch-1 GEMV's launch configuration per weight dtype. One row per program and 2048-wide K tiles were the best
# single bf16 choice over the Llama 1B/8B projections in a sweep of rows (1-8), tile width (512-2048), warps and
# stages; FP8 rows take 4096-wide tiles, the same bytes per load (not swept). bench/gemv_sweep.py sweeps both on
# the device and prints the best entry per dtype (and per shape, for GEMV_SHAPES) ready to paste here.
GEMV_CONFIG: dict[str, GemvConfig] = {
    "bf16": GemvConfig(rows=1, block_k=2048, num_warps=4, num_stages=1),
    "fp8": GemvConfig(rows=1, block_k=4096, num_warps=4, num_stages=1),
}
# Per-shape overrides, keyed by (dtype, N, K): empty until a sweep shows a shape that gains from its own config.
GEMV_SHAPES: dict[tuple[str, int, int], GemvConfig] = {}


def gemv_config(fp8: bool, n: int, k: int) -> GemvConfig:
    dtype = "fp8" if fp8 else "bf16"
    return GEMV_SHAPES.get((dtype, n, k), GEMV_CONFIG[dtype])


def linear(x: torch.Tensor, weight: torch.Tensor | Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (or the FP8 linear); a Triton GEMV for one contiguous row on CUDA."""
    fp8 = isinstance(weight, Fp8Weight)
    w = weight.weight if fp8 else weight
    if not _gemv_ok(x, w) or not x.is_contiguous():
        return fp8_linear(x, weight, bias) if fp8 else F.linear(x, weight, bias)
    return gemv(x, w, bias, weight.scale if fp8 else None, gemv_config(fp8, *w.shape))


def gemv(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None, cfg: GemvConfig
) -> torch.Tensor:
    """``x`` [1, K] @ ``w`` [N, K]^T (times ``scale`` [N], plus ``bias`` [N]) -> [1, N] in x's dtype, one Triton
    launch. Separate from ``linear`` so bench/gemv_sweep.py times every configuration through the same code."""
    n, k = w.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_k = min(cfg.block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, cfg.rows),)](
        x, w, bias if bias is not None else x, scale if scale is not None else x, out, n, w.stride(0),
        K=k, ROWS=cfg.rows, BLOCK_K=block_k, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _gemv_kernel(X, W, B, S, OUT, N, stride_w, K: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr):  # fmt: skip
        # ROWS output rows per program: fewer, longer programs (more bytes in flight each) for the large matrices.
        # Rows past N (the last program of an N not divisible by ROWS) read row N - 1 again and are not stored, so
        # no weight load needs a row mask.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        w_rows = W + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_w
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([ROWS, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            if K % BLOCK_K == 0:
                acc += tl.load(w_rows + k[None, :]).to(tl.float32) * tl.load(X + k).to(tl.float32)[None, :]
            else:
                m = k < K
                w = tl.load(w_rows + k[None, :], mask=m[None, :], other=0.0).to(tl.float32)
                acc += w * tl.load(X + k, mask=m, other=0.0).to(tl.float32)[None, :]
        y = tl.sum(acc, 1)
        live = rows < N
        if HAS_SCALE:  # FP8 rows: their per-channel scales
            y *= tl.load(S + rows, mask=live, other=0.0)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=live, other=0.0).to(tl.float32)
        tl.store(OUT + rows, y.to(OUT.dtype.element_ty), mask=live)

    @triton.jit
    def _add_rms_norm_kernel(X, R, W, OUT, RES_OUT, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * N
        i = tl.arange(0, BLOCK)
        mask = i < N
        x = tl.load(X + row + i, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(R + row + i, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            tl.store(RES_OUT + row + i, x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        y = (xf * inv).to(X.dtype.element_ty).to(tl.float32) * tl.load(W + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row + i, y.to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(x1, x2, c, s, dtype: tl.constexpr):
        """Rotate-half rotary with torch's roundings: (x*cos) + (rotate_half(x)*sin), each op rounded."""
        a1 = (x1.to(tl.float32) * c).to(dtype).to(tl.float32)
        b1 = (-x2.to(tl.float32) * s).to(dtype).to(tl.float32)
        a2 = (x2.to(tl.float32) * c).to(dtype).to(tl.float32)
        b2 = (x1.to(tl.float32) * s).to(dtype).to(tl.float32)
        return (a1 + b1).to(dtype), (a2 + b2).to(dtype)

    @triton.jit
    def _head_norm(x1, x2, W, half, hmask, eps, D: tl.constexpr, dtype: tl.constexpr):
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / D + eps)[:, None]
        w1 = tl.load(W + half, mask=hmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + D // 2 + half, mask=hmask, other=0.0).to(tl.float32)[None, :]
        y1 = ((f1 * inv).to(dtype).to(tl.float32) * w1).to(dtype)
        y2 = ((f2 * inv).to(dtype).to(tl.float32) * w2).to(dtype)
        return y1, y2

    @triton.jit
    def _qkv_rope_store_kernel(
        QKV, POS, COS, SIN, QN, KN, Q_OUT, K_OUT, KC, VC, SLOT_BLOCK, SLOT_OFF, eps,
        stride_t, stride_cos, stride_cb, stride_ct,
        H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, KVH_PAD: tl.constexpr,
        HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr,
    ):  # fmt: skip
        # program (token, part): part 0 rotates the q heads, 1 the k heads (and caches them), 2 caches v.
        t = tl.program_id(0)
        part = tl.program_id(1)
        dtype = Q_OUT.dtype.element_ty
        half = tl.arange(0, HALF_PAD)
        hmask = half < D // 2
        row = QKV + t.to(tl.int64) * stride_t
        pos = tl.load(POS + t).to(tl.int64)
        block = tl.load(SLOT_BLOCK + t).to(tl.int64)
        cache_off = block * stride_cb + tl.load(SLOT_OFF + t).to(tl.int64) * stride_ct
        c = tl.load(COS + pos * stride_cos + half, mask=hmask, other=0.0).to(tl.float32)[None, :]
        s = tl.load(SIN + pos * stride_cos + half, mask=hmask, other=0.0).to(tl.float32)[None, :]
        if part == 0:
            h = tl.arange(0, H_PAD)
            m = (h < H)[:, None] & hmask[None, :]
            src = row + h[:, None] * D + half[None, :]
            x1 = tl.load(src, mask=m, other=0.0)
            x2 = tl.load(src + D // 2, mask=m, other=0.0)
            if QK_NORM:
                x1, x2 = _head_norm(x1, x2, QN, half, hmask, eps, D, dtype)
            y1, y2 = _rope_heads(x1, x2, c, s, dtype)
            dst = Q_OUT + t.to(tl.int64) * H * D + h[:, None] * D + half[None, :]
            tl.store(dst, y1, mask=m)
            tl.store(dst + D // 2, y2, mask=m)
        else:
            hk = tl.arange(0, KVH_PAD)
            mk = (hk < KVH)[:, None] & hmask[None, :]
            srck = row + (H + (part - 1) * KVH) * D + hk[:, None] * D + half[None, :]
            k1 = tl.load(srck, mask=mk, other=0.0)
            k2 = tl.load(srck + D // 2, mask=mk, other=0.0)
            store = mk & (block >= 0)
            off = cache_off + hk[:, None] * D + half[None, :]
            if part == 1:
                if QK_NORM:
                    k1, k2 = _head_norm(k1, k2, KN, half, hmask, eps, D, dtype)
                k1, k2 = _rope_heads(k1, k2, c, s, dtype)
                dstk = K_OUT + t.to(tl.int64) * KVH * D + hk[:, None] * D + half[None, :]
                tl.store(dstk, k1, mask=mk)
                tl.store(dstk + D // 2, k2, mask=mk)
                tl.store(KC + off, k1, mask=store)
                tl.store(KC + off + D // 2, k2, mask=store)
            else:
                tl.store(VC + off, k1, mask=store)
                tl.store(VC + off + D // 2, k2, mask=store)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, stride_t, N: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        g = tl.load(GU + t * stride_t + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + t * stride_t + N + i, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + t * N + i, (a * u).to(OUT.dtype.element_ty), mask=mask)
