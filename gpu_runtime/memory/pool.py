"""The chunk pool: who owns each physical chunk, and which virtual slot it is mapped into.

Bookkeeping only; the bytes are the backend's business (``CudaVmmBackend`` on GPUs, ``HostBackend`` on CPU).
Every chunk is either free or mapped into exactly one slot of one model's range, and its ``owner`` is that
model. A chunk ``on loan`` (``lender`` set) belongs to a HOT model's KV promise but currently holds another
model's weights; ``kv_reservation`` decides when that happens and undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_runtime.allocator import Purpose


class ModelMemoryError(RuntimeError):
    """A memory operation failed for one model; the message names it. Other models are untouched."""


class PoolExhausted(ModelMemoryError):
    """Not enough free chunks for what a model needs."""


@dataclass
class Chunk:
    index: int
    handle: object
    owner: str | None = None  # model whose range maps this chunk; None when free
    purpose: Purpose | None = None
    slot: int | None = None
    lender: str | None = None  # HOT model whose KV promise this chunk is, while it holds another's weights


@dataclass
class VRange:
    """A model's fixed virtual range for one purpose: ``slots[i]`` is the chunk mapped at slot i, or None."""

    model: str
    purpose: Purpose
    handle: object
    slots: list[int | None]
    _view: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def mapped(self) -> list[int]:
        return [i for i, c in enumerate(self.slots) if c is not None]


class Pool:
    """``capacity`` chunks of ``backend.chunk_bytes``, created on first use and kept."""

    def __init__(self, backend, capacity: int) -> None:
        self.backend = backend
        self.capacity = capacity
        self.chunks: list[Chunk] = []
        self._free: list[int] = []  # indices of created, unowned chunks
        self.ranges: list[VRange] = []

    @property
    def chunk_bytes(self) -> int:
        return self.backend.chunk_bytes

    @property
    def free_count(self) -> int:
        return len(self._free) + self.capacity - len(self.chunks)

    def n_chunks(self, nbytes: int) -> int:
        return -(-nbytes // self.chunk_bytes)

    def take(self, n: int, model: str) -> list[int]:
        """``n`` free chunks (creating them up to capacity) or PoolExhausted naming ``model``."""
        if n > self.free_count:
            raise PoolExhausted(
                f"model {model!r}: needs {n} chunks of {self.chunk_bytes >> 20} MiB, pool has {self.free_count} free"
            )
        while len(self._free) < n:
            self.chunks.append(Chunk(len(self.chunks), self.backend.create_chunk()))
            self._free.append(self.chunks[-1].index)
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def put(self, indices: list[int]) -> None:
        """Return unmapped chunks to the free list."""
        for i in indices:
            c = self.chunks[i]
            assert c.slot is None, f"chunk {i} is still mapped"
            c.owner = c.purpose = c.lender = None
        self._free.extend(indices)

    def reserve(self, model: str, purpose: Purpose, nbytes: int) -> VRange:
        n = self.n_chunks(nbytes)
        vr = VRange(model, purpose, self.backend.reserve(n), [None] * n)
        self.ranges.append(vr)
        return vr

    def map(self, vr: VRange, pairs: list[tuple[int, int]]) -> None:
        """Map chunk indices into slots of ``vr``; the range's model becomes their owner."""
        self.backend.map(vr.handle, [(slot, self.chunks[i].handle) for slot, i in pairs])
        for slot, i in pairs:
            c = self.chunks[i]
            c.owner, c.purpose, c.slot = vr.model, vr.purpose, slot
            vr.slots[slot] = i

    def unmap(self, vr: VRange, slots: list[int]) -> list[int]:
        """Unmap slots; returns their chunks, still owned (the caller frees or remaps them)."""
        if not slots:
            return []
        self.backend.unmap(vr.handle, slots)
        out = []
        for slot in slots:
            i = vr.slots[slot]
            vr.slots[slot] = None
            self.chunks[i].slot = None
            out.append(i)
        return out

    def migrate(self, vr: VRange, slot: int, new: int) -> int:
        """Move ``slot``'s content onto free chunk ``new`` at the same address; returns the old chunk, unmapped."""
        old = vr.slots[slot]
        self.backend.migrate(vr.handle, slot, self.chunks[old].handle, self.chunks[new].handle)
        self.chunks[old].slot = None
        c = self.chunks[new]
        c.owner, c.purpose, c.slot = vr.model, vr.purpose, slot
        vr.slots[slot] = new
        return old

    def view(self, vr: VRange) -> torch.Tensor:
        """The whole range as one uint8 tensor (no copy); the same tensor for the life of the pool."""
        if vr._view is None:
            vr._view = self.backend.view(vr.handle)
        return vr._view

    def check(self) -> None:
        """Every chunk free xor mapped exactly once, in a range of its owner and purpose. AssertionError if not."""
        free = set(self._free)
        assert len(free) == len(self._free), "a chunk is on the free list twice"
        seen: dict[int, tuple[str, int]] = {}
        for vr in self.ranges:
            for slot, i in enumerate(vr.slots):
                if i is None:
                    continue
                assert i not in seen, f"chunk {i} mapped twice: {seen[i]} and {(vr.model, slot)}"
                seen[i] = (vr.model, slot)
                c = self.chunks[i]
                assert (c.owner, c.purpose, c.slot) == (vr.model, vr.purpose, slot), f"chunk {i}: {c}"
                assert i not in free, f"chunk {i} is mapped and free"
        for c in self.chunks:
            if c.index not in seen:
                assert c.index in free, f"chunk {c.index} leaked: neither mapped nor free ({c})"
                assert c.owner is None and c.lender is None, f"free chunk {c.index} has an owner: {c}"

    def release_all(self) -> None:
        """Unmap everything and give the physical memory back (worker shutdown)."""
        for vr in self.ranges:
            self.put(self.unmap(vr, vr.mapped()))
        for c in self.chunks:
            self.backend.release_chunk(c.handle)
        self.chunks.clear()
        self._free.clear()
        self.backend.close()
