"""Turns a scheduled batch into tensors, runs the model, and replays CUDA graphs for decode.

Decode graphs are captured lazily per padded batch size and keyed by the KV buffer's (address, size): weights
live at fixed addresses for the life of the worker, so after ``detach_kv`` + ``attach_kv`` at the same address
the captured graphs are valid again and are reused; a KV buffer at a new address gets its own graphs.

A prefill of one fresh sequence (the first request on an idle worker: the TTFT case) replays a graph too,
captured lazily per padded token count: a small model's prefill is otherwise bound by ~10 kernel launches per
layer from Python. Padding tokens sit after the prompt, so causal attention keeps them out of the real rows, and
their KV slots are -1 (not written).
"""

from __future__ import annotations

import logging
import time
from array import array
from dataclasses import dataclass

import torch

from gpu_runtime import device_sync
from gpu_runtime.engine.attention import AttnMeta, PrefillSeq
from gpu_runtime.engine.model import LlamaModel
from gpu_runtime.engine.scheduler import Batch
from gpu_runtime.engine.sequence import Sequence, to_device
from modelinfo.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class PromptHidden:
    """Final hidden states of ``seq``'s prompt positions ``first``, ``first + 1``, ... (each scores the next
    prompt token); logits are taken from them in slices, never for a whole long prompt at once."""

    seq: Sequence
    first: int
    hidden: torch.Tensor


GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# The longest prefill chunk run as decode rows: each row reads its whole context, so the attention's traffic grows
# with rows x context (a 256-token prompt's rows read 64 MB a layer on a 1B shape; flash prefill reads it once).
ROW_PREFILL_TOKENS = 256
# Beyond 2048 tokens even a 1B model's prefill is GPU-bound, so larger prompts run eagerly.
PREFILL_GRAPH_TOKENS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        model: LlamaModel,
        device: torch.device,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        use_cuda_graphs: bool,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_blocks: torch.Tensor | None = None  # the whole cache, one row per block (for block copies)
        self.kv_key: tuple[int, int] | None = None
        # Slot indices: int32 for the Triton kernels on CUDA, int64 for torch indexing on CPU.
        self._index_dtype = torch.int32 if device.type == "cuda" else torch.long
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        # Rows of one replay: a full decode batch plus as many rows of arriving prompts (mixed steps, scheduler.py).
        self.max_num_seqs = max_num_seqs
        self.max_rows = 2 * max_num_seqs
        self.graph_sizes = [b for b in GRAPH_BATCH_SIZES if b < self.max_rows] + [self.max_rows]
        self.graphs: dict[tuple[tuple[int, int], int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graphs: dict[tuple[tuple[int, int], int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.use_cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()
            n = max(self.graph_sizes)
            # Static graph inputs, so one step is two host->device copies: rows of [input id, position, slot
            # block, slot offset, context length] per sequence, and the block tables.
            self._header = torch.zeros(5, n, dtype=torch.long, device=device)
            self._tables = torch.zeros(n, self.max_blocks_per_seq, dtype=torch.long, device=device)
            # The rows whose logits are taken (one per sequence at most, so at most max_num_seqs of them): logits
            # of every row of a mixed replay would be [rows, vocab] float32, 256 MB for 512 rows of a 128k vocab.
            self._sample = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
            # Prefill graph inputs: rows of [input id, position, slot block, slot offset], and the sampled row.
            self._prefill_in = torch.zeros(4, PREFILL_GRAPH_TOKENS[-1], dtype=torch.long, device=device)
            self._prefill_last = torch.zeros(1, dtype=torch.long, device=device)

    # KV cache ------------------------------------------------------------------------------------------------

    def set_kv(self, buffer: torch.Tensor | None, num_blocks: int) -> None:
        """Carve per-layer K/V views from a block-major uint8 buffer (None: drop them)."""
        if buffer is None:
            self.kv_caches, self.kv_blocks, self.kv_key = [], None, None
            return
        c = self.cfg
        shape = (num_blocks, c.num_hidden_layers, 2, self.block_size, c.num_key_value_heads, c.head_dim)
        n = 1
        for x in shape:
            n *= x
        cache = buffer[: n * self.model.embed.element_size()].view(self.model.embed.dtype).view(shape)
        self.kv_caches = [(cache[:, i, 0], cache[:, i, 1]) for i in range(c.num_hidden_layers)]
        self.kv_blocks = cache
        self.kv_key = (buffer.data_ptr(), buffer.numel())

    # batches -------------------------------------------------------------------------------------------------

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V of every layer (a forked sequence's own copy of a shared partial block)."""
        self.kv_blocks[dst].copy_(self.kv_blocks[src])

    def run(self, batch: Batch) -> torch.Tensor:
        """float32 logits for every chunk that samples, in batch order."""
        return self.execute(batch)[0]

    @torch.inference_mode()
    def execute(self, batch: Batch) -> tuple[torch.Tensor, list[PromptHidden]]:
        """``run``'s logits, plus the final hidden states of prompt positions whose logprobs a sequence asked for
        (``Sequence.prompt_logprob_positions``; none unless asked, so a plain batch pays nothing)."""
        if batch.is_prefill:
            return self._prefill(batch)
        return self._decode(batch), []

    def _slots(self, seq, start: int, end: int) -> tuple[list[int], list[int]]:
        bs = self.block_size
        return [seq.block_table[p // bs] for p in range(start, end)], [p % bs for p in range(start, end)]

    def _prefill(self, batch: Batch) -> tuple[torch.Tensor, list[PromptHidden]]:
        c = batch.chunks[0]
        n = c.end - c.start
        tokens = next((t for t in PREFILL_GRAPH_TOKENS if t >= n), None) if self.use_cuda_graphs else None
        fresh = len(batch.chunks) == 1 and c.start == 0  # one prompt from its start: the prefill graph's case
        if not fresh and self._as_rows(batch):
            return self._prefill_as_rows(batch), []
        if tokens is not None and fresh and not c.seq.needs_prompt_logits:
            graph, logits = self._prefill_graph(tokens)
            blocks, offsets = self._slots(c.seq, 0, n)
            pad = tokens - n
            rows = [
                c.seq.token_ids[:n] + [0] * pad,
                list(range(n)) + [0] * pad,
                blocks + [-1] * pad,
                offsets + [0] * pad,
            ]
            self._prefill_in[:, :tokens].copy_(torch.tensor(rows), non_blocking=True)
            self._prefill_last.fill_(n - 1)
            graph.replay()
            return (logits if c.samples else logits[:0]), []
        ids, positions, blocks, offsets, seqs, last, scored = [], [], [], [], [], [], []
        for c in batch.chunks:
            span = c.seq.prompt_logprob_positions(c.start, c.end)
            if span:
                first = len(ids) - c.start
                scored.append((c.seq, span.start, first + span.start, first + span.stop))
            start = len(ids)
            ids += c.seq.token_ids[c.start : c.end]
            positions += range(c.start, c.end)
            b, o = self._slots(c.seq, c.start, c.end)
            blocks += b
            offsets += o
            table = torch.tensor(c.seq.block_table, dtype=torch.long, device=self.device) if c.start else None
            seqs.append(PrefillSeq(start, len(ids), c.start, table))
            if c.samples:
                last.append(len(ids) - 1)
        t = lambda x, dt=torch.long: to_device(x, self.device, dt)  # noqa: E731
        meta = AttnMeta(True, t(blocks, self._index_dtype), t(offsets, self._index_dtype), prefill=seqs)
        hidden = self.model.forward(t(ids), t(positions), meta, self.kv_caches)
        prompt = [PromptHidden(seq, pos, hidden[a:b]) for seq, pos, a, b in scored]
        return self.model.logits(hidden[t(last)]), prompt

    def _as_rows(self, batch: Batch) -> bool:
        """A prefill whose chunks are each short enough to run as decode rows (see ``_prefill_as_rows``)."""
        longest = min(ROW_PREFILL_TOKENS, self.max_rows)
        return all(c.end - c.start <= longest and not c.seq.needs_prompt_logits for c in batch.chunks)

    def _prefill_as_rows(self, batch: Batch) -> torch.Tensor:
        """Short prefill chunks (a prefix-cache hit's uncached tail, a recompute's rest, the prompts of requests
        arriving while others decode) run as decode rows: one row per new token, attending through the paged
        decode kernel to its sequence's positions up to its own. Rows are written to the cache before any row's
        attention reads it (layer by layer), so each sees exactly its causal context, and a step replays decode
        CUDA graphs where the eager prefill pays ~15 kernel launches per layer and sequence from Python.
        Sequences never attend to each other, so chunks are grouped into replays of at most the largest graph. A
        mixed step's decode chunks (one token each) are rows like any other."""
        limit, groups, group = self.max_rows, [], []
        for c in batch.chunks:
            if group and sum(g.end - g.start for g in group) + c.end - c.start > limit:
                groups.append(group)
                group = []
            group.append(c)
        groups.append(group)
        if len(groups) == 1:
            return self._chunk_rows(group)
        # Each replay rewrites its graph's static output (and graphs share one memory pool): keep a group's logits
        # before the next group's replay.
        return torch.cat([self._chunk_rows(g).clone() for g in groups])

    def _chunk_rows(self, chunks: list) -> torch.Tensor:
        """Logits of the chunks' sampling rows, in order."""
        ids, positions, tables, last = [], [], [], []
        for c in chunks:
            ids += c.seq.token_ids[c.start : c.end]
            positions += range(c.start, c.end)
            tables += [c.seq.block_table] * (c.end - c.start)
            if c.samples:
                last.append(len(ids) - 1)
        return self._run_rows(ids, positions, tables, last)

    def _decode(self, batch: Batch) -> torch.Tensor:
        seqs = [c.seq for c in batch.chunks]
        ids = [s.token_ids[-1] for s in seqs]
        rows = range(len(seqs))
        return self._run_rows(ids, [len(s) - 1 for s in seqs], [s.block_table for s in seqs], rows)

    def _run_rows(
        self, ids: list[int], positions: list[int], tables: list[list[int]], sample: list[int] | range
    ) -> torch.Tensor:
        """One token per row (``ids[i]`` at ``positions[i]`` of the sequence whose blocks are ``tables[i]``), each
        attending to positions ``<= positions[i]`` through the paged decode kernel; logits of rows ``sample``."""
        n = len(ids)
        blocks = [t[p // self.block_size] for t, p in zip(tables, positions, strict=True)]
        offsets = [p % self.block_size for p in positions]
        width = max(len(t) for t in tables)
        # Built through array: nested lists into torch.tensor cost about a microsecond an element.
        zeros, flat = [0] * width, array("q")
        for t in tables:
            flat.extend(t)
            flat.extend(zeros[len(t) :])
        padded = torch.frombuffer(flat, dtype=torch.long).view(n, width)
        lens = [p + 1 for p in positions]
        graph_bs = next((b for b in self.graph_sizes if b >= n), None) if self.use_cuda_graphs else None
        if graph_bs is None:
            t = lambda x, dt: to_device(x, self.device, dt)  # noqa: E731
            meta = AttnMeta(False, t(blocks, self._index_dtype), t(offsets, self._index_dtype))
            meta.block_tables = padded.to(self.device, torch.int32, non_blocking=True)
            meta.context_lens = t(lens, torch.int32)
            hidden = self.model.forward(t(ids, torch.long), t(positions, torch.long), meta, self.kv_caches)
            return self.model.logits(hidden[t(list(sample), torch.long)])
        graph, logits = self._graph(graph_bs)  # capture first: capturing resets the static inputs
        pad = [0] * (graph_bs - n)
        header = array("q", ids + pad + positions + pad + blocks + [-1] * len(pad) + offsets + pad + lens + pad)
        header = torch.frombuffer(header, dtype=torch.long).view(5, graph_bs)
        self._header[:, :graph_bs].copy_(header, non_blocking=True)
        self._tables[:n, :width].copy_(padded, non_blocking=True)
        static = self._graph_sample(graph_bs)
        picked = array("q", sample)
        picked.extend([0] * (len(static) - len(picked)))
        static.copy_(torch.frombuffer(picked, dtype=torch.long), non_blocking=True)
        graph.replay()
        return logits[: len(sample)]

    def missing_graphs(self) -> list[int]:
        """Decode graph sizes not captured yet for the attached KV cache (none without graphs or a cache)."""
        if not self.use_cuda_graphs or self.kv_key is None:
            return []
        return [bs for bs in self.graph_sizes if (self.kv_key, bs) not in self.graphs]

    @torch.inference_mode()
    def capture_graph(self, bs: int) -> None:
        """Capture the decode graph for ``bs`` rows now rather than at the first step that needs it."""
        self._graph(bs)

    def _graph_sample(self, bs: int) -> torch.Tensor:
        """The static sampled-rows input of the graph for ``bs`` rows."""
        return self._sample[: min(bs, self.max_num_seqs)]

    def _graph(self, bs: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (self.kv_key, bs)
        if key not in self.graphs:
            head = self._header[:, :bs]
            head[2].fill_(-1)  # the warm-up run must not write into live KV blocks
            head[4].zero_()
            meta = AttnMeta(False, head[2], head[3], block_tables=self._tables[:bs], context_lens=head[4])
            sample = self._graph_sample(bs)
            sample.zero_()
            self.graphs[key] = self._capture(
                lambda: self.model.logits(self.model.forward(head[0], head[1], meta, self.kv_caches)[sample]),
                f"decode batch {bs}",
            )
        return self.graphs[key]

    def _prefill_graph(self, tokens: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (self.kv_key, tokens)
        if key not in self.prefill_graphs:
            rows = self._prefill_in[:, :tokens]
            rows[2].fill_(-1)  # the warm-up run must not write into live KV blocks
            self._prefill_last.zero_()  # nor index past this bucket's rows
            meta = AttnMeta(True, rows[2], rows[3], prefill=[PrefillSeq(0, tokens, 0, None)])
            self.prefill_graphs[key] = self._capture(
                lambda: self.model.logits(
                    self.model.forward(rows[0], rows[1], meta, self.kv_caches)[self._prefill_last]
                ),
                f"prefill of {tokens} tokens",
            )
        return self.prefill_graphs[key]

    def _capture(self, run, what: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        began = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # compiles Triton kernels and warms cuBLAS outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # Graphs are captured lazily while the worker serves; other threads may map, unmap and copy for other
        # models meanwhile. "thread_local" confines capture's restrictions to this thread ("global", the default,
        # would fail the capture or their calls); device-wide synchronisation waits for the capture to end.
        try:
            with device_sync.capturing(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = run()
        except Exception:
            # A failed capture can leave its memory pool marked as recording, and every later capture into it
            # would fail: later graphs of this runner go to a fresh pool (the failed one's memory is lost).
            self._pool = torch.cuda.graph_pool_handle()
            raise
        log.info("captured %s CUDA graph in %.0f ms", what, 1e3 * (time.perf_counter() - began))
        return graph, out
