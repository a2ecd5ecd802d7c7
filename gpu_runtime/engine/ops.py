"""The elementwise parts of a layer: residual add + RMSNorm, q/k norm + rotary + KV store, SiLU-and-mul.

On CPU they are plain torch ops in transformers' order. On CUDA each is ONE Triton kernel: at batch 1 a decode
step is ~35 tiny kernels per layer in torch, and their launch gaps (even inside a CUDA graph) cost as much as
reading the weights. The kernels round to the activation dtype at the same points torch does (each torch op
rounds its result), so CUDA results stay close to transformers'.

At one row (batch-1 decode) the norm and SiLU-mul are folded into a Triton GEMV that reads the weight once:
cuBLAS's batch-1 GEMM leaves bandwidth unused on the 4-70 MB matrices of small models, and every kernel saved is
a launch gap saved inside the decode graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_runtime.engine.attention import AttnMeta, store_kv

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


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual), weight, bias), x + residual): the norm before QKV and before gate-up."""
    if not _gemv_ok(x, weight):
        x, residual = add_rms_norm(x, residual, norm, eps)
        return F.linear(x, weight, bias), residual
    res_out = torch.empty_like(x) if residual is not None else x
    out = _gemv(x, weight, bias, residual, norm, res_out, eps, prologue=1)
    return out, res_out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear; the O projection's GEMV at one row."""
    return _gemv(x, weight, prologue=0) if _gemv_ok(x, weight) else F.linear(x, weight)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(silu(gate) * up, weight): the down projection."""
    if not _gemv_ok(gate_up, weight):
        return F.linear(silu_and_mul(gate_up), weight)
    return _gemv(gate_up, weight, prologue=2)


def _gemv(x, weight, bias=None, residual=None, norm=None, res_out=None, eps=0.0, prologue=0) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    # Every resident program keeps a [BLOCK_N, BLOCK_K] weight tile in flight: n * BLOCK_K * 2 bytes in all,
    # enough to cover HBM latency for n >= 2048. Wider rows per program for tall matrices amortise re-reading
    # (and, for the norm prologue, re-normalising) x from L2.
    block_n = 4 if n <= 8192 else 8
    block_k = min(1024, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm if norm is not None else x, weight,
        bias if bias is not None else x, out, res_out if res_out is not None else x, eps, n, weight.stride(0),
        K=k, PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=block_n,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        X, R, NW, W, B, OUT, RES_OUT, eps, N, stride_w,
        K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # out[n] = sum_k W[n, k] * x[k] for BLOCK_N rows per program, x transformed on the fly:
        # PROLOGUE 0: x as is; 1: rms_norm(x + residual) (program 0 also writes x + residual);
        # 2: silu(x[:K]) * x[K:] (the fused gate-up output). Roundings match add_rms_norm / silu_and_mul.
        pid = tl.program_id(0)
        dtype = OUT.dtype.element_ty
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        kk = tl.arange(0, BLOCK_K)
        inv = 1.0
        if PROLOGUE == 1:
            sq = tl.zeros([BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = _residual_sum(X, R, k0 + kk, k0 + kk < K, HAS_RESIDUAL).to(tl.float32)
                sq += x * x
            inv = tl.rsqrt(tl.sum(sq, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            kmask = k < K
            if PROLOGUE == 1:
                x = _residual_sum(X, R, k, kmask, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    tl.store(RES_OUT + k, x, mask=kmask & (pid == 0))
                w_norm = tl.load(NW + k, mask=kmask, other=0.0).to(tl.float32)
                x = ((x.to(tl.float32) * inv).to(dtype).to(tl.float32) * w_norm).to(dtype)
            elif PROLOGUE == 2:
                g = tl.load(X + k, mask=kmask, other=0.0).to(tl.float32)
                u = tl.load(X + K + k, mask=kmask, other=0.0).to(tl.float32)
                x = ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u).to(dtype)
            else:
                x = tl.load(X + k, mask=kmask, other=0.0)
            w = tl.load(W + rows[:, None].to(tl.int64) * stride_w + k[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(OUT + rows, y.to(dtype), mask=rmask)

    @triton.jit
    def _residual_sum(X, R, k, kmask, HAS_RESIDUAL: tl.constexpr):
        x = tl.load(X + k, mask=kmask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(R + k, mask=kmask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        return x

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
