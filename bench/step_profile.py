"""Where an engine step's time goes on the device: host work against the GPU's, for the cases the benchmarks
flag (decode at batch 64 and 256, a prefix-cache hit). Prints, per case, the step's wall time, the same batch's
CUDA graph replay alone (the GPU's share) and torch.profiler's top host and device operators.

    PYTHONPATH=. python3 bench/step_profile.py [--shape 1b] [--dry-run] [--host]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.engine import SHAPES, first_token_s, greedy, make_weights, random_prompt, sync  # noqa: E402
from gpu_runtime import Engine  # noqa: E402


def median_ms(fn, runs: int) -> float:
    """Median wall time of ``fn()`` with the device idle before and after."""
    times = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def replay_ms(engine: Engine, batch: int) -> float:
    """Median time of the decode graph for ``batch`` replayed alone: the GPU's share of a decode step."""
    runner = engine.runner
    if not runner.use_cuda_graphs:
        return float("nan")
    graph, _ = runner._graph(next(b for b in runner.graph_sizes if b >= batch))
    return median_ms(graph.replay, 20)


def top_ops(fn, rows: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return (
        prof.key_averages().table(sort_by=key, row_limit=rows)
        + "\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    )


def decode_case(engine: Engine, vocab: int, rng: torch.Generator, batch: int, steps: int) -> None:
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", random_prompt(rng, vocab, 128), greedy(steps * 3 + 16))
    while engine.scheduler.waiting:
        engine.step()
    engine.step()
    step, alone = median_ms(engine.step, steps), replay_ms(engine, batch)
    print(f"== decode batch {batch}: step {step:.2f} ms, graph alone {alone:.2f} ms")
    print(top_ops(lambda: [engine.step() for _ in range(5)], 18))
    for i in range(batch):
        engine.abort(f"d{batch}-{i}")
    while engine.has_unfinished():
        engine.step()


def hit_case(engine: Engine, vocab: int, rng: torch.Generator, prefix_len: int) -> None:
    def ttft(prompt: list[int]) -> float:
        return 1e3 * first_token_s(engine, prompt)

    prefix = random_prompt(rng, vocab, prefix_len)
    ttft(prefix + random_prompt(rng, vocab, 16))
    hits = [ttft(prefix + random_prompt(rng, vocab, 16)) for _ in range(5)]
    prefix = random_prompt(rng, vocab, prefix_len)
    miss = ttft(prefix + random_prompt(rng, vocab, 16))
    print(f"== prefix hit ({prefix_len} cached + 16): {statistics.median(hits):.2f} ms; miss {miss:.2f} ms")
    print(top_ops(lambda: ttft(prefix + random_prompt(rng, vocab, 16)), 18))


def host_case(engine: Engine, vocab: int, batch: int, steps: int) -> None:
    """The host's share alone: decode steps at ``batch`` with the model replaced by constant logits (scheduler,
    sampler, bookkeeping and outputs, per sequence per step; runs on a CPU as well)."""
    for i in range(batch):
        engine.add_request(f"h{i}", [(i * 7 + j) % 200 + 3 for j in range(100)], greedy(steps + 64))
    while engine.scheduler.waiting:
        engine.step()
    execute, logits = engine.runner.execute, torch.zeros(batch, vocab, device=engine.device)
    engine.runner.execute = lambda b: (logits[: sum(c.samples for c in b.chunks)], [])
    print(f"== host work of a decode step at batch {batch}: {median_ms(engine.step, steps):.2f} ms")
    engine.runner.execute = execute
    for i in range(batch):
        engine.abort(f"h{i}")
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU, to check the script")
    ap.add_argument("--host", action="store_true", help="only the host's share of a batch-256 decode step")
    args = ap.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    shape = SHAPES["tiny" if args.dry_run else args.shape]
    with tempfile.TemporaryDirectory() as path:
        cfg = make_weights(shape, path, device)
        dtype = "float32" if args.dry_run else "bfloat16"
        engine = Engine.from_pretrained(path, device=device, dtype=dtype, max_num_seqs=256, max_model_len=4096)
        rng = torch.Generator().manual_seed(0)
        if args.host:
            host_case(engine, cfg["vocab_size"], 256, 200)
            return
        for batch in (64, 256):
            decode_case(engine, cfg["vocab_size"], rng, batch, 5 if args.dry_run else 30)
        hit_case(engine, cfg["vocab_size"], rng, 256 if args.dry_run else 2048)


if __name__ == "__main__":
    main()
