"""Logit adjustments a request asks for, applied to the rows of the sequences that ask, one set of batched tensor
ops per step: min_tokens (eos and stop tokens masked until enough tokens exist), logit_bias (added), repetition
penalty (vLLM / transformers: a token in the prompt or output has a positive logit divided by the penalty, a
negative one multiplied) and presence / frequency penalties (OpenAI: ``logit -= frequency * count + presence *
(count > 0)`` over generated tokens). vLLM's order: min_tokens, bias, then penalties.
"""

from __future__ import annotations

import torch

from gpu_runtime.engine.sequence import Sequence, to_device


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """``logits`` ([n, vocab] float32, one row per sequence) with the adjustments applied; the input tensor is
    returned untouched when no sequence asks for any (and is never modified: raw logprobs are read from it)."""
    rows = [i for i, s in enumerate(seqs) if s.adjusts_logits]
    if not rows:
        return logits
    sub = [seqs[i] for i in rows]
    index = to_device(rows, logits.device)
    x = logits[index]  # a copy
    _mask_stops(x, sub, eos_token_ids)
    _add_bias(x, sub)
    x = _penalize(x, sub)
    return logits.index_copy(0, index, x)


def _mask_stops(x: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> None:
    cells = []
    for r, s in enumerate(seqs):
        if s.num_completion < s.params.min_tokens:
            stops = s.params.stop_token_ids + (() if s.params.ignore_eos else eos_token_ids)
            cells += [(r, t) for t in stops if t < x.shape[1]]
    if cells:
        r, t = to_device(cells, x.device).T
        x[r, t] = float("-inf")


def _add_bias(x: torch.Tensor, seqs: list[Sequence]) -> None:
    cells = [(r, t, b) for r, s in enumerate(seqs) for t, b in s.params.logit_bias]
    if cells:
        r, t, b = zip(*cells, strict=True)
        x.index_put_((to_device(r, x.device), to_device(t, x.device)), to_device(b, x.device, x.dtype), True)


def _counts(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] occurrence counts of each row's token ids (padding goes to a dropped extra column)."""
    width = max(1, max(len(r) for r in ids))
    padded = to_device([r + [vocab] * (width - len(r)) for r in ids], device)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    return counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))[:, :vocab]


def _history(seqs: list[Sequence], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, vocab] output-token counts and prompt-token mask. Each sequence keeps its rows between steps
    (``Sequence.penalty_history``), so a step stacks them and adds only the tokens generated since, instead of
    recounting every token list: built once per sequence, then one scatter per step."""
    fresh = [s for s in seqs if s.penalty_history is None]
    if fresh:
        counts = _counts([s.completion_ids for s in fresh], vocab, device)
        prompts = _counts([s.token_ids[: s.num_prompt_tokens] for s in fresh], vocab, device) > 0
        for s, c, p in zip(fresh, counts, prompts, strict=True):
            s.penalty_history = (c, p, s.num_completion)
    counts = torch.stack([s.penalty_history[0] for s in seqs])
    prompts = torch.stack([s.penalty_history[1] for s in seqs])
    cells = [(r, t) for r, s in enumerate(seqs) for t in s.completion_ids[s.penalty_history[2] :]]
    if cells:
        r, t = to_device(cells, device).T
        counts.index_put_((r, t), torch.ones(len(cells), device=device), accumulate=True)
    for r, s in enumerate(seqs):
        s.penalty_history = (counts[r], prompts[r], s.num_completion)  # views of this step's stacks
    return counts, prompts


def _penalize(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    ps = [s.params for s in seqs]
    additive = any(p.presence_penalty or p.frequency_penalty for p in ps)
    repetition = any(p.repetition_penalty != 1.0 for p in ps)
    if not (additive or repetition):
        return x
    dev = x.device
    out, prompt = _history(seqs, x.shape[1], dev)
    column = lambda vals: to_device(vals, dev, x.dtype)[:, None]  # noqa: E731
    if repetition:
        rep = column([p.repetition_penalty for p in ps])
        x = torch.where(prompt | (out > 0), torch.where(x > 0, x / rep, x * rep), x)
    if additive:
        x = x - column([p.frequency_penalty for p in ps]) * out - column([p.presence_penalty for p in ps]) * (out > 0)
    return x
