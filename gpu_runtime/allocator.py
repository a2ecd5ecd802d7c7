"""The one seam between the engine and GPU memory.

The engine never calls ``torch.empty`` for weights or KV cache: it asks an ``Allocator`` for flat byte buffers and
carves typed views out of them. The default ``TorchAllocator`` is plain torch memory; the worker's memory pool
(CUDA virtual memory on GPUs, host memory on CPU) implements the same protocol, so a model's weights can already sit
in prewarmed memory when its engine is built, and its KV pages can be mapped and unmapped under a fixed address.
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
