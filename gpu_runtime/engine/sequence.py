"""Requests as the engine sees them: sampling settings and the growing token list of one sequence."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import torch

from protocol.errors import InvalidRequest
from protocol.messages import FinishReason, SamplingParams


def validate_prompt(request_id: str, prompt_ids: list[int], vocab: int, max_model_len: int) -> None:
    """InvalidRequest (a ValueError: the client's mistake, answered 400) unless the prompt is non-empty token
    ids of the vocabulary leaving room for one more token."""
    if not prompt_ids:
        raise InvalidRequest(f"request {request_id}: empty prompt")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequest(
            f"request {request_id}: prompt of {len(prompt_ids)} tokens leaves no room (max_model_len {max_model_len})"
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise InvalidRequest(f"request {request_id}: token id out of range [0, {vocab})")


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
        self.block_hashes: list[bytes] = []  # prefix-cache chain hash of each full block of token_ids
        self.num_committed = 0  # leading blocks already offered to the prefix cache
        self.prefix_counted = False  # this request's prompt was counted in the hit-rate figures
        self.num_returned = 0  # generated tokens already handed out by step()
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
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
    finish_reason: FinishReason | None


@dataclass
class RequestOutput:
    """Result of ``Engine.generate`` for one prompt. ``token_ids`` holds generated ids only (a stop or eos token
    that ended the request is included, as transformers does)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason | None
