"""Host-memory stand-in for the CUDA VMM backend: the same interface, so the pool, the model states and KV
lending run (and are tested) on machines without a GPU.

Real remapping is impossible in host memory, so this emulates it: a physical chunk is only a capacity token
(it holds no bytes), and a virtual range is one host tensor allocated at its first mapping and kept for the life
of the backend, which gives it the fixed address the CUDA ranges have. Unmapping poisons the slot's bytes with
0xFF (NaN in every float dtype) so that any use of unmapped memory shows up in tests; mapping zeroes the slot,
standing in for the stale (finite) bytes a reused physical chunk brings on a GPU. Migration is a no-op because
the bytes never left the range. Ownership, lending and eviction are decided by the same pool code as on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POISON = 0xFF


@dataclass
class HostRange:
    n_slots: int
    chunk_bytes: int
    mapped: set[int] = field(default_factory=set)
    tensor: torch.Tensor | None = None  # allocated at first map, never freed: the range's fixed address

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.chunk_bytes


class HostBackend:
    """Chunks of ``chunk_bytes`` as tokens; ranges as host tensors (see the module docstring)."""

    def __init__(self, chunk_bytes: int) -> None:
        if chunk_bytes <= 0 or chunk_bytes % 256:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be a positive multiple of 256")
        self.device = torch.device("cpu")
        self.chunk_bytes = chunk_bytes
        self._next_handle = 0

    def create_chunk(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def release_chunk(self, handle: int) -> None:
        del handle

    def reserve(self, n_slots: int) -> HostRange:
        return HostRange(n_slots, self.chunk_bytes)

    def map(self, rng: HostRange, pairs: list[tuple[int, object]]) -> None:
        for slot, _handle in pairs:
            if not 0 <= slot < rng.n_slots:
                raise IndexError(f"slot {slot} outside a range of {rng.n_slots} slots")
            if slot in rng.mapped:
                raise RuntimeError(f"slot {slot} is already mapped")
        if rng.tensor is None:
            rng.tensor = torch.full((rng.nbytes,), POISON, dtype=torch.uint8)
        for slot, _handle in pairs:
            rng.mapped.add(slot)
            rng.tensor[slot * self.chunk_bytes : (slot + 1) * self.chunk_bytes].zero_()

    def unmap(self, rng: HostRange, slots: list[int]) -> None:
        for slot in slots:
            if slot not in rng.mapped:
                raise RuntimeError(f"slot {slot} is not mapped")
            rng.mapped.discard(slot)
            rng.tensor[slot * self.chunk_bytes : (slot + 1) * self.chunk_bytes].fill_(POISON)

    def migrate(self, rng: HostRange, slot: int, old, new) -> None:
        del rng, slot, old, new  # the bytes live in the range itself, not in the chunk

    def view(self, rng: HostRange) -> torch.Tensor:
        if rng.tensor is None:
            rng.tensor = torch.full((rng.nbytes,), POISON, dtype=torch.uint8)
        return rng.tensor

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass
