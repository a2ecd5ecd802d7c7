"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns.

Lowest free ids go out first, so used blocks pack at the bottom of the KV buffer and its top stays free to be
lent (``limit``): the worker may map another model's weights over blocks >= limit.

Threads: the engine's step thread allocates and frees; the worker's memory pool lowers the limit from other
threads when it lends the idle top. ``lock`` is held by the scheduler for a whole scheduling decision (check,
then allocate), so a limit never drops between the two; lowering only tries the lock and gives up while the
engine schedules (lending is opportunistic). Raising needs no lock: no used block can be above the new limit.
"""

from __future__ import annotations

import heapq
import threading

from gpu_runtime.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.lock = threading.RLock()
        self.reset(num_blocks)

    def reset(self, num_blocks: int) -> None:
        """Start over with ``num_blocks`` free blocks (a new KV buffer); no sequence may hold blocks."""
        self.num_blocks = num_blocks
        self.limit = num_blocks
        self._free = list(range(num_blocks))  # a heap; sorted already
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        """Free blocks below the limit (every used block is below it)."""
        return self.limit - len(self._used)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens."""
        with self.lock:
            need = self.blocks_needed(seq, num_tokens)
            if need > self.num_free:
                raise RuntimeError(f"KV cache: need {need} blocks, {self.num_free} free")
            for _ in range(need):
                block = heapq.heappop(self._free)
                self._used.add(block)
                seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        with self.lock:
            for block in seq.block_table:
                self._used.discard(block)
                heapq.heappush(self._free, block)
            seq.block_table = []
            seq.num_cached = 0

    def set_limit(self, blocks: int) -> bool:
        """Use only ids < ``blocks`` (capped at the buffer's size); False, unchanged, if a used id is >= it or
        (when lowering) the engine is scheduling right now."""
        blocks = max(0, min(blocks, self.num_blocks))
        if blocks >= self.limit:
            self.limit = blocks
            return True
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if any(b >= blocks for b in self._used):
                return False
            self.limit = blocks
            return True
        finally:
            self.lock.release()
