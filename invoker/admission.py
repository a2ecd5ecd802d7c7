"""Whether a request can ever run: its model's weights plus its own KV cache against the largest live worker.

A request that can never fit must be refused at the gateway (400) rather than queued: queued, it would wait for
ever at the head of its function's stream and block every request behind it. The simulator refuses the same
requests on arrival (sim/cluster.py). Torch-free: the gateway calls it on every request.
"""

from __future__ import annotations

from dataclasses import dataclass

from functions.spec import Footprint, FunctionSpec, footprint
from modelinfo import ModelFileError
from protocol.messages import WorkerInfo

GB = 1e9


@dataclass(frozen=True)
class Refusal:
    param: str  # the request field to change: "max_tokens", or "prompt" when the prompt alone cannot fit
    message: str


_SIZES: dict[FunctionSpec, Footprint] = {}
MAX_SIZES = 1024  # specs remembered (a redeploy is a new spec); past it the memory starts again


def _one_sequence(spec: FunctionSpec) -> Footprint:
    """Weights plus one max_model_len sequence of KV; remembered, since it reads config.json and runs per request."""
    size = _SIZES.get(spec)
    if size is None:
        if len(_SIZES) >= MAX_SIZES:
            _SIZES.clear()
        size = _SIZES[spec] = footprint(spec, kv_seqs=1)
    return size


def sized(spec: FunctionSpec) -> bool:
    """Whether `check` for `spec` is arithmetic only (its model's size is remembered): no file to read."""
    return spec in _SIZES


def check(spec: FunctionSpec, prompt_tokens: int, max_tokens: int, workers: list[WorkerInfo]) -> Refusal | None:
    """None if `prompt_tokens + max_tokens` of KV next to the weights fit the largest live worker's memory (or no
    worker is live: then nothing is known, and the router answers 503); else why not, naming function, tokens
    and memory."""
    if not workers:
        return None
    memory = max(w.total_bytes for w in workers)
    try:
        size = _one_sequence(spec)
    except ModelFileError:
        return None  # files broken since the deploy: the worker answers with a 5xx that names the cause
    if spec.engine != "builtin":
        return None  # the reference engine lives outside the memory pool: the workers' sizes say nothing of it
    per_token = size.kv_bytes / spec.max_model_len
    tokens = prompt_tokens + max_tokens
    need = size.weight_bytes + tokens * per_token
    if need <= memory:
        return None
    room = max(0, int((memory - size.weight_bytes) // per_token)) if per_token else 0
    param = "prompt" if prompt_tokens > room else "max_tokens"
    return Refusal(
        param,
        f"function '{spec.name}': {prompt_tokens} prompt + {max_tokens} max tokens need "
        f"{size.weight_bytes / GB:.2f} GB of weights + {tokens * per_token / GB:.2f} GB of KV cache = "
        f"{need / GB:.2f} GB, more than the largest worker's {memory / GB:.2f} GB of memory: it can never run "
        f"(at most {room} tokens fit)",
    )
