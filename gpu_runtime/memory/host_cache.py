"""The HOST tier: copies of model weight images in (pinned) host memory, capacity-limited, LRU.

An image is kept as a list of ``chunk_bytes`` host tensors, chunk i holding bytes [i*chunk, (i+1)*chunk) of the
model's weight buffer, so HOST->WARM is one host->device copy per pool chunk. Chunks are pinned on CUDA workers
(pageable copies run ~13x slower) and recycled between models: pinning is paid once per chunk, not per load.
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

    @property
    def used_chunks(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def has(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> list[torch.Tensor]:
        self.entries.move_to_end(name)
        return self.entries[name]

    def new_chunk(self) -> torch.Tensor:
        """A chunk outside the cache's accounting (staging for a model the cache cannot hold)."""
        return torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=self.pinned)

    def grow(self, nbytes: int) -> None:
        """Pin up to ``nbytes`` of chunks ahead of time (worker start-up), so loads do not pay for pinning."""
        while self._created < min(self.capacity, nbytes // self.chunk_bytes):
            self._free.append(self.new_chunk())
            self._created += 1

    def allocate(self, name: str, n: int, on_drop: Callable[[str], None]) -> list[torch.Tensor]:
        """Room for ``name``'s image of ``n`` chunks, dropping least recently used images (``on_drop`` tells
        the owner of each); HostCacheFull, with nothing dropped, when the whole cache is too small."""
        if n > self.capacity:
            raise HostCacheFull(
                f"model {name!r}: image needs {n * self.chunk_bytes >> 20} MiB, "
                f"host cache holds {self.capacity * self.chunk_bytes >> 20} MiB"
            )
        self.drop(name)
        while len(self._free) + self.capacity - self._created < n:
            victim = next(iter(self.entries))
            self.drop(victim)
            on_drop(victim)
        while len(self._free) < n:
            self._free.append(self.new_chunk())
            self._created += 1
        chunks, self._free = self._free[:n], self._free[n:]
        self.entries[name] = chunks
        return chunks

    def drop(self, name: str) -> None:
        self._free.extend(self.entries.pop(name, []))
