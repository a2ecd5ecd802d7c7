"""Continuous batching: each step is a decode batch (one token for every running sequence), a prefill batch (new
prompts, in chunks of at most ``max_num_batched_tokens``), or both at once.

A short prompt (at most ``mix_prompt_tokens`` left to compute) arriving while others decode joins their step: its
rows ride in the same replay as the decode rows (``max_batch_rows`` in all), so an arrival never stalls the
sequences already running. A longer prompt goes first, in a prefill step of its own, and joins the running batch
at the next step.

A sequence starting on no blocks (new, or preempted) first takes the cached blocks of its longest known prefix and
prefills only the rest.
When KV blocks run short the scheduler first asks for more (``grow``: the engine's KV pressure hook) and
otherwise preempts the most recently admitted sequence: its blocks are freed and it is recomputed later from its
tokens (its full blocks stay cached, so mostly found again), so no token changes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gpu_runtime.engine.block_manager import BlockManager
from gpu_runtime.engine.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Tokens ``[start, end)`` of ``seq`` are computed this step; a token is sampled if ``end == len(seq)``."""

    seq: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == len(self.seq)


@dataclass
class Batch:
    chunks: list[Chunk]
    is_prefill: bool


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        grow: Callable[[int], None],
        max_batch_rows: int = 0,
        mix_prompt_tokens: int = 0,
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_batch_rows = max_batch_rows  # 0: no mixed steps
        self.mix_prompt_tokens = mix_prompt_tokens
        self.grow = grow
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def _reserve(self, need: int) -> bool:
        """True if ``need`` blocks are free, after asking ``grow`` for the shortfall."""
        if need > self.blocks.num_free:
            self.grow(need - self.blocks.num_free)
        return need <= self.blocks.num_free

    def schedule(self) -> tuple[Batch | None, list[Sequence]]:
        """The next batch, and sequences that can never fit in the KV cache (to be finished by the caller)."""
        with self.blocks.lock:  # the limit must not drop between a check and its allocation (block_manager.py)
            return self._schedule()

    def _schedule(self) -> tuple[Batch | None, list[Sequence]]:
        if self.running and self.waiting and self._mixable(self.waiting[0], self.max_batch_rows - len(self.running)):
            return self._schedule_mixed(), []
        batch = self._schedule_prefill()
        if batch is None and not self.running and self.waiting:
            return None, self._unblock()
        if batch is None and self.running:
            batch = self._schedule_decode()
        return batch, []

    def _schedule_prefill(self) -> Batch | None:
        chunks: list[Chunk] = []
        budget = self.max_num_batched_tokens
        seats = len(self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            seats += seq.params.n if seq.forks_pending else 1  # its n sequences run once it samples
            if seats > self.max_num_seqs:
                break
            self.blocks.match(seq)
            end = min(len(seq), seq.num_cached + budget)
            if not self._reserve(self.blocks.blocks_needed(seq, end)):
                # Prefill what fits in the blocks we have; the rest waits for blocks to come free.
                end = min(end, (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size)
                if end <= seq.num_cached:
                    break
            self.blocks.allocate(seq, end)
            self.waiting.popleft()
            chunks.append(Chunk(seq, seq.num_cached, end))
            budget -= end - seq.num_cached
        return Batch(chunks, is_prefill=True) if chunks else None

    def _mixable(self, seq: Sequence, rows: int) -> bool:
        """Whether ``seq``'s prompt (after its cached prefix) is short enough to join a decode step with ``rows``
        rows to spare (a prompt that is not goes first, in a prefill step of its own, as before)."""
        if not self.max_batch_rows or seq.forks_pending or seq.needs_prompt_logits:
            return False  # n > 1 takes n seats once it samples; prompt logprobs come from an eager prefill
        self.blocks.match(seq)
        return len(seq) - seq.num_cached <= min(self.mix_prompt_tokens, rows)

    def _schedule_mixed(self) -> Batch:
        """Every running sequence's next token, then the waiting head's short prompts while rows, seats and
        blocks last (in order: a prompt that can't join ends the list)."""
        decode = self._schedule_decode()
        chunks, decoding, seats = decode.chunks, len(decode.chunks), len(self.running)
        rows = decoding
        while self.waiting and seats < self.max_num_seqs and self._mixable(self.waiting[0], self.max_batch_rows - rows):
            seq = self.waiting[0]
            if not self._reserve(self.blocks.blocks_needed(seq, len(seq))):
                break  # it waits for blocks (asking the pressure hook first, in _reserve)
            self.blocks.allocate(seq, len(seq))
            self.waiting.popleft()
            chunks.append(Chunk(seq, seq.num_cached, len(seq)))
            rows, seats = rows + len(seq) - seq.num_cached, seats + 1
        return Batch(chunks, is_prefill=len(chunks) > decoding)

    def _schedule_decode(self) -> Batch:
        scheduled: list[Sequence] = []
        bs = self.blocks.block_size
        while self.running:
            seq = self.running.popleft()
            if len(seq.token_ids) <= len(seq.block_table) * bs:  # its next slot is in a block it holds: most steps
                scheduled.append(seq)
                continue
            while not self._reserve(self.blocks.blocks_needed(seq, len(seq))):
                self._preempt(self.running.pop() if self.running else seq)
                if seq.status is Status.WAITING:
                    break
            else:
                self.blocks.allocate(seq, len(seq))
                scheduled.append(seq)
        self.running.extend(scheduled)
        return Batch([Chunk(s, s.num_cached, len(s)) for s in scheduled], is_prefill=False)

    def fork(self, parent: Sequence, child: Sequence, token: int) -> tuple[int, int] | None:
        """Start ``child`` (a sequence forked from ``parent`` as it sampled its first token) on the parent's prompt
        KV with its own first ``token``; returns the block copy the caller must make before the next step (see
        ``BlockManager.fork``). With no block free for that copy it waits instead, to be recomputed."""
        child.token_ids.append(token)
        try:
            copy = self.blocks.fork(parent, child)
        except RuntimeError:
            self.waiting.appendleft(child)
            return None
        child.status = Status.RUNNING
        self.running.append(child)
        return copy

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.info("preempted %s (%d tokens) for lack of KV blocks", seq.request_id, len(seq))

    def _unblock(self) -> list[Sequence]:
        """Nothing runs and the head of the queue cannot start: free partly prefilled sequences behind it, and
        give up on the head if the whole cache cannot hold it."""
        head = self.waiting[0]
        for seq in list(self.waiting)[1:]:
            if seq.block_table:
                self.blocks.free(seq)
        if self._reserve(self.blocks.blocks_needed(head, len(head))):
            return []
        self.waiting.popleft()
        self.blocks.free(head)
        log.warning("%s needs more KV blocks than the cache holds; finishing it", head.request_id)
        return [head]

    def postprocess(self, batch: Batch, sampled: list[int]) -> None:
        """Advance sequences past this step's tokens and append the sampled ones (in ``samples`` order)."""
        if not batch.is_prefill:  # every chunk is one token that samples (the hot path, per sequence per step)
            bs = self.blocks.block_size
            for chunk, token in zip(batch.chunks, sampled, strict=True):
                seq = chunk.seq
                seq.num_cached = chunk.end
                if seq.num_cached >= (seq.num_committed + 1) * bs:  # a block just filled up
                    self.blocks.commit(seq)
                seq.token_ids.append(token)
            return
        it = iter(sampled)
        partial: list[Sequence] = []
        for chunk in batch.chunks:
            seq = chunk.seq
            seq.num_cached = chunk.end
            self.blocks.commit(seq)
            if not chunk.samples:
                partial.append(seq)
                continue
            seq.token_ids.append(next(it))
            if seq.status is not Status.RUNNING:  # a prompt's first token (a mixed step's decode rows run already)
                seq.status = Status.RUNNING
                self.running.append(seq)
        self.waiting.extendleft(reversed(partial))
