"""Requests as the engine sees them: sampling settings and the growing token list of one sequence."""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import torch

from gpu_runtime.engine.grammar import GrammarState
from protocol.errors import InvalidRequest
from protocol.messages import FinishReason, SamplingParams, TopLogprobs

# One token's log-probability report: its own log-probability and its most likely alternatives.
Logprob = tuple[float, TopLogprobs]


def to_device(values: list | tuple, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` as a tensor on ``device``, without waiting for the device: ``torch.tensor(values, device=...)``
    waits for all queued work (e.g. the forward pass whose logits a step is sampling from), while a copy from
    pinned memory is only queued behind it."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


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


def validate_sampling(request_id: str, params: SamplingParams, vocab: int) -> None:
    """InvalidRequest naming the field for sampling settings this vocabulary cannot honour."""
    for token, _ in params.logit_bias:
        if not 0 <= token < vocab:
            raise InvalidRequest(f"request {request_id}: logit_bias token id {token} out of range [0, {vocab})")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > vocab:
            raise InvalidRequest(f"request {request_id}: {name} {k} exceeds the vocabulary ({vocab})")


class RequestInbox:
    """Requests added and aborted from any thread, taken in one go by the thread that steps the engine. An abort
    names a request (index None: all its sequences) or one sequence of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: list[Sequence] = []
        self._aborted: set[tuple[str, int | None]] = set()

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._new.append(seq)

    def abort(self, request_id: str, index: int | None = None) -> None:
        with self._lock:
            self._aborted.add((request_id, index))

    def has_new(self) -> bool:
        return bool(self._new)

    def take(self) -> tuple[list[Sequence], set[tuple[str, int | None]]]:
        with self._lock:
            new, self._new = self._new, []
            aborted, self._aborted = self._aborted, set()
        return new, aborted


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or prefill not finished, or preempted (KV freed, will be recomputed)
    RUNNING = "running"  # prefilled; one token per decode step
    FINISHED = "finished"


class Sequence:
    """One sequence of a request (``index`` of its ``params.n``). ``token_ids`` is prompt + generated; the first
    ``num_cached`` of them have KV in cache. Index 0 prefills the prompt; the others are forked from it when it
    samples its first token (``fork``), sharing its KV blocks."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, index: int = 0) -> None:
        self.request_id = request_id
        self.index = index
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
        self.grammar: GrammarState | None = None  # structured output: set by Engine.add_request
        # Sampling features beyond temperature/top-k/top-p, checked once here so a step skips them in one test.
        p = params
        self.adjusts_logits = bool(
            p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.logit_bias or p.min_tokens
        )
        self.wants_logprobs = p.logprobs is not None or p.n > 1  # n > 1: cumulative logprob picks best_of
        # Penalties' token history, kept on the device between steps (penalties.py): output-token counts [vocab],
        # prompt-token mask [vocab], and how many generated tokens the counts include.
        self.penalty_history: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.logprobs: list[Logprob] = []  # generated tokens' reports not yet handed out by step()
        self.cumulative_logprob = 0.0
        # One entry per prompt token once computed (the first has no logprob); None when not asked for.
        self.prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = (
            None if p.prompt_logprobs is None else [(None, ())]
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def forks_pending(self) -> bool:
        """Index 0 of an n > 1 request that has not sampled yet: its first sampling forks the others."""
        return self.params.n > 1 and self.index == 0 and self.num_completion == 0

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """Positions in [start, end) whose logits give prompt logprobs still missing (position p scores token
        p + 1). Empty unless asked for; positions already scored (a recompute) are not scored again."""
        if self.prompt_logprobs is None:
            return range(0)
        return range(max(start, len(self.prompt_logprobs) - 1), min(end, self.num_prompt_tokens - 1))

    @property
    def needs_prompt_logits(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def fork(self, index: int) -> Sequence:
        """Sequence ``index`` of this request: the same prompt (blocks are shared by the block manager), its
        own generator: seeded ``seed + index``, so a re-run regenerates each sequence."""
        child = Sequence(self.request_id, self.token_ids[: self.num_prompt_tokens], self.params, index)
        child.prefix_counted = True
        child.prompt_logprobs = None  # reported once, by index 0
        child.grammar = None if self.grammar is None else self.grammar.fresh()
        return child


@dataclass
class StepOutput:
    """What one ``Engine.step`` produced for sequence ``index`` of one request. Every index of a request ends
    with exactly one finished output. ``logprobs`` has one report per new token when the request asked for
    them; ``cumulative_logprob`` (with logprobs or n > 1) sums the chosen tokens' logprobs so far;
    ``prompt_logprobs`` comes once, with index 0's first tokens."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    index: int = 0
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None


@dataclass
class RequestOutput:
    """Result of ``Engine.generate`` for one prompt. ``token_ids`` holds generated ids only (a stop or eos token
    that ended the request is included, as transformers does). With n > 1, ``token_ids`` etc. are sequence 0's
    and ``sequences`` holds every sequence's (index order)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None
    sequences: list[RequestOutput] = field(default_factory=list)
