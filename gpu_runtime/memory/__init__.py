"""The universal worker's GPU memory: a chunk pool over CUDA virtual memory (host memory on CPU), model states
COLD -> HOST -> WARM -> HOT, a fast loader, and KV cache reservation. ``ModelHost`` is the entry point."""

from gpu_runtime.memory.host_cache import HostCacheFull
from gpu_runtime.memory.model_host import LoadYielded, ModelHost, ModelLoadError, ModelTooLarge
from gpu_runtime.memory.pool import ModelMemoryError, PoolExhausted

__all__ = [
    "HostCacheFull",
    "LoadYielded",
    "ModelHost",
    "ModelLoadError",
    "ModelMemoryError",
    "ModelTooLarge",
    "PoolExhausted",
]
