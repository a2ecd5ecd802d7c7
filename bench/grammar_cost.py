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

Run as a script, it measures the host's side of the same two runs on a CPU (``host_costs``; docs/structured_output.md,
"Host cost, measured on a CPU"):

    PYTHONPATH=. python3 bench/grammar_cost.py [--steps 200] [--rounds 3] [--forward-ms 2.3]
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
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
    tok_s = interleaved(engine, prompts, _runs(steps), steps, rounds)
    r = {"grammar_batch": len(prompts), "grammar_steps": steps, "grammar_rounds_tok_s": tok_s}
    r |= cost_keys("grammar", tok_s, "grammar")
    return r | {"grammar_decode_b32_cost_pct": 100 * (1 - r["grammar_decode_b32_ratio"])}


class _Stages:
    """Seconds per named stage of the engine thread (and the mask thread's), summed over the measured steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t)

        return timed


class _TimedExecutor:
    """llguidance's background executor, recording how long each mask job computes."""

    def __init__(self, executor, stages: _Stages) -> None:
        self.executor, self.stages = executor, stages

    def unsafe_compute_mask_ptr(self, *args) -> None:
        t = time.perf_counter()
        self.executor.unsafe_compute_mask_ptr(*args)
        self.stages.add("mask thread: compute", time.perf_counter() - t)

    def __getattr__(self, name: str):
        return getattr(self.executor, name)


class _Masked:
    """What the device-op stand-in of ``apply_bitmask`` hands to ``_choose``'s: the rows' bitmask."""

    def __init__(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.bitmask = bitmask.numpy()  # read before the next step fills it again


def _choose_stand_in(rng: np.random.Generator, launched: list[float], forward_s: float):
    """Stands in for the sampler's ``_choose`` and its wait for the device: a random allowed token per row, from
    the bitmask when there is one (a random nonzero word, then a random set bit of it), else any token, given no
    sooner than ``forward_s`` after the step's forward pass was launched (``launched[0]``), as the device would.
    Sleeping releases the GIL, as waiting for the device does."""

    def choose(logits, seqs) -> torch.Tensor:
        tokens = _tokens(rng, logits, len(seqs))
        time.sleep(max(0.0, launched[0] + forward_s - time.perf_counter()))
        return tokens

    return choose


def _tokens(rng: np.random.Generator, logits, n: int) -> torch.Tensor:
    if not isinstance(logits, _Masked):
        return torch.from_numpy(rng.integers(0, 128000, n))
    words = logits.bitmask
    word = np.argmax(np.where(words != 0, rng.random(words.shape), -1.0), axis=1)
    bits = (words[np.arange(len(words)), word][:, None] >> np.arange(32)) & 1
    bit = np.argmax(np.where(bits != 0, rng.random(bits.shape), -1.0), axis=1)
    return torch.from_numpy(word * 32 + bit)


def host_costs(path: str, steps: int, rounds: int, forward_ms: float) -> dict:
    """Milliseconds per decode step at batch 32 and a 128,256-token vocabulary on this machine's CPU, with and
    without the grammar, by stage: only host work remains. The model is replaced by constant logits, and the
    device's work in sampling (the mask's unpacking and fill, the draw) by a stand-in that picks a random allowed
    token from the bitmask ("device stand-in", timed apart: on a GPU it is queued kernels, not host time) and
    returns no sooner than ``forward_ms`` after the forward pass was "launched", as the device's tokens would."""
    from bench.engine import SHAPES, make_weights
    from gpu_runtime.engine import grammar, sampler

    torch.set_num_threads(1)  # a GPU host runs no torch CPU kernels here; idle OpenMP threads would spin
    shape = SHAPES["tiny"] | {"vocab_size": 128256}
    make_weights(shape, path, "cpu")
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32", max_num_seqs=BATCH, max_model_len=4096)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        build_tokenizer(shape["vocab_size"]).save(os.path.join(path, "tokenizer.json"))
    logits, launched = torch.zeros(BATCH, shape["vocab_size"]), [0.0]

    def forward(batch) -> tuple[torch.Tensor, list]:
        launched[0] = time.perf_counter()
        return logits[: sum(c.samples for c in batch.chunks)], []

    execute, engine.runner.execute = engine.runner.execute, forward
    stages = _Stages()
    patched = {
        (sampler, "apply_grammars"): stages.wrap("apply_grammars", sampler.apply_grammars),
        (sampler, "accept_tokens"): stages.wrap("accept", sampler.accept_tokens),
        (sampler, "_choose"): stages.wrap(
            "device stand-in", _choose_stand_in(np.random.default_rng(0), launched, forward_ms / 1e3)
        ),
        (grammar, "apply_bitmask"): _Masked,
        (grammar._MaskJob, "wait"): stages.wrap("wait for mask job", grammar._MaskJob.wait),
    }
    saved = {key: getattr(*key) for key in patched}
    for (module, name), fn in patched.items():
        setattr(module, name, fn)
    grammar._executors["background"] = _TimedExecutor(grammar._executor("background"), stages)
    try:
        return _host_runs(engine, steps, rounds, stages)
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
        grammar._executors["background"] = grammar._executors["background"].executor
        engine.runner.execute = execute


def _host_runs(engine: Engine, steps: int, rounds: int, stages: _Stages) -> dict:
    """The base and grammar runs of ``bench_grammar`` (same prompts and parameters) in interleaved rounds: each
    round's ratio, and per run the mean milliseconds per step of each stage over all rounds."""
    prompts = [[(i * 7 + j) % 200 + 3 for j in range(64)] for i in range(BATCH)]
    runs = _runs(steps)
    per_step: dict[str, dict[str, float]] = {name: {} for name in runs}
    tok_s: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            stages.seconds.clear()
            tok_s[name].append(decode_tok_s(engine, prompts, runs[name], steps))
            for stage, seconds in stages.seconds.items():  # the prefill and abort steps count too: close enough
                per_step[name][stage] = per_step[name].get(stage, 0.0) + 1e3 * seconds / steps / rounds
    out = cost_keys("grammar", tok_s, "grammar")
    out |= {f"{name}_step_ms": statistics.median(1e3 * BATCH / t for t in tok_s[name]) for name in runs}
    return out | {f"{name}_stages_ms": {k: round(v, 4) for k, v in sorted(d.items())} for name, d in per_step.items()}


def _runs(steps: int) -> dict[str, SamplingParams]:
    """``bench_grammar``'s two runs: unconstrained, and an array of orders that never closes (the grammar can't
    finish, so no sequence leaves the batch)."""
    free = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, ignore_eos=True)
    items = f"item: %json {json.dumps(structured.guided(SCHEMA))}"
    grammar = structured.lark(f'start: "[" item ("," item)*\n{items}', "bench")
    constrained = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=0, structured=grammar)
    return {"base": free, "grammar": constrained}


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=host_costs.__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="decode steps per run and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forward-ms", type=float, default=2.3, help="the simulated forward pass (1B shape: 2.3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as path:
        print(json.dumps(host_costs(path, args.steps, args.rounds, args.forward_ms), indent=1))


if __name__ == "__main__":
    main()
