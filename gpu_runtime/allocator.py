"""Where an engine gets the flat byte buffers it carves weights and KV cache out of.

An engine that allocates its own memory (``Engine.from_pretrained``, or any engine given ``num_kv_blocks``)
never calls ``torch.empty`` for weights or KV: it asks an ``Allocator`` for flat ``uint8`` buffers and carves
typed views out of them. The default ``TorchAllocator`` is plain torch memory. The worker's memory pool
(``gpu_runtime.memory``) does not implement this protocol: it fills a weight buffer in its own chunks, builds the
engine over it with ``Engine.from_weights`` and no KV blocks of its own, and hands KV buffers in through
``attach_kv``. ``Purpose`` names what a buffer holds, for allocators and the pool alike.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

Purpose = Literal["weights", "kv"]


class Allocator(Protocol):
    """Hands out flat ``uint8`` buffers on one device."""

    device: torch.device

    def allocate(self, nbytes: int, purpose: Purpose) -> torch.Tensor:
        """A 1-D ``torch.uint8`` tensor of exactly ``nbytes`` on ``self.device``, 256-byte aligned."""
        ...

    def release(self, buffer: torch.Tensor) -> None:
        """Give back a buffer returned by ``allocate``; the caller drops every view of it first."""
        ...


class TorchAllocator:
    """Plain torch memory: what an engine uses when nobody hands it a pool."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def allocate(self, nbytes: int, purpose: Purpose) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def release(self, buffer: torch.Tensor) -> None:
        # torch frees the storage when the last view goes; nothing to do here.
        del buffer
