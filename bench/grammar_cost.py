"""The cost of grammar-constrained decoding: decode throughput at batch 32 with and without a JSON-schema grammar.

Part "grammar" of bench/engine.py. The model directory gets a Llama-3-sized tokenizer (bench/vocab.py, the same
vocabulary size as the shape) so the masks have their real width. Both runs decode 32 sequences from the same
prompts; the constrained one must write an endless JSON array of bench/grammar_libs.py's order objects (nested
objects, enums, patterns, free strings), so every step masks all 32 rows. Throughput counts only steps where all
32 sequences ran (--dry-run: as many as the engine batches). The issue's bound: ``grammar_decode_b32_ratio`` >= 0.9.
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


def bench_grammar(engine: Engine, path: str, vocab: int, steps: int, repeats: int) -> dict:
    """Decode throughput at batch 32, unconstrained and under a JSON-schema grammar (medians of ``repeats``
    alternated runs), and their ratio."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        build_tokenizer(vocab).save(os.path.join(path, "tokenizer.json"))
    g = torch.Generator().manual_seed(0)
    batch = min(BATCH, engine.scheduler.max_num_seqs)
    prompts = [torch.randint(0, vocab - 8, (64,), generator=g).tolist() for _ in range(batch)]
    free = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, ignore_eos=True)
    # an array of orders that never closes: the grammar can't finish, so no sequence leaves the batch
    items = f"item: %json {json.dumps(structured.guided(SCHEMA))}"
    grammar = structured.lark(f'start: "[" item ("," item)*\n{items}', "bench")
    constrained = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, structured=grammar)
    decode_tok_s(engine, prompts[:4], free, 4)  # warm-up: graphs, allocator, the grammar's compilation
    decode_tok_s(engine, prompts[:4], constrained, 4)
    # alternated and repeated: one short window of either varies by several percent on its own
    runs = [(decode_tok_s(engine, prompts, free, steps), decode_tok_s(engine, prompts, constrained, steps))
            for _ in range(repeats)]  # fmt: skip
    base = statistics.median(b for b, _ in runs)
    masked = statistics.median(m for _, m in runs)
    return {
        "grammar_batch": batch,
        "grammar_runs_tok_s": runs,
        "grammar_decode_b32_base_tok_s": base,
        "grammar_decode_b32_tok_s": masked,
        "grammar_decode_b32_ratio": masked / base,
        "grammar_decode_b32_cost_pct": 100 * (1 - masked / base),
    }
