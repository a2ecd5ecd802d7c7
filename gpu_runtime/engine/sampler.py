"""Token selection: the request's logit adjustments and grammar masks, then greedy rows in one argmax and sampled
rows in one batched draw, each seeded sequence from its own generator.

A step waits for the device once, here, for the chosen tokens: everything before (adjustments, masks, the draw)
and the logprob reports that ride along are only queued, so on a GPU the host launches them while the forward
pass still runs.
"""

from __future__ import annotations

import torch

from gpu_runtime.engine.grammar import accept_tokens, apply_grammars
from gpu_runtime.engine.logprobs import start_reports
from gpu_runtime.engine.penalties import adjust_logits
from gpu_runtime.engine.sequence import SamplingParams, Sequence, to_device


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...] = (), logprobs: bool = False
) -> list[int]:
    """One token per row of ``logits`` (float32, [n, vocab]) for ``seqs`` in the same order; with ``logprobs``,
    the sequences that want them also get their tokens' reports (``logprobs.start_reports``). ``logits`` are the
    model's raw logits and are never modified in place (reports are read from them)."""
    adjusted = adjust_logits(logits, seqs, eos_token_ids)
    # A mask of tokens a sequence may not take (a grammar) applies here: after adjustments, before choosing.
    chosen = _choose(apply_grammars(adjusted, seqs), seqs)
    reports = start_reports(logits, chosen, seqs) if logprobs else None
    tokens = chosen.tolist()  # the step's one wait for the device
    accept_tokens(seqs, tokens, logits.is_cuda)  # first: it starts the grammars' next masks on their thread
    if reports is not None:
        reports.record(seqs)
    return tokens


def _choose(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Row i's token for ``seqs[i]`` ([n] int64 on logits' device): the argmax where temperature is 0, else a
    draw from the row's softmax at its temperature, top-k and top-p."""
    params = [s.params for s in seqs]
    if all(p.temperature == 0 for p in params):
        return logits.argmax(dim=-1)
    temperature = _column([p.temperature for p in params], logits)
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)  # greedy rows: computed, then not taken
    drawn = _draw(torch.softmax(_filter(scaled, params), dim=-1), seqs)
    if all(p.temperature > 0 for p in params):
        return drawn
    return torch.where(temperature[:, 0] > 0, drawn, logits.argmax(dim=-1))


def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row drawn from ``probs`` ([n, vocab]) by ``torch.multinomial(row, 1, generator)``'s own
    method (argmax of p / q with q ~ Exp(1)) without its input checks, which wait for the device. A seeded row
    draws from its own generator, seeded ``seed + index`` on first use, so each of a request's n sequences is
    reproducible from the seed (and draws what multinomial drew, bit for bit on a CPU); unseeded rows share one
    draw from torch's default generator."""
    q = torch.empty_like(probs)
    seeded = (s.params.temperature > 0 and s.params.seed is not None for s in seqs)
    own = [(row, s) for row, s, mine in zip(q.unbind(0), seqs, seeded, strict=True) if mine]
    if len(own) < len(seqs):
        q.exponential_()  # the rows without a generator of their own (greedy rows' draws are not taken)
    for row, seq in own:
        if seq.generator is None:
            seq.generator = torch.Generator(device=probs.device).manual_seed(seq.params.seed + seq.index)
        row.exponential_(generator=seq.generator)
    return (probs / q).argmax(dim=-1)


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask each row's logits outside its top-k and its top-p nucleus ([n, vocab] float32; rows that ask for
    neither are untouched)."""
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        # each row's k-th largest logit; a row without top-k points at a last column of -inf
        top = torch.nn.functional.pad(torch.topk(logits, max(ks), dim=-1).values, (0, 1), value=float("-inf"))
        kth = top.gather(1, _column([k - 1 if k else max(ks) for k in ks], logits, torch.long))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], logits)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already cover top_p; the first token always stays.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` as an [n, 1] column on ``like``'s device, of its dtype unless given."""
    return to_device(values, like.device, dtype or like.dtype)[:, None]
