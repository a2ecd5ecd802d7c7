"""Log-probabilities of the model's own distribution: ``log_softmax`` of the raw logits, before temperature,
penalties, bias or a grammar mask (what vLLM returns by default, and what lm-eval's log-likelihoods need).

Each report is the chosen token's logprob and the k most likely (token, logprob) pairs, best first. A batch's
reports cross to the host in one copy: chosen logprobs, top values and top ids side by side in one float32 matrix
(ids stay exact below 2**24, far above any vocabulary). In a decode step the sampler queues that copy right
behind the chosen tokens (``start_reports``), so the step still waits for the device once, and nothing of the
reports runs on the host before the tokens are there.
"""

from __future__ import annotations

import torch

from gpu_runtime.engine.sequence import Logprob, Sequence, to_device

# Prompt positions scored per logits matmul: [rows, vocab] float32 stays small even for a 128k vocabulary.
PROMPT_SLICE = 256


class PendingReports:
    """Reports on their way to the host: ``table``'s copy may still run until ``done`` (None on a CPU)."""

    def __init__(self, rows: list[int], ks: list[int], table: torch.Tensor) -> None:
        self.rows = rows
        self.ks = ks
        self.table = table.to("cpu", non_blocking=True)  # pinned by torch when the table is on a GPU
        self.done = torch.cuda.Event() if table.is_cuda else None
        if self.done is not None:
            self.done.record(torch.cuda.current_stream(table.device))

    def record(self, seqs: list[Sequence]) -> None:
        """Add each report to its sequence (``seqs`` as given to ``start_reports``): to its cumulative logprob,
        and to ``Sequence.logprobs`` when the request asked for logprobs."""
        if self.done is not None:
            self.done.synchronize()  # at once when the tokens, copied after the table, are already here
        for i, report in zip(self.rows, _parse(self.table.tolist(), self.ks), strict=True):
            seq = seqs[i]
            seq.cumulative_logprob += report[0]
            if seq.params.logprobs is not None:
                seq.logprobs.append(report)


def start_reports(logits: torch.Tensor, chosen: torch.Tensor, seqs: list[Sequence]) -> PendingReports | None:
    """Queue the reports of tokens ``chosen`` (on logits' device, one per row) for the sequences that want them
    (``Sequence.wants_logprobs``); None when none does. Nothing here waits for the device."""
    rows = [i for i, s in enumerate(seqs) if s.wants_logprobs]
    if not rows:
        return None
    if len(rows) < len(seqs):
        index = to_device(rows, logits.device)
        logits, chosen = logits[index], chosen[index]
    ks = [seqs[i].params.logprobs or 0 for i in rows]
    return PendingReports(rows, ks, _table(logits, chosen, max(ks)))


def token_logprobs(logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> None:
    """Record the reports of already chosen ``tokens`` (``start_reports``, then wait for them)."""
    pending = start_reports(logits, torch.tensor(tokens, device=logits.device), seqs)
    if pending is not None:
        pending.record(seqs)


def _table(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """[R, 1 + 2k] float32 on logits' device: row r's chosen-token logprob, its k best logprobs, their ids. One
    fused log_softmax pass (reading and writing [R, vocab] once), a gather, a top-k, one small concatenation."""
    lp = torch.log_softmax(logits, dim=-1)
    cols = [lp.gather(1, chosen[:, None])]
    if k:
        top = lp.topk(k, dim=-1)
        cols += [top.values, top.indices.to(lp.dtype)]
    return torch.cat(cols, dim=1)


def _parse(rows: list[list[float]], ks: list[int]) -> list[Logprob]:
    k = max(ks)
    return [
        (row[0], tuple(zip(map(int, row[1 + k : 1 + k + kr]), row[1 : 1 + kr], strict=True)))
        for row, kr in zip(rows, ks, strict=True)
    ]


def prompt_logprobs(lm_head, seq: Sequence, first: int, hidden: torch.Tensor) -> None:
    """Score ``seq``'s prompt tokens ``first + 1 ...`` from the final hidden states of positions ``first ...``
    (``lm_head`` maps hidden states to float32 logits), appending to ``seq.prompt_logprobs``."""
    k = seq.params.prompt_logprobs or 0
    targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + len(hidden)], device=hidden.device)
    for a in range(0, len(hidden), PROMPT_SLICE):
        part = targets[a : a + PROMPT_SLICE]
        table = _table(lm_head(hidden[a : a + PROMPT_SLICE]), part, k)
        seq.prompt_logprobs.extend(_parse(table.tolist(), [k] * len(part)))
