"""The engine: requests in, tokens out, over a paged KV cache with continuous batching.

Memory seam: weights are one buffer described by a ``WeightLayout``; the KV cache is one block-major buffer that
can be attached and detached (HOT <-> WARM) and whose top can be lent out (``set_kv_limit``). Both come from an
``Allocator`` unless handed in.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace

import torch

from gpu_runtime.allocator import Allocator, TorchAllocator
from gpu_runtime.engine.block_manager import BlockManager
from gpu_runtime.engine.grammar import GrammarCompiler
from gpu_runtime.engine.logprobs import prompt_logprobs
from gpu_runtime.engine.model import LlamaModel
from gpu_runtime.engine.model_runner import ROW_PREFILL_TOKENS, ModelRunner
from gpu_runtime.engine.sampler import sample
from gpu_runtime.engine.scheduler import Scheduler
from gpu_runtime.engine.sequence import (
    RequestInbox,
    RequestOutput,
    SamplingParams,
    Sequence,
    StepOutput,
    validate_prompt,
    validate_sampling,
)
from gpu_runtime.weights import SERVING_DTYPES as DTYPES
from gpu_runtime.weights import WeightLayout, load_weights, plan_weights
from modelinfo.config import ModelConfig, load_model_config
from protocol.errors import InvalidRequest
from protocol.messages import FinishReason

log = logging.getLogger(__name__)

# Default KV size on CPU (tests, CI): plenty for small models, bounded for big ones.
CPU_KV_BYTES = 512 * 1024 * 1024
# Default on CUDA: free memory minus this headroom for activations and CUDA graphs.
CUDA_KV_HEADROOM = 4 * 1024**3
# How long a thread may hold the GIL while another waits for it. CPython's default, 5 ms, is longer than a decode
# step (1-6 ms): a helper thread of the engine (a grammar's next masks, the worker's reads) that needs the GIL for a
# moment waits out steps' worth of the engine thread's Python. Measured on an H200 (docs/structured_output.md,
# "Cost on the GPU"): JSON-grammar decode at batch 32 on the 1B shape, 0.54 -> 0.68 of the unconstrained speed.
GIL_SWITCH_S = 0.0002


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _device(device: str | torch.device) -> torch.device:
    """``cuda`` -> ``cuda:N`` (the current device), so buffers' devices compare equal to the engine's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Engine:
    """One model, served with continuous batching over a paged KV cache.

    ``generate`` runs prompts to completion; the worker uses ``add_request``/``abort`` (any thread) and ``step``
    (one engine thread). The memory seam: ``from_weights`` over a filled weight buffer, ``attach_kv``/``detach_kv``
    of a block-major KV buffer (``kv_block_bytes`` per block), ``set_kv_limit`` to keep out of its lent top, and
    ``kv_pressure_hook(want) -> given`` called before preempting when blocks run short.
    """

    def __init__(
        self,
        model_dir: str,
        layout: WeightLayout,
        weights: torch.Tensor,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        allocator: Allocator | None = None,
        num_kv_blocks: int | None = 0,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        prefix_caching: bool = True,
        prefix_salt: str = "",
    ) -> None:
        self.device = _device(device)
        if self.device.type == "cuda":
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_S))
        self.dtype = _dtype(dtype)
        if layout.dtype != self.dtype:
            raise ValueError(f"weight layout is {layout.dtype}, engine dtype is {self.dtype}")
        self.config: ModelConfig = load_model_config(model_dir)
        self.model_dir = model_dir
        self.allocator = allocator or TorchAllocator(self.device)
        self.block_size = block_size
        self.max_model_len = min(
            max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings
        )
        self.model = LlamaModel(self.config, layout, weights)
        self.layout = layout
        self._weights = weights
        self._weights_owned = False
        self.runner = ModelRunner(
            self.config, self.model, self.device, block_size, max_num_seqs, self.max_model_len, not enforce_eager
        )
        c = self.config
        self.kv_block_bytes = 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim
        self.kv_block_bytes *= weights.new_empty((), dtype=layout.activation_dtype).element_size()
        # The prefix cache's salt: the model and dtype, plus the caller's serving identity (the worker's key).
        salt = f"{self.model_dir}:{self.dtype}:{prefix_salt}" if prefix_caching else None
        self.blocks = BlockManager(0, block_size, salt)
        self.scheduler = Scheduler(
            self.blocks, max_num_seqs, max_num_batched_tokens, self._grow, self.runner.max_rows, ROW_PREFILL_TOKENS
        )
        self.grammars = GrammarCompiler(model_dir, self.config.vocab_size, self.config.eos_token_ids)
        self.kv_pressure_hook: Callable[[int], int] | None = None
        self._kv_buffer: torch.Tensor | None = None
        self._kv_owned = False
        self.inbox = RequestInbox()
        self._seqs: dict[str, list[Sequence]] = {}  # request id -> its live sequences
        if num_kv_blocks is None:
            num_kv_blocks = self._default_kv_blocks(max_num_seqs)
        if num_kv_blocks:
            self.attach_kv(self.allocator.allocate(num_kv_blocks * self.kv_block_bytes, "kv"))
            self._kv_owned = True

    # construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str = "cpu",
        dtype: str = "float32",
        allocator: Allocator | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 8192,
        **kwargs,
    ) -> Engine:
        """Load a Hugging Face directory: plan the weight buffer, allocate it, read the safetensors into it."""
        torch_dtype = _dtype(dtype)
        layout = plan_weights(path, torch_dtype)
        allocator = allocator or TorchAllocator(_device(device))
        weights = allocator.allocate(layout.total_bytes, "weights")
        load_weights(layout, weights)
        engine = cls(
            layout.model_dir, layout, weights, device, torch_dtype, allocator, num_kv_blocks,
            block_size, max_num_seqs, max_num_batched_tokens, **kwargs,
        )  # fmt: skip
        engine._weights_owned = True
        return engine

    @classmethod
    def from_weights(
        cls,
        model_dir: str,
        layout: WeightLayout,
        weights: torch.Tensor,
        device: str | torch.device,
        dtype: str | torch.dtype,
        allocator: Allocator | None = None,
        num_kv_blocks: int | None = 0,
        **kwargs,
    ) -> Engine:
        """An engine over weights already in ``weights`` (e.g. the worker's pool); no copy. With the default
        ``num_kv_blocks=0`` it starts WARM: call ``attach_kv`` before serving."""
        return cls(model_dir, layout, weights, device, dtype, allocator, num_kv_blocks, **kwargs)

    def _default_kv_blocks(self, max_num_seqs: int) -> int:
        want = max_num_seqs * -(-self.max_model_len // self.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free - CUDA_KV_HEADROOM
        else:
            budget = CPU_KV_BYTES
        blocks = min(want, budget // self.kv_block_bytes)
        if blocks < 1:
            raise RuntimeError(f"no memory left for a KV cache on {self.device}")
        return int(blocks)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids

    # KV memory seam ------------------------------------------------------------------------------------------

    @property
    def num_kv_blocks(self) -> int:
        return self.blocks.num_blocks

    def attach_kv(self, buffer: torch.Tensor) -> None:
        """Use ``buffer`` (uint8, a multiple of ``kv_block_bytes``) as the KV cache; blocks are its slices."""
        if self._kv_buffer is not None:
            raise RuntimeError("a KV buffer is already attached; detach_kv() first")
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.device != self.device:
            raise ValueError(f"KV buffer must be a 1-D uint8 tensor on {self.device}")
        if buffer.numel() % self.kv_block_bytes or buffer.numel() == 0:
            raise ValueError(f"KV buffer of {buffer.numel()} bytes is not a multiple of {self.kv_block_bytes}")
        num_blocks = buffer.numel() // self.kv_block_bytes
        self._kv_buffer = buffer
        self.blocks.reset(num_blocks)
        self.runner.set_kv(buffer, num_blocks)
        log.info("KV cache attached: %d blocks of %d bytes", num_blocks, self.kv_block_bytes)

    def detach_kv(self) -> None:
        """Drop the KV cache views (the caller owns the buffer; an engine-allocated one is released)."""
        if self.scheduler.has_unfinished() or self.inbox.has_new():
            raise RuntimeError("detach_kv: requests are still running; abort or finish them first")
        buffer, self._kv_buffer = self._kv_buffer, None
        self.runner.set_kv(None, 0)
        self.blocks.reset(0)
        if buffer is not None and self._kv_owned:
            self.allocator.release(buffer)
        self._kv_owned = False

    def missing_graphs(self) -> list[int]:
        """Decode batch sizes whose CUDA graph is not captured yet (empty on CPU)."""
        return self.runner.missing_graphs()

    def capture_graph(self, rows: int) -> None:
        """Capture one decode graph ahead of need (the caller keeps ``step`` from running meanwhile)."""
        self.runner.capture_graph(rows)

    def prefix_cache_tokens(self) -> tuple[int, int]:
        """(prompt tokens served from the prefix cache, prompt tokens looked up), each request counted once."""
        return self.blocks.hit_tokens, self.blocks.query_tokens

    def set_kv_limit(self, blocks: int) -> bool:
        """Use only block ids < ``blocks``; False if a block at or above it is in use (nothing changes)."""
        return self.blocks.set_limit(blocks)

    def _grow(self, want: int) -> None:
        """Scheduler ran short by ``want`` blocks: ask the pressure hook to give some of the lent top back.
        The hook returns how many blocks it freed above the limit; the engine raises its limit by that much
        (a hook that already called ``set_kv_limit`` itself gives the same result)."""
        if self.kv_pressure_hook is None or self.blocks.limit >= self.blocks.num_blocks:
            return
        old = self.blocks.limit
        given = max(0, int(self.kv_pressure_hook(want)))
        self.blocks.set_limit(max(self.blocks.limit, old + given))

    # requests ------------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (thread-safe); its tokens come out of ``step``, per sequence index with n > 1."""
        validate_prompt(request_id, prompt_ids, self.config.vocab_size, self.max_model_len)
        validate_sampling(request_id, params, self.config.vocab_size)
        if params.n > self.scheduler.max_num_seqs:
            raise InvalidRequest(
                f"request {request_id}: n {params.n} exceeds max_num_seqs {self.scheduler.max_num_seqs}"
            )
        seq = Sequence(request_id, prompt_ids, params)
        seq.grammar = self.grammars.start(params.structured)  # a bad grammar is a 400 here, before queueing
        self.inbox.add(seq)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Cancel a request, or only its sequence ``index`` (thread-safe); the next ``step`` reports each
        sequence cancelled finished with reason "abort"."""
        self.inbox.abort(request_id, index)

    def has_unfinished(self) -> bool:
        return self.inbox.has_new() or self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        """Run one batch; call from one thread only."""
        outputs = self._take_new_and_aborts()
        if self._kv_buffer is None:
            if self.scheduler.has_unfinished():
                raise RuntimeError("no KV cache attached; call attach_kv() before serving")
            return outputs
        batch, hopeless = self.scheduler.schedule()
        for seq in hopeless:
            outputs += self._finish(seq, FinishReason.LENGTH)
        if batch is None or not batch.chunks:
            return outputs
        logits, prompt_hidden = self.runner.execute(batch)
        for ph in prompt_hidden:
            prompt_logprobs(self.model.logits, ph.seq, ph.first, ph.hidden)
        sampled = [c.seq for c in batch.chunks if c.samples] if batch.is_prefill else [c.seq for c in batch.chunks]
        seqs, logits = self._with_forks(sampled, logits) if batch.is_prefill else (sampled, logits)
        tokens = sample(logits, seqs, self.eos_token_ids, logprobs=True) if seqs else []
        self.scheduler.postprocess(batch, tokens[: len(sampled)])
        for child, token in zip(seqs[len(sampled) :], tokens[len(sampled) :], strict=True):
            copy = self.scheduler.fork(self._seqs[child.request_id][0], child, token)
            if copy is not None:
                self.runner.copy_block(*copy)
        for seq in seqs:
            reason = self._stop_reason(seq)
            if reason:
                self._remove(seq, reason)
            outputs.append(self._output(seq, reason))
        return outputs

    def _with_forks(self, sampled: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """A request with n > 1 samples its n first tokens from index 0's prompt logits (in a prefill batch): its
        other sequences are forked here and appended, each with a copy of that logits row."""
        rows, children = list(range(len(sampled))), []
        for i, seq in enumerate(sampled):
            if seq.forks_pending:
                kids = [seq.fork(index) for index in range(1, seq.params.n)]
                self._seqs[seq.request_id] += kids
                children += kids
                rows += [i] * len(kids)
        if not children:
            return sampled, logits
        return sampled + children, logits[torch.tensor(rows, device=logits.device)]

    def _take_new_and_aborts(self) -> list[StepOutput]:
        new, aborted = self.inbox.take()
        for seq in new:
            self._seqs[seq.request_id] = [seq]
            self.scheduler.add(seq)
        outputs = []
        for rid, index in aborted:
            for seq in list(self._seqs.get(rid, ())):
                if index is None or seq.index == index:
                    outputs += self._finish(seq, FinishReason.ABORT)
        return outputs

    def _remove(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.remove(seq)
        seq.finish_reason = reason
        group = self._seqs.get(seq.request_id, [])
        if seq in group:
            group.remove(seq)
        if not group:
            self._seqs.pop(seq.request_id, None)

    def _finish(self, seq: Sequence, reason: FinishReason) -> list[StepOutput]:
        """End ``seq`` early (aborted, or it can never fit); an n > 1 request that never forked ends every
        index, so each still gets its one finished output."""
        self._remove(seq, reason)
        outputs = [self._output(seq, reason)]
        if seq.forks_pending:
            outputs += [StepOutput(seq.request_id, [], True, reason, i) for i in range(1, seq.params.n)]
        return outputs

    def _output(self, seq: Sequence, reason: FinishReason | None) -> StepOutput:
        """The tokens (and their logprobs) ``seq`` produced since its last output (per sequence per step: kept
        to plain attribute reads)."""
        start = seq.num_prompt_tokens + seq.num_returned
        out = StepOutput(seq.request_id, seq.token_ids[start:], reason is not None, reason, seq.index)
        if seq.num_returned == 0 and seq.index == 0 and not seq.needs_prompt_logits:  # once, and only whole
            out.prompt_logprobs = seq.prompt_logprobs
        seq.num_returned = len(seq.token_ids) - seq.num_prompt_tokens
        if seq.wants_logprobs:
            if seq.params.logprobs is not None:
                out.logprobs, seq.logprobs = seq.logprobs, []
            out.cumulative_logprob = seq.cumulative_logprob
        return out

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        p = seq.params
        if seq.grammar is not None and seq.grammar.advance(seq.completion_ids):
            return FinishReason.STOP  # the grammar is complete and can't go on
        last = seq.token_ids[-1]
        if last in p.stop_token_ids or (not p.ignore_eos and last in self.config.eos_token_ids):
            return FinishReason.STOP
        if seq.num_completion >= p.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion (continuous batching across them); outputs in prompt order (with n > 1,
        sequence 0's, every sequence in ``sequences``)."""
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{uuid.uuid4().hex[:12]}" for _ in prompts]
        results = {
            rid: [RequestOutput(rid, list(prompt), [], None) for _ in range(p.n)]
            for rid, prompt, p in zip(ids, prompts, plist, strict=True)
        }
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        pending = {(rid, i) for rid, p in zip(ids, plist, strict=True) for i in range(p.n)}
        while pending:
            for out in self.step():
                if out.request_id in results:
                    _merge(results[out.request_id][out.index], out)
                    if out.finished:
                        pending.discard((out.request_id, out.index))
        return [
            replace(results[rid][0], sequences=results[rid]) if len(results[rid]) > 1 else results[rid][0]
            for rid in ids
        ]

    def release(self) -> None:
        """Give buffers the engine allocated (KV; weights too after from_pretrained) back to the allocator."""
        self.detach_kv()
        if self._weights_owned:
            self._weights_owned = False
            self.model = self.runner = None
            self.allocator.release(self._weights)


def _merge(result: RequestOutput, out: StepOutput) -> None:
    result.token_ids += out.new_token_ids
    if out.logprobs is not None:
        result.logprobs = (result.logprobs or []) + out.logprobs
    if out.cumulative_logprob is not None:
        result.cumulative_logprob = out.cumulative_logprob
    if out.prompt_logprobs is not None:
        result.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        result.finish_reason = out.finish_reason
