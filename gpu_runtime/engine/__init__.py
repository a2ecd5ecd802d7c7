"""A Llama-family inference engine: paged KV cache, continuous batching, CUDA graphs (nano-vllm style)."""

from gpu_runtime.engine.config import ModelConfig, ModelFileError
from gpu_runtime.engine.engine import Engine
from gpu_runtime.engine.sequence import RequestOutput, SamplingParams, StepOutput

__all__ = ["Engine", "ModelConfig", "ModelFileError", "RequestOutput", "SamplingParams", "StepOutput"]
