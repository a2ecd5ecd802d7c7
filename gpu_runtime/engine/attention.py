"""Attention over the paged KV cache.

KV cache layout: one flat buffer of ``num_blocks`` blocks, block-major (``[block, layer, k|v, slot, kv_head,
head_dim]``), so block ``b`` is the byte range ``[b * kv_block_bytes, (b + 1) * kv_block_bytes)`` and the top of
the buffer can be unmapped or lent. Each layer sees strided ``[num_blocks, block_size, kv_heads, head_dim]`` views.

Prefill: new K/V are written to their slots, then per-sequence SDPA (flash on CUDA) runs on the fresh K/V, or on
K/V gathered from the cache when part of the sequence was computed before (chunked prefill, recompute).
Decode: a Triton paged-attention kernel on CUDA (graph-capturable: all sizes come from tensors), a torch gather
+ SDPA reference on CPU. With few (row, kv head) programs and long contexts (a prefix hit's 16 rows over 2048 cached
tokens: 128 programs on a 132-SM H100, each reading its whole context alone) the kernel splits each row's context
into chunks handled by separate programs (flash-decoding): each writes its chunk's running max, softmax sum and
unnormalized output to a scratch buffer, and a second small kernel combines the chunks. The split count depends
only on the shapes (rows, kv heads, block-table width), so a captured graph keeps it; the chunk length follows each
row's actual length inside the kernel, so every split of a short context has work or none (then it stores nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch paths below are used.
    triton = None


@dataclass
class PrefillSeq:
    q_start: int  # rows of this sequence's new tokens in the flattened batch
    q_end: int
    num_cached: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # int64 block ids covering num_cached + new tokens


@dataclass
class AttnMeta:
    is_prefill: bool
    slot_block: torch.Tensor  # [T] block id of each new token (-1: skip; CUDA graph padding)
    slot_offset: torch.Tensor  # [T] position inside the block
    prefill: list[PrefillSeq] | None = None
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # decode: [B] int32, including the new token


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta):
    """Write new K/V ([T, kv_heads, head_dim]) into their cache slots."""
    if k.is_cuda and triton is not None:
        n = k.shape[1] * k.shape[2]
        _store_kv_kernel[(k.shape[0],)](
            k, v, k_cache, v_cache, meta.slot_block, meta.slot_offset,
            k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1),
            N=n, N_PAD=triton.next_power_of_2(n),
        )  # fmt: skip
        return
    k_cache[meta.slot_block, meta.slot_offset] = k
    v_cache[meta.slot_block, meta.slot_offset] = v


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta
) -> torch.Tensor:
    """Causal attention for each sequence's new tokens; q [T, H, D], k/v [T, KVH, D] -> [T, H, D]."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for s in meta.prefill:
        qs = q[s.q_start : s.q_end].transpose(0, 1).unsqueeze(0)
        n = s.q_end - s.q_start
        if s.num_cached == 0:
            ks, vs, mask = k[s.q_start : s.q_end], v[s.q_start : s.q_end], None
        else:
            total = s.num_cached + n
            blocks = s.block_table[: -(-total // block_size)]
            ks = k_cache[blocks].flatten(0, 1)[:total]
            vs = v_cache[blocks].flatten(0, 1)[:total]
            pos = torch.arange(total, device=q.device)
            mask = pos[None, :] <= pos[s.num_cached :, None]
        o = F.scaled_dot_product_attention(
            qs,
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=True,
        )
        out[s.q_start : s.q_end] = o[0].transpose(0, 1)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    """One query token per sequence; q [B, H, D] -> [B, H, D]."""
    if q.is_cuda and triton is not None:
        return paged_decode_triton(q, k_cache, v_cache, meta.block_tables, meta.context_lens)
    return paged_decode_torch(q, k_cache, v_cache, meta.block_tables, meta.context_lens)


def paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens) -> torch.Tensor:
    """Reference paged decode: gather each sequence's blocks, mask past its length, SDPA."""
    b, _, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    nblocks = -(-int(context_lens.max()) // block_size)
    table = block_tables[:, :nblocks].long()
    ks = k_cache[table].reshape(b, nblocks * block_size, kv_heads, d).transpose(1, 2)
    vs = v_cache[table].reshape(b, nblocks * block_size, kv_heads, d).transpose(1, 2)
    mask = torch.arange(nblocks * block_size, device=q.device)[None, :] < context_lens[:, None]
    # Slots past a sequence's length hold whatever the page held before (a pool may hand out pages that held
    # other data, even NaN bit patterns); NaN survives both the -inf mask and a zero weight, so zero them first.
    live = mask[:, None, :, None]
    ks, vs = ks.masked_fill(~live, 0), vs.masked_fill(~live, 0)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=mask[:, None, None, :], enable_gqa=True)
    return o.squeeze(2)


# Split the context when the (row, kv head) programs are fewer than SPLIT_BELOW per SM, into enough chunks for about
# SPLIT_TARGET programs per SM (several resident programs per SM keep more loads in flight), at most MAX_SPLITS of at
# least MIN_SPLIT_TOKENS each over the longest context the block tables can hold. MAX_SPLITS = 1 turns splitting off
# (bench/engine.py's prefix part compares both).
SPLIT_BELOW, SPLIT_TARGET = 2, 4
MAX_SPLITS = 32
MIN_SPLIT_TOKENS = 256
PAGE_TOKENS = 64  # tokens per tile of the decode kernel (PAGES blocks of the cache)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # Triton's interpreter (CPU tests): an H100's count, so the tests take the GPU's choices
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(rows: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """How many chunks each row's context is split into; 1 when the unsplit grid already fills the GPU."""
    programs, sms = rows * kv_heads, _sm_count(device)
    if programs >= SPLIT_BELOW * sms:
        return 1
    want = -(-SPLIT_TARGET * sms // programs)
    return max(1, min(want, MAX_SPLITS, max_context // MIN_SPLIT_TOKENS))


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, splits: int | None = None) -> torch.Tensor:
    """The Triton decode kernel; ``splits`` (None: ``decode_splits``) chunks per row's context."""
    b, h, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if splits is None:
        splits = decode_splits(b, kv_heads, block_tables.shape[1] * block_size, q.device)
    group = h // kv_heads
    out = torch.empty_like(q)
    pages = max(1, PAGE_TOKENS // block_size)
    # Scratch for the split path: per (row, head, split) the running max, the softmax sum and the unnormalized
    # output (float32). Unused (never read) with one split.
    part = torch.empty(b, h, splits, d + 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    # The split count is a runtime argument (not specialized on): eager steps with other block-table widths, and so
    # other counts, reuse the same two compiled kernels (the combine kernel: one per power of two).
    _paged_decode_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, out, part, block_tables, context_lens, d**-0.5, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=d, D_PAD=triton.next_power_of_2(d), PAGES=pages, SPLIT=splits > 1,
        num_warps=4,
    )  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(b, h)](
            part, out, context_lens, splits, out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(splits), TILE=block_size * pages,
            HEAD_DIM=d, D_PAD=triton.next_power_of_2(d),
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        K, V, KC, VC, SLOT_BLOCK, SLOT_OFF, stride_k, stride_v, stride_cb, stride_ct,
        N: tl.constexpr, N_PAD: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        block = tl.load(SLOT_BLOCK + t).to(tl.int64)
        off = tl.load(SLOT_OFF + t).to(tl.int64)
        i = tl.arange(0, N_PAD)
        mask = (i < N) & (block >= 0)
        dst = block * stride_cb + off * stride_ct + i
        tl.store(KC + dst, tl.load(K + t * stride_k + i, mask=mask), mask=mask)
        tl.store(VC + dst, tl.load(V + t * stride_v + i, mask=mask), mask=mask)

    @triton.jit
    def _split_chunk(length, splits, TILE: tl.constexpr):
        """Tokens per split of a ``length``-token context: whole tiles, so only the last live split is partial."""
        return tl.cdiv(tl.cdiv(length, splits), TILE) * TILE

    @triton.jit(do_not_specialize=["splits"])
    def _paged_decode_kernel(
        Q, KC, VC, OUT, PART, TABLES, LENS, scale, splits,
        stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGES: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        # One program per (sequence, kv head, split): all GROUP query heads sharing that kv head are one tl.dot
        # tile, so GQA reads each K/V block once. Online softmax over tiles of PAGES blocks.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        length = tl.load(LENS + b)
        if not SPLIT:
            start = 0
            end = length
        else:
            chunk = _split_chunk(length, splits, BLOCK_SIZE * PAGES)
            start = tl.program_id(2) * chunk
            end = tl.minimum(start + chunk, length)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < GROUP
        dmask = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :])
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        t = tl.arange(0, BLOCK_SIZE * PAGES)
        for tile_start in range(start, end, BLOCK_SIZE * PAGES):  # no iteration for an empty split
            pos = tile_start + t
            valid = pos < end
            page = tl.load(TABLES + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            off = page * stride_cb + (pos % BLOCK_SIZE) * stride_ct + kvh * stride_ch
            kv_mask = valid[:, None] & dmask[None, :]
            k = tl.load(KC + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            v = tl.load(VC + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if not SPLIT:
            den = tl.where(den == 0.0, 1.0, den)  # length 0: CUDA graph padding rows
            out = acc / den[:, None]
            tl.store(
                OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                out.to(OUT.dtype.element_ty),
                mask=gmask[:, None] & dmask[None, :],
            )
        else:
            # PART [rows, heads, splits, HEAD_DIM + 2]: unnormalized output, then max and sum. An empty split
            # stores nothing: the combine kernel derives the live splits from the length, as this one did.
            heads_total = tl.num_programs(1) * GROUP
            row = PART + ((b * heads_total + heads) * splits + tl.program_id(2)).to(tl.int64) * (HEAD_DIM + 2)
            live = tl.where(start < length, gmask, False)
            tl.store(row[:, None] + d[None, :], acc, mask=live[:, None] & dmask[None, :])
            tl.store(row + HEAD_DIM, m, mask=live)
            tl.store(row + HEAD_DIM + 1, den, mask=live)

    @triton.jit(do_not_specialize=["splits"])
    def _combine_splits_kernel(
        PART, OUT, LENS, splits, stride_ob, stride_oh,
        SPLITS_PAD: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        # One program per (row, head): rescale each live split's output and sum to its common max.
        b = tl.program_id(0)
        h = tl.program_id(1)
        length = tl.load(LENS + b)
        chunk = tl.maximum(_split_chunk(length, splits, TILE), 1)
        sp = tl.arange(0, SPLITS_PAD)
        live = sp < tl.cdiv(length, chunk)  # none for a length-0 (graph padding) row
        d = tl.arange(0, D_PAD)
        dmask = d < HEAD_DIM
        rows = PART + ((b * tl.num_programs(1) + h) * splits + sp).to(tl.int64) * (HEAD_DIM + 2)
        m = tl.load(rows + HEAD_DIM, mask=live, other=float("-inf"))
        den = tl.load(rows + HEAD_DIM + 1, mask=live, other=0.0)
        acc = tl.load(rows[:, None] + d[None, :], mask=live[:, None] & dmask[None, :], other=0.0)
        m_all = tl.max(m, 0)
        w = tl.where(live, tl.exp(m - tl.where(length > 0, m_all, 0.0)), 0.0)
        total = tl.sum(w * den, 0)
        total = tl.where(total == 0.0, 1.0, total)
        out = tl.sum(acc * w[:, None], 0) / total
        tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)
