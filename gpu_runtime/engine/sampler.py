"""Token selection: the request's logit adjustments, then greedy rows in one argmax and sampled rows each with
their own seeded generator."""

from __future__ import annotations

import torch

from gpu_runtime.engine.grammar import choose_constrained
from gpu_runtime.engine.penalties import adjust_logits
from gpu_runtime.engine.sequence import Sequence


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and the top-p nucleus (1-D, float32)."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already cover top_p; the first token always stays.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...] = ()) -> list[int]:
    """One token per row of ``logits`` (float32, [n, vocab]) for ``seqs`` in the same order. ``logits`` are the
    model's raw logits and are never modified in place (the engine reads logprobs from them afterwards)."""
    logits = adjust_logits(logits, seqs, eos_token_ids)
    # A mask of tokens a sequence may not take (a grammar) applies here: after adjustments, before choosing.
    return choose_constrained(logits, seqs, _choose)


def _choose(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    greedy = logits.argmax(dim=-1)
    if all(s.params.temperature == 0 for s in seqs):
        return greedy.tolist()
    out = greedy.tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            continue
        if seq.generator is None and p.seed is not None:
            # Each of a request's n sequences draws from its own stream, reproducible from the seed.
            seq.generator = torch.Generator(device=logits.device).manual_seed(p.seed + seq.index)
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    return out
