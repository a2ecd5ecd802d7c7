"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns, and which full blocks are cached.

Lowest free ids go out first, so used blocks pack at the bottom of the KV buffer and its top stays free to be
lent (``limit``): the worker may map another model's weights over blocks >= limit.

Prefix cache: a full block whose KV is computed is registered under a hash chained over the token ids of every
block up to and including it, seeded with the engine's salt (the model's serving identity: a redeployed model
never finds another's blocks). A new sequence takes the longest run of cached blocks matching its prompt, short
of its last token (that one is computed, to sample from). Blocks are reference-counted; a cached block that no
sequence holds stays cached until a fresh block is needed and no never-used one is left, then the least recently
released goes first. Such blocks count as free (``num_free``) and idle (``num_used`` excludes them): lowering the
limit drops those at or above it rather than refusing to lend.

Threads: the engine's step thread allocates and frees; the worker's memory pool lowers the limit from other
threads when it lends the idle top. ``lock`` is held by the scheduler for a whole scheduling decision (check,
then allocate), so a limit never drops between the two; lowering only tries the lock and gives up while the
engine schedules (lending is opportunistic). Raising needs no lock: no used block can be above the new limit.
"""

from __future__ import annotations

import hashlib
import heapq
import threading
from array import array
from collections import OrderedDict

from gpu_runtime.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, salt: str | None = None) -> None:
        """``salt`` None turns prefix caching off."""
        self.block_size = block_size
        self.salt = None if salt is None else hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self.lock = threading.RLock()
        self.hit_tokens = 0  # prompt tokens found in the cache, counted once per request
        self.query_tokens = 0  # prompt tokens looked up, counted once per request
        self.reset(num_blocks)

    def reset(self, num_blocks: int) -> None:
        """Start over with ``num_blocks`` free blocks (a new KV buffer); no sequence may hold blocks."""
        self.num_blocks = num_blocks
        self.limit = num_blocks
        self._free = list(range(num_blocks))  # a heap of blocks holding nothing; sorted already
        self._refs: dict[int, int] = {}  # block -> sequences holding it
        self._cached: dict[bytes, int] = {}  # chain hash -> block with that prefix's KV
        self._hash_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first

    @property
    def num_free(self) -> int:
        """Blocks below the limit no sequence holds (never used or cached; every held block is below it)."""
        return self.limit - len(self._refs)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens."""
        with self.lock:
            need = self.blocks_needed(seq, num_tokens)
            if need > self.num_free:
                raise RuntimeError(f"KV cache: need {need} blocks, {self.num_free} free")
            for _ in range(need):
                block = self._take()
                self._refs[block] = 1
                seq.block_table.append(block)

    def _take(self) -> int:
        """A block below the limit for new KV: the lowest never-used one, else evict the least recent cached."""
        if self._free and self._free[0] < self.limit:
            return heapq.heappop(self._free)
        block, _ = self._idle.popitem(last=False)
        del self._cached[self._hash_of.pop(block)]
        return block

    def free(self, seq: Sequence) -> None:
        with self.lock:
            # Last blocks first: a prompt's later blocks are evicted before its shared beginning.
            for block in reversed(seq.block_table):
                self._refs[block] -= 1
                if self._refs[block]:
                    continue
                del self._refs[block]
                if block in self._hash_of:
                    self._idle[block] = None
                else:
                    heapq.heappush(self._free, block)
            seq.block_table = []
            seq.num_cached = 0
            seq.num_committed = 0

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give ``child`` (a fresh sequence with ``parent``'s prompt) the parent's prompt KV: full blocks are
        shared (one more reference each); a partly filled last block is copied, since each sequence writes its
        own next token into it. Returns (source, destination) of that copy, or None when there is none. Raises
        RuntimeError when no block is free for the copy (the caller then recomputes the child instead)."""
        with self.lock:
            full = parent.num_prompt_tokens // self.block_size
            partial = parent.num_prompt_tokens % self.block_size != 0
            if partial and self.num_free < 1:
                raise RuntimeError("KV cache: no block free to copy a forked sequence's last prompt block")
            for block in parent.block_table[:full]:
                self._refs[block] += 1
                child.block_table.append(block)
            child.num_cached = parent.num_prompt_tokens
            child.num_committed = min(full, parent.num_committed)
            if not partial:
                return None
            block = self._take()
            self._refs[block] = 1
            child.block_table.append(block)
            return parent.block_table[full], block

    def match(self, seq: Sequence) -> None:
        """Start a sequence holding no blocks on the longest cached prefix of its tokens (sets its block table
        and ``num_cached``). A sequence whose prompt logprobs are still missing is computed whole: those come from
        every prompt position's logits."""
        if self.salt is None or seq.block_table or seq.needs_prompt_logits:
            return
        with self.lock:
            hit = 0
            for i in range((len(seq) - 1) // self.block_size):
                block = self._cached.get(self._hash(seq, i))
                if block is None:
                    break
                self._idle.pop(block, None)
                self._refs[block] = self._refs.get(block, 0) + 1
                seq.block_table.append(block)
                hit += 1
            seq.num_committed, seq.num_cached = hit, hit * self.block_size
            if not seq.prefix_counted:
                seq.prefix_counted = True
                self.hit_tokens += seq.num_cached
                self.query_tokens += seq.num_prompt_tokens

    def commit(self, seq: Sequence) -> None:
        """Register ``seq``'s full blocks whose KV is now computed (after a step)."""
        full = seq.num_cached // self.block_size
        if self.salt is None or full <= seq.num_committed:
            return
        with self.lock:
            for i in range(seq.num_committed, full):
                h, block = self._hash(seq, i), seq.block_table[i]
                if h not in self._cached and block not in self._hash_of:
                    self._cached[h] = block
                    self._hash_of[block] = h
            seq.num_committed = full

    def _hash(self, seq: Sequence, i: int) -> bytes:
        """Chain hash of ``seq``'s blocks 0..i (memoized on the sequence: its tokens never change)."""
        bs = self.block_size
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if j else self.salt
            tokens = array("q", seq.token_ids[j * bs : (j + 1) * bs]).tobytes()
            seq.block_hashes.append(hashlib.blake2b(prev + tokens, digest_size=16).digest())
        return seq.block_hashes[i]

    def set_limit(self, blocks: int) -> bool:
        """Use only ids < ``blocks`` (capped at the buffer's size); False, unchanged, if a held id is >= it or
        (when lowering) the engine is scheduling right now. Cached blocks nobody holds above it are dropped."""
        blocks = max(0, min(blocks, self.num_blocks))
        if blocks >= self.limit:
            self.limit = blocks
            return True
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if any(b >= blocks for b in self._refs):
                return False
            for block in [b for b in self._idle if b >= blocks]:
                del self._idle[block]
                del self._cached[self._hash_of.pop(block)]
                heapq.heappush(self._free, block)
            self.limit = blocks
            return True
        finally:
            self.lock.release()
