"""The cost of grammar-constrained decoding: decode throughput at batch 32 with and without a JSON-schema grammar.

Part "grammar" of bench/engine.py. The model directory gets a Llama-3-sized tokenizer (bench/vocab.py, the same
vocabulary size as the shape) so the masks have their real width. Both runs decode 32 sequences from the same
prompts; the constrained one must write an endless JSON array of bench/grammar_libs.py's order objects (nested
objects, enums, patterns, free strings), so every step masks all 32 rows. Throughput counts only steps where all
32 sequences ran (--dry-run: as many as the engine batches). The issue's bound: ``grammar_decode_b32_ratio`` >= 0.9.

``interleaved`` and ``cost_keys`` are shared with bench/logprobs_cost.py: one window of either run varies by several
percent on its own (clocks, the host's other work), so each round measures the base and every variant back to back,
each variant's ratio is taken against its own round's base, and the median of the rounds' ratios is the figure,
with every round's ratio beside it. Odd rounds run in reverse order, so a steady drift pushes alternate rounds'
ratios in opposite directions instead of all one way.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from bench.grammar_libs import SCHEMA
from bench.vocab import build_tokenizer
from gpu_runtime import Engine, SamplingParams
from protocol import structured

BATCH = 32


def decode_tok_s(engine: Engine, prompts: list[list[int]], params: SamplingParams, steps: int) -> float:
    """Tokens/s over ``steps`` decode steps of the whole batch (prefill excluded)."""
    ids = [f"grammar-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < len(ids):  # prefill everything first
        started |= {o.request_id for o in engine.step() if o.new_token_ids}
    tokens, t0 = 0, time.perf_counter()
    for _ in range(steps):
        outs = engine.step()
        if len(outs) < len(ids) or any(o.finished for o in outs):
            break
        tokens += len(outs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    if tokens == 0:
        raise RuntimeError("no decode step ran the whole batch: raise max_num_seqs or max_tokens")
    return tokens / seconds


def interleaved(
    engine: Engine, prompts: list[list[int]], runs: dict[str, SamplingParams], steps: int, rounds: int
) -> dict[str, list[float]]:
    """Tokens/s of each run per round (``rounds`` of them), the runs taken in turn: in ``runs``' order in even
    rounds, reversed in odd ones."""
    for params in runs.values():  # warm-up at the full batch: its CUDA graph, allocator, a grammar's compilation
        decode_tok_s(engine, prompts, params, 4)
    tok_s: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            tok_s[name].append(decode_tok_s(engine, prompts, runs[name], steps))
    return tok_s


def cost_keys(prefix: str, tok_s: dict[str, list[float]], name: str) -> dict:
    """The figures of run ``name`` against the base run ``tok_s["base"]``, round by round."""
    ratios = [v / b for v, b in zip(tok_s[name], tok_s["base"], strict=True)]
    return {
        f"{prefix}_decode_b32_base_tok_s": statistics.median(tok_s["base"]),
        f"{prefix}_decode_b32_tok_s": statistics.median(tok_s[name]),
        f"{prefix}_decode_b32_ratio": statistics.median(ratios),
        f"{prefix}_decode_b32_ratios": ratios,
    }


def bench_prompts(engine: Engine, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    batch = min(BATCH, engine.scheduler.max_num_seqs)
    return [torch.randint(0, vocab - 8, (64,), generator=g).tolist() for _ in range(batch)]


def bench_grammar(engine: Engine, path: str, vocab: int, steps: int, rounds: int) -> dict:
    """Decode throughput at batch 32, unconstrained and under a JSON-schema grammar, over ``rounds`` interleaved
    rounds of ``steps`` steps each, and their ratio."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        build_tokenizer(vocab).save(os.path.join(path, "tokenizer.json"))
    prompts = bench_prompts(engine, vocab)
    free = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, ignore_eos=True)
    # an array of orders that never closes: the grammar can't finish, so no sequence leaves the batch
    items = f"item: %json {json.dumps(structured.guided(SCHEMA))}"
    grammar = structured.lark(f'start: "[" item ("," item)*\n{items}', "bench")
    constrained = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, structured=grammar)
    tok_s = interleaved(engine, prompts, {"base": free, "grammar": constrained}, steps, rounds)
    r = {"grammar_batch": len(prompts), "grammar_steps": steps, "grammar_rounds_tok_s": tok_s}
    r |= cost_keys("grammar", tok_s, "grammar")
    return r | {"grammar_decode_b32_cost_pct": 100 * (1 - r["grammar_decode_b32_ratio"])}
