"""The transformers reference engine: the builtin engine's streaming interface over a Hugging Face model.

It is correct and slow (one forward per request per step, no batching, its own DynamicCache per request): the
yardstick the builtin engine is checked against, and a fallback for architectures the builtin engine lacks.
"""

from __future__ import annotations

import torch

from gpu_runtime.engine.sampler import sample
from gpu_runtime.engine.sequence import RequestInbox, SamplingParams, Sequence, StepOutput, validate_prompt
from gpu_runtime.tokenizer import Tokenizer
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
        self.inbox.add(Sequence(request_id, prompt_ids, params))

    def abort(self, request_id: str) -> None:
        self.inbox.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.inbox.has_new() or bool(self._active)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        return FinishReason.LENGTH if seq.num_completion >= p.max_tokens or len(seq) >= self.max_len else None

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        new, aborted = self.inbox.take()
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
            token = sample(out.logits[:, -1].float(), [seq])[0]
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                del self._active[rid]
            else:
                self._active[rid] = (seq, out.past_key_values)
            outs.append(StepOutput(rid, [token], reason is not None, reason))
        return outs
