"""KV cache reservation: a HOT model's idle KV pages hold WARM weights of other models, on loan.

A HOT model is promised every slot of its KV range. Each slot is either mapped (the engine may use the blocks
in it) or lent: its chunk is mapped into a borrower's weight range instead. Lent slots are always the top ones,
because the engine's block manager hands out the lowest block ids first and ``set_kv_limit`` keeps it below a
bound, so the free top of the cache is exactly what can be lent. When the lender runs short (the engine calls
its ``kv_pressure_hook``), the host evicts borrowers to HOST and their chunks come back here (``restore``).
Invariant, checked by the property test: mapped + lent == promise, for every HOT model, always.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpu_runtime.memory.pool import Pool, VRange


@dataclass
class KvAccount:
    """One HOT model's KV promise and what is mapped of it."""

    vrange: VRange
    block_bytes: int
    set_limit: Callable[[int], bool]  # the engine's set_kv_limit: False if a used block is >= the limit
    chunk_bytes: int

    @property
    def model(self) -> str:
        return self.vrange.model

    @property
    def promise(self) -> int:
        return self.vrange.n_slots

    def mapped(self) -> int:
        """Mapped slots; they always form a prefix of the range."""
        return sum(c is not None for c in self.vrange.slots)

    def blocks(self, slots: int) -> int:
        """Whole KV blocks inside the first ``slots`` slots."""
        return slots * self.chunk_bytes // self.block_bytes

    def limit(self) -> int:
        return self.blocks(self.mapped())


def lend(pool: Pool, acct: KvAccount, want: int) -> list[int]:
    """Unmap up to ``want`` idle top slots of ``acct`` and return their chunks marked as on loan.

    Tries the largest count first; the engine refuses a limit below a block in use, so this lends only pages
    no sequence holds. Returns [] when nothing is idle.
    """
    mapped = acct.mapped()
    for k in range(min(want, mapped), 0, -1):
        if acct.set_limit(acct.blocks(mapped - k)):
            chunks = pool.unmap(acct.vrange, list(range(mapped - k, mapped)))
            for i in chunks:
                pool.chunks[i].lender = acct.model
            return chunks
    return []


def restore(pool: Pool, acct: KvAccount, chunks: list[int]) -> int:
    """Map chunks back into the lowest free slots of ``acct`` (they came back from a borrower, unmapped)
    and raise the engine's limit. Returns how many blocks were added."""
    if not chunks:
        return 0
    before = acct.limit()
    mapped = acct.mapped()
    for i in chunks:
        pool.chunks[i].lender = None
    pool.map(acct.vrange, [(mapped + k, i) for k, i in enumerate(chunks)])
    ok = acct.set_limit(acct.limit())
    assert ok, "raising a KV limit cannot fail"
    return acct.limit() - before


def slots_for(acct: KvAccount, more_blocks: int) -> int:
    """Slots to map back so the engine gets ``more_blocks`` more blocks (capped at what is lent)."""
    mapped = acct.mapped()
    want = acct.limit() + more_blocks
    k = 0
    while mapped + k < acct.promise and acct.blocks(mapped + k) < want:
        k += 1
    return k


def lent_by(pool: Pool, model: str) -> list[int]:
    return [c.index for c in pool.chunks if c.lender == model]
