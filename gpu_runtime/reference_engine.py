"""The transformers reference engine: the builtin engine's streaming interface over a Hugging Face model.

It is correct and slow (one forward per request per step, no batching, its own DynamicCache per request): the
yardstick the builtin engine is checked against, and a fallback for architectures the builtin engine lacks.
"""

from __future__ import annotations

import torch

from gpu_runtime.engine.logprobs import token_logprobs
from gpu_runtime.engine.sampler import sample
from gpu_runtime.engine.sequence import (
    RequestInbox,
    SamplingParams,
    Sequence,
    StepOutput,
    validate_prompt,
    validate_sampling,
)
from gpu_runtime.tokenizer import Tokenizer
from protocol.errors import InvalidRequest
from protocol.messages import FinishReason


class ReferenceEngine:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM  # optional dependency: only this engine needs it

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.eos_token_ids = set(Tokenizer.from_pretrained(model_dir).eos_token_ids)
        self.max_len = self.model.config.max_position_embeddings
        self.inbox = RequestInbox()
        self._active: dict[str, tuple[Sequence, object]] = {}

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError (the worker answers 400) if it can't run, so it never poisons a step."""
        validate_prompt(request_id, prompt_ids, self.model.config.vocab_size, self.max_len)
        validate_sampling(request_id, params, self.model.config.vocab_size)
        for name, off in (("n", 1), ("prompt_logprobs", None)):
            if getattr(params, name) != off:
                raise InvalidRequest(f"request {request_id}: {name} is not supported by the transformers engine")
        self.inbox.add(Sequence(request_id, prompt_ids, params))

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.inbox.abort(request_id, index)

    def has_unfinished(self) -> bool:
        return self.inbox.has_new() or bool(self._active)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        return FinishReason.LENGTH if seq.num_completion >= p.max_tokens or len(seq) >= self.max_len else None

    @staticmethod
    def _output(seq: Sequence, token: int, reason: FinishReason | None) -> StepOutput:
        out = StepOutput(seq.request_id, [token], reason is not None, reason)
        if seq.params.logprobs is not None:
            out.logprobs, seq.logprobs = seq.logprobs, []
            out.cumulative_logprob = seq.cumulative_logprob
        return out

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        new, aborts = self.inbox.take()
        aborted = {rid for rid, _ in aborts}  # n is 1 here: aborting a sequence aborts its request
        outs = []
        for rid in aborted:
            if self._active.pop(rid, None) is not None:
                outs.append(StepOutput(rid, [], True, FinishReason.ABORT))
        for seq in new:
            if seq.request_id in aborted:
                outs.append(StepOutput(seq.request_id, [], True, FinishReason.ABORT))
            else:
                self._active[seq.request_id] = (seq, None)
        for rid, (seq, cache) in list(self._active.items()):
            ids = seq.token_ids if cache is None else seq.token_ids[-1:]
            out = self.model(torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            token = sample(logits, [seq], tuple(self.eos_token_ids))[0]
            token_logprobs(logits, [token], [seq])
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                del self._active[rid]
            else:
                self._active[rid] = (seq, out.past_key_values)
            outs.append(self._output(seq, token, reason))
        return outs
