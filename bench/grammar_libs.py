"""xgrammar against llguidance on CPU: what picked WarmServe's grammar library (docs/structured_output.md).

With a Llama-3-sized vocabulary (bench/vocab.py, 128,256 ids) it measures, for each library: building its
tokenizer index, compiling a realistic JSON schema (a function-calling payload: nested objects, arrays, enums,
bounded strings and numbers) and "any JSON object", and the per-step cost of filling the token bitmask of a batch
of 32 sequences each partway through a different valid document, single-threaded and with the library's parallel
batch call. Applying the mask to the logits is the same torch code for both, timed once.

    pip install xgrammar llguidance   # xgrammar is not a WarmServe dependency: install it to rerun this
    PYTHONPATH=. python bench/grammar_libs.py [--out bench/results/grammar_libs.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.vocab import LLAMA3_VOCAB, build_tokenizer  # noqa: E402

BATCH = 32
STEPS = 24
SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 64},
                "email": {"type": "string", "format": "email"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "email", "tier"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "price": {"type": "number", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "shipping": {
            "anyOf": [
                {"type": "object", "properties": {"method": {"const": "pickup"}, "store": {"type": "string"}},
                 "required": ["method", "store"], "additionalProperties": False},
                {"type": "object", "properties": {"method": {"const": "courier"}, "address": {"type": "string"},
                 "express": {"type": "boolean"}}, "required": ["method", "address"], "additionalProperties": False},
            ]
        },
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "customer", "items", "shipping"],
    "additionalProperties": False,
}  # fmt: skip


def documents(n: int) -> list[str]:
    """n distinct valid instances of SCHEMA, as a model would write them."""
    out = []
    for i in range(n):
        doc = {
            "order_id": f"ABC-{100000 + i:06d}",
            "customer": {"name": f"Customer number {i}", "email": f"c{i}@example.com", "tier": "pro"},
            "items": [{"sku": f"sku-{j}", "quantity": j + 1, "price": 9.5 * j, "tags": ["a", "b"]} for j in range(3)],
            "shipping": {"method": "courier", "address": f"{i} Main Street", "express": bool(i % 2)},
            "notes": None if i % 3 else "leave at the door",
        }
        out.append(json.dumps(doc))
    return out


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def bench_llguidance(tok_json: str, eos: int, docs: list[list[int]]) -> dict:
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(tok_json, n_vocab=LLAMA3_VOCAB, eos_token=eos)
    r = {"version": llguidance.__version__, "tokenizer_ms": ms(time.perf_counter() - t0)}
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    first = llguidance.LLMatcher(tok, grammar)
    r["compile_schema_ms"] = ms(time.perf_counter() - t0)
    assert not first.is_error(), first.get_error()
    t0 = time.perf_counter()
    llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}))
    r["compile_json_object_ms"] = ms(time.perf_counter() - t0)
    matchers = [llguidance.LLMatcher(tok, grammar) for _ in docs]
    bitmask = llt.allocate_token_bitmask(BATCH, LLAMA3_VOCAB)
    executor = llguidance.LLExecutor()

    def serial() -> None:
        for i, m in enumerate(matchers):
            llt.fill_next_token_bitmask(m, bitmask, i)

    def parallel() -> None:
        llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def advance(step: int) -> None:
        for m, d in zip(matchers, docs, strict=True):
            assert m.consume_token(d[step]), m.get_error()

    r |= step_times(serial, parallel, advance, lambda: [m.reset() for m in matchers])
    return r


def bench_xgrammar(tok_json: str, eos: int, docs: list[list[int]]) -> dict:
    import xgrammar as xgr
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok_json)
    vocab = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(
        [k for k, _ in vocab], xgr.VocabType.BYTE_LEVEL, vocab_size=LLAMA3_VOCAB, stop_token_ids=[eos]
    )
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    r = {"version": importlib.metadata.version("xgrammar"), "tokenizer_ms": ms(time.perf_counter() - t0)}
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    r["compile_schema_ms"] = ms(time.perf_counter() - t0)
    t0 = time.perf_counter()
    compiler.compile_builtin_json_grammar()
    r["compile_json_object_ms"] = ms(time.perf_counter() - t0)
    matchers = [xgr.GrammarMatcher(compiled) for _ in docs]
    bitmask = xgr.allocate_token_bitmask(BATCH, LLAMA3_VOCAB)
    batch = xgr.BatchGrammarMatcher(max_threads=2)

    def serial() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def parallel() -> None:
        batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(step: int) -> None:
        for m, d in zip(matchers, docs, strict=True):
            assert m.accept_token(d[step])

    r |= step_times(serial, parallel, advance, lambda: [m.reset() for m in matchers])
    return r


def step_times(serial, parallel, advance, reset) -> dict:
    """Mean and worst per-step bitmask fill over STEPS steps of all BATCH documents, both ways."""
    out = {}
    for name, fill in (("serial", serial), ("parallel", parallel)):
        reset()
        times = []
        for step in range(STEPS):
            t0 = time.perf_counter()
            fill()
            times.append(time.perf_counter() - t0)
            advance(step)
        out[f"mask_b{BATCH}_{name}_mean_ms"] = ms(statistics.mean(times))
        out[f"mask_b{BATCH}_{name}_max_ms"] = ms(max(times))
    return out


def apply_cost() -> dict:
    import torch

    from gpu_runtime.engine.grammar import apply_bitmask

    logits = torch.randn(BATCH, LLAMA3_VOCAB)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (BATCH, (LLAMA3_VOCAB + 31) // 32), dtype=torch.int32)
    apply_bitmask(logits, bitmask, torch.arange(BATCH))
    t0 = time.perf_counter()
    for _ in range(20):
        apply_bitmask(logits, bitmask, torch.arange(BATCH))
    return {f"apply_b{BATCH}_cpu_ms": ms((time.perf_counter() - t0) / 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/grammar_libs.json")
    args = parser.parse_args()
    tok = build_tokenizer()
    eos = tok.token_to_id("<|eot_id|>")
    docs = [tok.encode(t).ids for t in documents(BATCH)]
    assert all(len(d) > STEPS for d in docs)
    result = {
        "vocab": LLAMA3_VOCAB,
        "batch": BATCH,
        "cpus": os.cpu_count(),
        "llguidance": bench_llguidance(tok.to_str(), eos, docs),
        "xgrammar": bench_xgrammar(tok.to_str(), eos, docs),
        **apply_cost(),
    }
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
