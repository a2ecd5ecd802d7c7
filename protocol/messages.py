"""Messages that cross process boundaries through Redis, each defined once.

An `Invocation` travels gateway -> worker as one entry of the function's stream. Its answer travels worker ->
gateway as typed events on a per-request stream (several to an entry): `Start`, then `Token`s (each with its
position), then `Done` or `Failed`. Positions let a client that reads an answer re-executed after a worker died
see each position once (the gateway fixes a sampling seed per request, so a re-execution regenerates the same
tokens).
`SamplingParams` is the one sampling type from the gateway, through Redis, into the engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from protocol.states import ModelState


class FinishReason(StrEnum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's length limit
    ABORT = "abort"  # cancelled: the client went away or the function was removed


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature=0`` is greedy; ``top_k<=0`` and ``top_p=1`` disable
    those filters; ``seed`` makes sampling reproducible per request (the gateway always sets one); ``stop``
    strings are matched by the worker on detokenized text; ``ignore_eos`` keeps going past eos (vLLM's
    extension, for benchmarks on random weights).

    ``n`` sequences are generated from one prompt (its KV is computed once and shared); the gateway returns the
    ``n`` a client asked for, or with ``best_of`` the best of them by cumulative log-probability. ``logprobs``
    (None: off; k >= 0) reports each generated token's log-probability and its ``k`` most likely alternatives;
    ``prompt_logprobs`` the same for every prompt token (``echo``). Penalties follow OpenAI (presence, frequency:
    additive on tokens already generated) and vLLM (repetition: divides positive logits of tokens in the prompt or
    output, multiplies negative ones). ``logit_bias`` pairs (token id, bias) are added to the logits;
    ``min_tokens`` keeps eos and stop tokens out until that many tokens exist. ``structured`` is a JSON grammar
    request the output must follow (its format: ``gpu_runtime.engine.grammar``)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    structured: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias or ()))
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"SamplingParams.{name} must be None or >= 0, got {value}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Invocation:
    request_id: str
    function: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    created: float = field(default_factory=time.time)

    def to_fields(self) -> dict[str, bytes]:
        return {"inv": orjson.dumps(asdict(self))}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Invocation:
        """Decode a stream entry; KeyError / ValueError / TypeError when it is malformed."""
        raw = orjson.loads(fields[b"inv"])
        if not isinstance(raw, dict) or not isinstance(raw.get("sampling"), dict):
            raise ValueError("invocation is not an object with a 'sampling' object")
        return cls(
            request_id=str(raw["request_id"]),
            function=str(raw["function"]),
            prompt_ids=tuple(int(t) for t in raw["prompt_ids"]),
            sampling=SamplingParams(**raw["sampling"]),
            created=float(raw["created"]),
        )


# ---- the answer stream ----
# One log-probability report: the chosen token's log-probability and the (token id, log-probability) pairs of the
# most likely alternatives, best first.
TopLogprobs = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Start:
    """A worker began generating (again, after a re-delivery). With ``prompt_logprobs`` requested, one
    (logprob, alternatives) pair per prompt token; the first token's logprob is None (nothing precedes it)."""

    worker: str
    prompt_tokens: int
    prompt_logprobs: tuple[tuple[float | None, TopLogprobs], ...] | None = None


@dataclass(frozen=True)
class Token:
    """One generated token of sequence `index` (0..n-1) and the text it completes. `id` is -1 for text held back
    until the end (the tail that could have grown into a stop string). Positions count per index."""

    pos: int
    id: int
    text: str
    index: int = 0
    logprob: float | None = None
    top_logprobs: TopLogprobs = ()


@dataclass(frozen=True)
class Done:
    """Sequence `index` finished; the answer is complete once every one of the request's n sequences has its
    Done (or at the first Failed)."""

    finish_reason: FinishReason
    completion_tokens: int
    index: int = 0
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class Failed:
    """The request ended without an answer. `status` is the HTTP status the client gets: 4xx for its own
    mistake, 5xx for a fault on our side (the message then names the function and the cause)."""

    status: int
    message: str


@dataclass(frozen=True)
class Restart:
    """Not on the wire: the gateway's reader says a re-delivered invocation started over, so a partial
    non-streamed answer must be dropped."""

    worker: str


Event = Start | Token | Done | Failed
_EVENT_TYPES: dict[str, type] = {"start": Start, "token": Token, "done": Done, "error": Failed}
_EVENT_NAMES = {cls: name for name, cls in _EVENT_TYPES.items()}


def encode_events(events: list[Event]) -> dict[str, bytes]:
    """One response-stream entry carrying `events` in order: {'evs': a json list of [type, fields] pairs, the type
    one of start / token / done / error}. A worker writes everything a request produced since its last flush as
    one entry, so a busy engine costs one XADD and one gateway dispatch per request per flush, not per token.
    orjson serializes the dataclasses itself (``dataclasses.asdict`` cost more than everything else a token does
    on its way out of the worker)."""
    return {"evs": orjson.dumps([(_EVENT_NAMES[type(ev)], ev) for ev in events])}


def decode_events(fields: dict[bytes, bytes]) -> list[Event]:
    """The events of one response-stream entry; KeyError / ValueError / TypeError when it is malformed."""
    return [_decode(name, raw) for name, raw in orjson.loads(fields[b"evs"])]


def _decode(name: str, raw: dict) -> Event:
    kind = _EVENT_TYPES[name]
    if kind is Done:
        raw["finish_reason"] = FinishReason(raw["finish_reason"])
    elif kind is Token:
        raw["top_logprobs"] = _pairs(raw.get("top_logprobs") or ())
    elif kind is Start and raw.get("prompt_logprobs") is not None:
        raw["prompt_logprobs"] = tuple((lp, _pairs(top)) for lp, top in raw["prompt_logprobs"])
    return kind(**raw)


def _pairs(rows: list) -> TopLogprobs:
    return tuple((int(t), float(lp)) for t, lp in rows)


@dataclass
class WorkerInfo:
    """What a worker publishes about itself on every heartbeat (hash ws:worker:<id>, field 'info')."""

    worker_id: str
    host: str
    device: str
    total_bytes: int
    free_bytes: int
    lendable_kv_bytes: int
    models: dict[str, ModelState]  # function name -> state
    inflight: dict[str, int]  # function name -> running requests
    last_used: dict[str, float]  # function name -> when a request last started or finished here (unix s)
    started: float
    heartbeat: float
    counters: dict[str, int] = field(default_factory=dict)  # re-deliveries, cancels, failures by status

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> WorkerInfo:
        raw: dict[str, Any] = orjson.loads(data)
        raw["models"] = {fn: ModelState(s) for fn, s in raw["models"].items()}
        return cls(**raw)
