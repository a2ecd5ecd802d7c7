"""GPU runtime: the inference engine, weight layout and tokenizer that a universal worker runs models with."""

from gpu_runtime.engine import Engine, ModelConfig, ModelFileError, RequestOutput, SamplingParams, StepOutput

__all__ = ["Engine", "ModelConfig", "ModelFileError", "RequestOutput", "SamplingParams", "StepOutput"]
