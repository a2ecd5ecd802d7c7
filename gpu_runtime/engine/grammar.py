"""Structured output: a request's grammar, compiled against the model's tokenizer and applied as a token mask.

``SamplingParams.structured`` is the JSON text of one object (builders and the torch-free check in
``protocol.structured``):

- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "schema": {...}}``: an instance of the JSON schema (llguidance's JSON Schema subset;
  ``additionalProperties: false`` and ``required`` are enforced, so OpenAI's strict schemas hold exactly);
- ``{"type": "lark", "grammar": "..."}``: llguidance's Lark dialect: string literals, regular expressions and
  ``%json {schema}`` for an embedded JSON value. The gateway writes tool calls this way (``gateway/tools.py``):
  ``tool_choice`` "required" or a named function becomes ``<tool_call>`` + a JSON call + ``</tool_call>`` for
  Hermes/Qwen2.5 templates, or ``{"name": ..., "parameters": ...}`` for Llama 3.1 ones.

Each may carry ``"param"``: the request field it came from (``response_format`` or ``tools``), which an error
names. Between two tokens of a JSON value the grammar allows one space, or one line break and an indent of up to
24 blanks (``protocol.structured.JSON_OPTIONS``): enough for any layout, too little to loop in.

In the engine: a ``GrammarState`` per sequence follows the sequence's generated tokens (it catches up, or rolls
back, to whatever the sequence holds, so preemption, recompute and forked copies need nothing special); the sampler
calls ``apply_grammars`` before choosing and ``accept_tokens`` once the tokens are on the host. ``accept_tokens``
has every grammar take its token and starts the batch's next masks on a background thread, into a bitmask of their
own (pinned for a GPU), computed while the engine thread prepares and launches the next forward pass;
``apply_grammars`` then uses that bitmask as it is when the batch is the same sequences in the same order (the
usual decode step), or else gathers rows (computing any missing ones, e.g. for new sequences) into one pinned
bitmask, and applies it to the logits on the device in one batched mask, without waiting for the device (the
forward pass may still run). eos is allowed only where the grammar is complete; a sequence finishes as soon as its
grammar can't continue.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from protocol.structured import GrammarError, to_llguidance

log = logging.getLogger(__name__)

# Compiled grammars kept per engine: a tool set or schema reused across requests compiles once.
CACHE_SIZE = 256
_executors: dict[str, llguidance.LLExecutor] = {}
_pool: ThreadPoolExecutor | None = None
_bits: dict[torch.device, torch.Tensor] = {}
_buffers = threading.local()  # per engine thread: {pinned: reused host bitmask}


class _MaskJob:
    """Next-step masks of several states, computed together on the mask thread (llguidance drops the GIL) into
    a bitmask the job owns: pinned for a GPU, so a step whose batch is exactly these states copies it to the
    device as it is."""

    def __init__(self, states: list[GrammarState], pinned: bool) -> None:
        self.states = states
        words = bitmask_words(states[0].vocab_size)
        self.bitmask = torch.empty((len(states), words), dtype=torch.int32, pin_memory=pinned)
        # the bound method keeps the job, so its bitmask, alive while llguidance writes it (a finished or
        # aborted sequence drops its state, and so the job, at once)
        self._done = _threads().submit(self._compute, [(s.matcher, i) for i, s in enumerate(states)])

    def _compute(self, matchers: list[tuple[llguidance.LLMatcher, int]]) -> None:
        words = self.bitmask.shape[1]
        _executor("background").unsafe_compute_mask_ptr(matchers, self.bitmask.data_ptr(), words * 4, len(matchers))

    def wait(self) -> torch.Tensor:
        """The bitmask, once computed."""
        self._done.result()
        return self.bitmask


class GrammarState:
    """One sequence's position in its grammar. ``consumed`` generated tokens have been fed to the matcher;
    ``vocab_size`` is the width of its token masks. Its next mask may be under way: row ``row`` of ``job``."""

    def __init__(self, prototype: llguidance.LLMatcher, vocab_size: int) -> None:
        self._prototype = prototype
        self.vocab_size = vocab_size
        self.matcher = prototype.deep_copy()
        self.consumed = 0
        self.stopped = False  # read here, not from the matcher, which a mask job may be using
        self.job: _MaskJob | None = None  # computing the mask for the first ``consumed`` tokens
        self.row = 0

    def fresh(self) -> GrammarState:
        """The same grammar from its start: for another sequence of the same request."""
        return GrammarState(self._prototype, self.vocab_size)

    def sync(self, generated: list[int]) -> None:
        """Make the matcher's input equal ``generated`` (the sequence's tokens after its prompt)."""
        if len(generated) == self.consumed:
            return
        self.settle()
        self.job = None
        if len(generated) < self.consumed:
            if not self.matcher.rollback(self.consumed - len(generated)):
                self.matcher = self._prototype.deep_copy()
                self.consumed = 0
            else:
                self.consumed = len(generated)
        if len(generated) > self.consumed:
            if not self.matcher.consume_tokens(generated[self.consumed :]):
                log.warning("grammar refused a sampled token: %s", self.matcher.get_error())
            self.consumed = len(generated)
        self.stopped = self.matcher.is_stopped()

    def settle(self) -> None:
        """Wait until no mask job reads the matcher: it may change after this."""
        if self.job is not None:
            self.job.wait()

    def take(self, token: int) -> None:
        """Feed the token just sampled after the ``consumed`` ones."""
        self.settle()
        self.job = None
        if not self.matcher.consume_token(token):
            log.warning("grammar refused a sampled token: %s", self.matcher.get_error())
        self.consumed += 1
        self.stopped = self.matcher.is_stopped()

    def advance(self, generated: list[int]) -> bool:
        """Take the newly sampled tokens (normally taken already, by ``accept_tokens``); True when the
        grammar is finished (nothing but eos may follow)."""
        self.sync(generated)
        return self.stopped

    def prefetched(self, generated: list[int]) -> np.ndarray | None:
        """The mask computed since the last token, if the sequence still holds the tokens it was for."""
        job, self.job = self.job, None
        if job is None:
            return None
        bitmask = job.wait().numpy()
        return bitmask[self.row] if len(generated) == self.consumed else None


class GrammarCompiler:
    """Compiles grammar requests against one model's tokenizer (loaded on the first request that needs it)."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            with open(os.path.join(self.model_dir, "tokenizer.json"), encoding="utf-8") as f:
                text = f.read()
            # the model's vocabulary may be padded past the tokenizer's: those ids are never allowed
            eos = self.eos_token_ids or None  # none in config.json: the tokenizer's own
            self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=eos)
        return self._tokenizer

    def start(self, structured: str | None) -> GrammarState | None:
        """The initial state for a request's grammar (None without one); GrammarError (a 400) if it is bad."""
        if structured is None:
            return None
        with self._lock:
            prototype = self._cache.get(structured)
            if prototype is None:
                prototype = self._compile(structured)
                self._cache[structured] = prototype
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(structured)
        return GrammarState(prototype, self.tokenizer().vocab_size)

    def _compile(self, structured: str) -> llguidance.LLMatcher:
        grammar, param = to_llguidance(structured)
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(param, f"invalid grammar: {matcher.get_error().strip()[:400]}")
        return matcher


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmask(states: list[GrammarState], generated: list[list[int]], pinned: bool = False) -> torch.Tensor:
    """[len(states), words] int32 on the CPU: bit t of row i is set when token t may follow state i, whose
    sequence holds ``generated[i]`` (all states of one batch share the model, so one width). Masks prefetched
    while the device ran the forward pass are used as they are when one job computed exactly this batch (the
    usual decode step), else copied; the others are computed here, together."""
    job = _whole_job(states, generated)
    if job is not None:
        for state in states:
            state.job = None
        return job.wait()
    words = bitmask_words(states[0].vocab_size)
    bitmask = _host_buffer(len(states), words, pinned)
    rows = bitmask.numpy()
    missing = []
    for i, (state, tokens) in enumerate(zip(states, generated, strict=True)):
        mask = state.prefetched(tokens)
        if mask is None:
            state.sync(tokens)
            missing.append((state.matcher, i))
        else:
            rows[i] = mask
    if missing:
        _executor("engine").unsafe_compute_mask_ptr(missing, bitmask.data_ptr(), words * 4, len(states))
    return bitmask


