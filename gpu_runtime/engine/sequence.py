"""Requests as the engine sees them: sampling settings and the growing token list of one sequence."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature=0`` is greedy; ``top_k<=0`` and ``top_p=1`` disable
    those filters; ``seed`` makes sampling reproducible per request; ``ignore_eos`` keeps going past eos
    (benchmarks on random weights)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")


def validate_prompt(request_id: str, prompt_ids: list[int], vocab: int, max_model_len: int) -> None:
    """ValueError unless the prompt is non-empty token ids of the vocabulary leaving room for one more token."""
    if not prompt_ids:
        raise ValueError(f"request {request_id}: empty prompt")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(
            f"request {request_id}: prompt of {len(prompt_ids)} tokens leaves no room (max_model_len {max_model_len})"
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise ValueError(f"request {request_id}: token id out of range [0, {vocab})")


class RequestInbox:
    """Requests added and aborted from any thread, taken in one go by the thread that steps the engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: list[Sequence] = []
        self._aborted: set[str] = set()

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._new.append(seq)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_new(self) -> bool:
        return bool(self._new)

    def take(self) -> tuple[list[Sequence], set[str]]:
        with self._lock:
            new, self._new = self._new, []
            aborted, self._aborted = self._aborted, set()
        return new, aborted


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or prefill not finished, or preempted (KV freed, will be recomputed)
    RUNNING = "running"  # prefilled; one token per decode step
    FINISHED = "finished"


class Sequence:
    """One request. ``token_ids`` is prompt + generated; the first ``num_cached`` of them have KV in cache."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.block_table: list[int] = []
        self.num_cached = 0
        self.num_returned = 0  # generated tokens already handed out by step()
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class StepOutput:
    """What one ``Engine.step`` produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None


@dataclass
class RequestOutput:
    """Result of ``Engine.generate`` for one prompt. ``token_ids`` holds generated ids only (a stop or eos token
    that ended the request is included, as transformers does)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
