"""GPU runtime: the inference engine, weight layout and tokenizer that a universal worker runs models with.

Names are imported on first use, so `gpu_runtime.tokenizer` (which the gateway needs) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "gpu_runtime.engine.engine",
    "RequestOutput": "gpu_runtime.engine.sequence",
    "StepOutput": "gpu_runtime.engine.sequence",
    "SamplingParams": "protocol.messages",
    "ModelConfig": "modelinfo.config",
    "ModelFileError": "modelinfo.config",
    "IncrementalDecoder": "gpu_runtime.tokenizer",
    "Tokenizer": "gpu_runtime.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpu_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
