"""The HOST tier: copies of model weight images in (pinned) host memory, capacity-limited, LRU.

An image is kept as a list of ``chunk_bytes`` host tensors, chunk i holding bytes [i*chunk, (i+1)*chunk) of the
model's weight buffer, so HOST->WARM is one host->device copy per pool chunk. Chunks are pinned on CUDA workers
(pageable copies run ~13x slower) and recycled between models: pinning is paid once per chunk, not per load.

An image that a copy is reading or writing is held (``hold``): the LRU never drops it to make room for another.
Not thread-safe: the caller (``ModelHost``) holds its pool lock around every call except ``new_chunk``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from gpu_runtime.memory.pool import ModelMemoryError


class HostCacheFull(ModelMemoryError):
    """The host cache cannot hold a model's image."""


class HostCache:
    def __init__(self, capacity_bytes: int, chunk_bytes: int, pinned: bool) -> None:
        self.chunk_bytes = chunk_bytes
        self.capacity = capacity_bytes // chunk_bytes
        self.pinned = pinned
        self._free: list[torch.Tensor] = []
        self._created = 0
        self.entries: OrderedDict[str, list[torch.Tensor]] = OrderedDict()  # oldest first
        self.held: set[str] = set()  # images a copy is using: never dropped by the LRU

    @property
    def used_chunks(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def has(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> list[torch.Tensor]:
        self.entries.move_to_end(name)
        return self.entries[name]

    def hold(self, name: str) -> None:
        """Keep ``name``'s image while a copy reads or writes it (``unhold`` or ``drop`` ends that)."""
        assert name in self.entries, f"holding {name!r}, which has no image"
        self.held.add(name)

    def unhold(self, name: str) -> None:
        self.held.discard(name)

    def new_chunk(self) -> torch.Tensor:
        """A chunk outside the cache's accounting (staging for a model the cache cannot hold, or for ``adopt``)."""
        return torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=self.pinned)

    def shortfall(self, n: int) -> int:
        """How many new chunks ``allocate(n)`` would create now: the caller may make them with ``new_chunk``
        outside its lock (pinning is slow) and ``adopt`` them first; 0 for an image the cache cannot hold."""
        if n > self.capacity:
            return 0
        return max(0, min(n - len(self._free), self.capacity - self._created))

    def adopt(self, chunks: list[torch.Tensor]) -> None:
        """Take chunks made by ``new_chunk`` as free ones, up to capacity (the rest are left to the collector)."""
        chunks = chunks[: self.capacity - self._created]
        self._free += chunks
        self._created += len(chunks)

    def grow(self, nbytes: int) -> None:
        """Pin up to ``nbytes`` of chunks ahead of time (worker start-up), so loads do not pay for pinning."""
        while self._created < min(self.capacity, nbytes // self.chunk_bytes):
            self._free.append(self.new_chunk())
            self._created += 1

    def allocate(self, name: str, n: int, on_drop: Callable[[str], None]) -> list[torch.Tensor]:
        """Room for ``name``'s image of ``n`` chunks, dropping least recently used images not held
        (``on_drop`` tells the owner of each); HostCacheFull, with nothing dropped, if that cannot make room."""
        if n > self.capacity:
            raise HostCacheFull(
                f"model {name!r}: image needs {n * self.chunk_bytes >> 20} MiB, "
                f"host cache holds {self.capacity * self.chunk_bytes >> 20} MiB"
            )
        room = len(self._free) + self.capacity - self._created
        droppable = sum(len(v) for k, v in self.entries.items() if k == name or k not in self.held)
        if room + droppable < n:
            raise HostCacheFull(
                f"model {name!r}: image needs {n * self.chunk_bytes >> 20} MiB; the rest of the host cache is "
                f"held by images being copied"
            )
        self.drop(name)
        while len(self._free) + self.capacity - self._created < n:
            victim = next(k for k in self.entries if k not in self.held)
            self.drop(victim)
            on_drop(victim)
        while len(self._free) < n:
            self._free.append(self.new_chunk())
            self._created += 1
        chunks, self._free = self._free[:n], self._free[n:]
        self.entries[name] = chunks
        return chunks

    def drop(self, name: str) -> None:
        self.held.discard(name)
        self._free.extend(self.entries.pop(name, []))
