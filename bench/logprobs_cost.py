"""The cost of log-probabilities (and, for the record, of penalties): decode throughput at batch 32 with every
sequence asking for ``logprobs=5`` (the chosen token and 5 alternatives per token), against the same batch
without. The issue's bound: ``logprobs_decode_b32_ratio`` >= 0.9.

    PYTHONPATH=. python3 bench/logprobs_cost.py [--shape 1b] [--device cuda]   # prints the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace

import torch

from bench.grammar_cost import BATCH, decode_tok_s
from gpu_runtime import Engine, SamplingParams


def bench_logprobs(engine: Engine, vocab: int, steps: int) -> dict:
    """Decode throughput at batch 32: plain, with logprobs=5, and with all three penalties."""
    g = torch.Generator().manual_seed(0)
    batch = min(BATCH, engine.scheduler.max_num_seqs)
    prompts = [torch.randint(0, vocab - 8, (64,), generator=g).tolist() for _ in range(batch)]
    free = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, ignore_eos=True)
    runs = {
        "base": free,
        "logprobs": replace(free, logprobs=5),
        "penalties": replace(free, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
    }
    for params in runs.values():  # warm-up: graphs, allocator
        decode_tok_s(engine, prompts[:4], params, 4)
    tok_s = {name: decode_tok_s(engine, prompts, params, steps) for name, params in runs.items()}
    return {
        "logprobs_batch": batch,
        "logprobs_decode_b32_base_tok_s": tok_s["base"],
        "logprobs_decode_b32_tok_s": tok_s["logprobs"],
        "logprobs_decode_b32_ratio": tok_s["logprobs"] / tok_s["base"],
        "penalties_decode_b32_tok_s": tok_s["penalties"],
        "penalties_decode_b32_ratio": tok_s["penalties"] / tok_s["base"],
    }


def main() -> None:
    from bench.engine import SHAPES, make_weights

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as path:
        cfg = make_weights(SHAPES[args.shape], path, args.device)
        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        engine = Engine.from_pretrained(path, device=args.device, dtype=dtype, max_num_seqs=BATCH, max_model_len=2048)
        result = {"shape": SHAPES[args.shape]["name"], "device": args.device}
        print(json.dumps(result | bench_logprobs(engine, cfg["vocab_size"], args.steps), indent=1))


if __name__ == "__main__":
    main()
