"""Messages that cross process boundaries through Redis, defined once.

An invocation travels gateway -> worker as one stream entry; its answer travels worker -> gateway as a stream of
events on a per-request key. Events carry the token position so a client reading an answer that was re-executed
after a worker died sees each position once (the gateway fixes a sampling seed per request so a re-execution
regenerates the same tokens).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized text by the worker
    ignore_eos: bool = False  # keep generating past the model's eos ids (vLLM's extension; benchmarks)


@dataclass(frozen=True)
class Invocation:
    request_id: str
    function: str
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    created: float = field(default_factory=time.time)

    def to_fields(self) -> dict[str, bytes]:
        return {"inv": orjson.dumps(asdict(self))}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Invocation:
        raw = orjson.loads(fields[b"inv"])
        raw["prompt_ids"] = tuple(raw["prompt_ids"])
        s = raw["sampling"]
        raw["sampling"] = Sampling(**{**s, "stop_token_ids": tuple(s["stop_token_ids"]), "stop": tuple(s["stop"])})
        return cls(**raw)


def event(kind: str, **data: Any) -> dict[str, bytes]:
    """One response-stream entry: {'ev': json}. Kinds: start, token, done, error."""
    return {"ev": orjson.dumps({"type": kind, **data})}


def parse_event(fields: dict[bytes, bytes]) -> dict[str, Any]:
    return orjson.loads(fields[b"ev"])


@dataclass
class WorkerInfo:
    """What a worker publishes about itself on every heartbeat (hash ws:worker:<id>, field 'info')."""

    worker_id: str
    host: str
    device: str
    total_bytes: int
    free_bytes: int
    lendable_kv_bytes: int
    models: dict[str, str]  # function name -> state (COLD/HOST/WARM/HOT)
    inflight: dict[str, int]  # function name -> running requests
    last_used: dict[str, float]  # function name -> when a request last started or finished here (unix s)
    started: float
    heartbeat: float

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> WorkerInfo:
        return cls(**orjson.loads(data))