def _whole_job(states: list[GrammarState], generated: list[list[int]]) -> _MaskJob | None:
    """The job computing exactly these states' masks, in this order, for the tokens their sequences hold."""
    job = states[0].job
    if job is None or job.states != states:
        return None
    fits = all(s.job is job and len(t) == s.consumed for s, t in zip(states, generated, strict=True))
    return job if fits else None


def _host_buffer(n: int, words: int, pinned: bool) -> torch.Tensor:
    """A reused host buffer for n bitmask rows: pinned for a GPU, so the copy to it needs no staging. Reuse is
    safe: each step waits for its sampled tokens, after the copy of its bitmask, before the next fills this."""
    mine = _buffers.__dict__.setdefault("by_pinned", {})
    buffer = mine.get(pinned)
    if buffer is None or buffer.shape[0] < n or buffer.shape[1] != words:
        buffer = mine[pinned] = torch.empty((max(n, 64), words), dtype=torch.int32, pin_memory=pinned)
    return buffer[:n]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with ``[rows[i], t]`` set to -inf where bit t of ``bitmask[i]`` is clear (a new tensor, on
    logits' device: the input stays the model's raw logits, which logprobs are read from). ``rows`` None: every
    row, in order."""
    blocked = _blocked(bitmask, logits.device)
    vocab = logits.shape[-1]
    if blocked.shape[1] < vocab:  # logits wider than the grammar's vocabulary: the extra ids are never allowed
        blocked = torch.nn.functional.pad(blocked, (0, vocab - blocked.shape[1]), value=True)
    blocked = blocked[:, :vocab]
    if rows is None:
        return logits.masked_fill(blocked, float("-inf"))
    return logits.index_copy(0, rows, logits[rows].masked_fill(blocked, float("-inf")))


def _blocked(bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The bitmask as one bool per token, True where blocked, on ``device``. A GPU unpacks the 32x smaller
    bitmask itself (two kernels: each word against the 32 one-bit words); a CPU is faster with numpy's
    unpackbits (bit t of a little-endian int32 word is bit t % 8 of its byte t // 8)."""
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits) == 0
    ones = _bits.get(device)
    if ones is None:  # word i has bit i set (bit 31 is the int32's sign, as in the bitmask)
        words = np.array([1 << i for i in range(32)], dtype=np.uint32).view(np.int32)
        ones = _bits[device] = torch.from_numpy(words).to(device)
    mask = bitmask.to(device, non_blocking=True)
    return (mask.unsqueeze(-1) & ones).flatten(1) == 0


