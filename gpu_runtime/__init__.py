"""GPU runtime: the inference engine, weight layout and tokenizer that a universal worker runs models with."""

from gpu_runtime.engine import Engine, ModelConfig, ModelFileError, RequestOutput, SamplingParams, StepOutput
from gpu_runtime.tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "Engine",
    "IncrementalDecoder",
    "ModelConfig",
    "ModelFileError",
    "RequestOutput",
    "SamplingParams",
    "StepOutput",
    "Tokenizer",
]
