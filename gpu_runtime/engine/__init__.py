"""A Llama-family inference engine: paged KV cache, continuous batching, CUDA graphs (nano-vllm style)."""

from gpu_runtime.engine.engine import Engine
from gpu_runtime.engine.sequence import RequestOutput, StepOutput

__all__ = ["Engine", "RequestOutput", "StepOutput"]