def apply_grammars(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """``logits`` ([len(seqs), vocab]) masked so each sequence with a grammar can only continue it (the input
    itself when none has one; never modified in place)."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return logits
    states = [seqs[i].grammar for i in rows]
    pinned = logits.device.type == "cuda"
    bitmask = fill_bitmask(states, [seqs[i].completion_ids for i in rows], pinned)
    if len(rows) == len(seqs):
        return apply_bitmask(logits, bitmask, None)
    # from pinned memory: queued behind the forward pass, not waiting for it as torch.tensor(..., device=) would
    index = torch.tensor(rows, pin_memory=pinned).to(logits.device, non_blocking=True)
    return apply_bitmask(logits, bitmask, index)


def accept_tokens(seqs: list, tokens: list[int], pinned: bool = False) -> None:
    """Each grammar takes its sequence's new token; the ones that can go on start their next masks on the mask
    thread (into pinned memory with ``pinned``, for a GPU). Tokens are taken one by one: about a microsecond
    each once the mask is computed, less than waking llguidance's pool for ``consume_token_par``."""
    going = []
    for seq, token in zip(seqs, tokens, strict=True):
        state = seq.grammar
        if state is not None:
            state.take(token)
            if not state.stopped:
                going.append(state)
    if going:
        job = _MaskJob(going, pinned)
        for i, state in enumerate(going):
            state.job, state.row = job, i


def _executor(role: str) -> llguidance.LLExecutor:
    """llguidance's thread pools: one for the engine thread's calls, one for the background jobs, so the two
    never share one."""
    if role not in _executors:
        _executors[role] = llguidance.LLExecutor()
    return _executors[role]


def _threads() -> ThreadPoolExecutor:
    """Where mask jobs run: one thread handing the batch to llguidance's own pool, beside the engine thread,
    which meanwhile launches the next forward pass and waits on the device."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
    return _pool
