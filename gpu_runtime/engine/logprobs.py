"""Log-probabilities of the model's own distribution: ``log_softmax`` of the raw logits, before temperature,
penalties, bias or a grammar mask (what vLLM returns by default, and what lm-eval's log-likelihoods need).

Each report is the chosen token's logprob and the k most likely (token, logprob) pairs, best first. A batch's
reports cross to the host in one copy: chosen logprobs, top values and top ids side by side in one float32 matrix
(ids stay exact below 2**24, far above any vocabulary).
"""

from __future__ import annotations

import torch

from gpu_runtime.engine.sequence import Logprob, Sequence

# Prompt positions scored per logits matmul: [rows, vocab] float32 stays small even for a 128k vocabulary.
PROMPT_SLICE = 256


def _reports(logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[Logprob]:
    """One report per row of ``logits`` ([R, vocab] float32) for token ``chosen[r]`` with ``ks[r]`` alternatives."""
    lp = torch.log_softmax(logits, dim=-1)
    cols = [lp.gather(1, chosen[:, None])]
    k = max(ks)
    if k:
        top = lp.topk(k, dim=-1)
        cols += [top.values, top.indices.to(lp.dtype)]
    rows = torch.cat(cols, dim=1).tolist()
    return [
        (row[0], tuple(zip(map(int, row[1 + k : 1 + k + kr]), row[1 : 1 + kr], strict=True)))
        for row, kr in zip(rows, ks, strict=True)
    ]


def token_logprobs(logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> None:
    """Record the sampled ``tokens``' reports on the sequences that want them (``Sequence.wants_logprobs``) and add
    to their cumulative logprob; nothing is computed when none does."""
    rows = [i for i, s in enumerate(seqs) if s.wants_logprobs]
    if not rows:
        return
    if len(rows) < len(seqs):
        logits = logits[torch.tensor(rows, device=logits.device)]
    chosen = torch.tensor([tokens[i] for i in rows], device=logits.device)
    reports = _reports(logits, chosen, [seqs[i].params.logprobs or 0 for i in rows])
    for i, report in zip(rows, reports, strict=True):
        seq = seqs[i]
        seq.cumulative_logprob += report[0]
        if seq.params.logprobs is not None:
            seq.logprobs.append(report)


def prompt_logprobs(lm_head, seq: Sequence, first: int, hidden: torch.Tensor) -> None:
    """Score ``seq``'s prompt tokens ``first + 1 ...`` from the final hidden states of positions ``first ...``
    (``lm_head`` maps hidden states to float32 logits), appending to ``seq.prompt_logprobs``."""
    k = seq.params.prompt_logprobs or 0
    targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + len(hidden)], device=hidden.device)
    for a in range(0, len(hidden), PROMPT_SLICE):
        part = targets[a : a + PROMPT_SLICE]
        seq.prompt_logprobs.extend(_reports(lm_head(hidden[a : a + PROMPT_SLICE]), part, [k] * len(part)))
