"""The cost of log-probabilities (and, for the record, of penalties): decode throughput at batch 32 with every
sequence asking for ``logprobs=5`` (the chosen token and 5 alternatives per token), against the same batch
without, in interleaved rounds (bench/grammar_cost.py's ``interleaved``: the median of the rounds' ratios, and
each). The issue's bound: ``logprobs_decode_b32_ratio`` >= 0.9.

    PYTHONPATH=. python3 bench/logprobs_cost.py [--shape 1b] [--device cuda]   # prints the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace

import torch

from bench.grammar_cost import BATCH, bench_prompts, cost_keys, interleaved
from gpu_runtime import Engine, SamplingParams


def bench_logprobs(engine: Engine, vocab: int, steps: int, rounds: int) -> dict:
    """Decode throughput at batch 32: plain, with logprobs=5, and with all three penalties, interleaved."""
    prompts = bench_prompts(engine, vocab)
    free = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, ignore_eos=True)
    runs = {
        "base": free,
        "logprobs": replace(free, logprobs=5),
        "penalties": replace(free, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
    }
    tok_s = interleaved(engine, prompts, runs, steps, rounds)
    r = {"logprobs_batch": len(prompts), "logprobs_steps": steps, "logprobs_rounds_tok_s": tok_s}
    penalties = cost_keys("penalties", tok_s, "penalties")
    del penalties["penalties_decode_b32_base_tok_s"]  # the same base as logprobs'
    return r | cost_keys("logprobs", tok_s, "logprobs") | penalties


def main() -> None:
    from bench.engine import SHAPES, make_weights

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as path:
        cfg = make_weights(SHAPES[args.shape], path, args.device)
        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        engine = Engine.from_pretrained(path, device=args.device, dtype=dtype, max_num_seqs=BATCH, max_model_len=2048)
        result = {"shape": SHAPES[args.shape]["name"], "device": args.device}
        print(json.dumps(result | bench_logprobs(engine, cfg["vocab_size"], args.steps, args.rounds), indent=1))


if __name__ == "__main__":
    main()
