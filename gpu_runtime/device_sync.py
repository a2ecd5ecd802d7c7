"""Device-wide synchronisation and CUDA graph capture, kept apart.

The worker captures an engine's CUDA graphs lazily, on its engine thread, while control jobs on other threads
load, evict and remap other models. Capture runs in "thread_local" mode, so those threads may copy and map memory
meanwhile; but a device-wide synchronisation (``cudaDeviceSynchronize``, which the memory pool needs before it
unmaps memory a kernel may still read) is never allowed while a stream of the device captures: the call fails and
the capture is invalidated. Seen live (the replay of 2026-12-06): an eviction's synchronisation during a capture
failed the eviction, and the failed capture left the engine's graph memory pool recording, so every later step of
that model failed. One lock makes the two wait for each other; a capture holds it for tens of milliseconds (its
warm-up run, which compiles kernels, happens before it takes the lock).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.RLock()


def synchronize(device: torch.device) -> None:
    """Wait until every stream of ``device`` is idle (never while a graph is being captured)."""
    with _lock:
        torch.cuda.synchronize(device)


@contextmanager
def capturing() -> Iterator[None]:
    """Hold while capturing a CUDA graph: no device-wide synchronisation starts meanwhile."""
    with _lock:
        yield
