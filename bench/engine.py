"""Engine benchmark on the lent GPU: the engine against the hardware limits measured in the same run.

For each shape (Llama-3-8B and Llama-3.2-1B, random bf16 weights generated on the device into /tmp), by part:
- base: batch-1 decode ms/token vs the HBM roofline; one 1024-token prefill vs the bf16 matmul roofline;
  64 concurrent requests (512 in, 128 out), and transformers ``generate`` on the same prompts (unless
  --skip-transformers);
- prefix: time to first token of a request sharing a 2048-token prefix with the one before, over the first's;
  then again with the decode kernel's split-context variant off (``*_unsplit``), to show what it gains;
- steady: 256 requests in flight (closed loop), sizes drawn from the Azure LLM 2023 conversation trace, output
  tokens/s over the window where all 256 run, against the roofline of the very steps the engine ran (each
  decode step reads the weights and every sequence's KV at HBM speed, each prefill runs at the matmul rate, a
  step mixing both takes the longer of the two);
- grammar: decode throughput at batch 32 with every sequence under a JSON-schema grammar, against the same batch
  unconstrained (bench/grammar_cost.py; the issue's bound is a ratio >= 0.9), the median of interleaved rounds
  (--cost-rounds, 5, of --cost-steps, 256, decode steps per run);
- logprobs: the same with every sequence asking for logprobs=5, and with penalties (bench/logprobs_cost.py; the
  issue's bound is a ratio >= 0.9);
- fp8: the same weights quantized on the device (per-channel scales, as a bf16 checkpoint served with
  ``dtype: fp8`` is): batch-1 decode speedup over bf16, 1024-token prefill vs the FP8 matmul roofline, the
  steady run again, and the logits' error against bf16 on the original and on the dequantized weights.
Writes bench/results/engine.json (top-level figures are the 8B shape; every shape under "shapes"); a run of only
grammar and logprobs instead adds its figures to the file's "cost_runs" list, one entry per part and shape.

    PYTHONPATH=. python3 bench/engine.py [--shapes 8b,1b] [--parts base,prefix,steady,grammar,logprobs,fp8] [--out ...]
    PYTHONPATH=. python3 bench/engine.py --dry-run   # every part on CPU with tiny shapes, to check the script
    PYTHONPATH=. python3 bench/engine.py --unsplit-decode ...   # decode attention never split (the old kernel grid)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.grammar_cost import bench_grammar  # noqa: E402
from bench.logprobs_cost import bench_logprobs  # noqa: E402
from gpu_runtime import Engine, SamplingParams  # noqa: E402
from gpu_runtime.engine import attention, ops  # noqa: E402
from gpu_runtime.engine.sequence import Status  # noqa: E402
from gpu_runtime.fp8 import quantize_rows, scaled_mm_supported  # noqa: E402
from gpu_runtime.weights import plan_weights  # noqa: E402
from modelinfo.config import FP8_ELEMENT  # noqa: E402

# Parts that measure a feature's cost; a run of only these appends to the result file (append_cost_runs).
COST_PARTS = {"grammar", "logprobs"}

SHAPES = {
    "8b": dict(name="Llama-3-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
               rope_theta=500000.0, max_position_embeddings=8192),
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192),
    # --dry-run: the same code paths on CPU in seconds
    "tiny": dict(name="tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0,
                 max_position_embeddings=4096),
}  # fmt: skip


class Sizes:
    """Request counts and lengths: the issue's on the GPU, small ones for --dry-run."""

    def __init__(self, dry: bool, steady_requests: int) -> None:
        self.c64, self.prompt_len, self.output_len = (4, 48, 8) if dry else (64, 512, 128)
        self.decode_steps = 16 if dry else 257
        self.prefill_len = 128 if dry else 1024
        self.prefix_len, self.suffix_len, self.prefix_reps = (256, 16, 2) if dry else (2048, 16, 3)
        self.concurrency = 8 if dry else 256
        self.steady_requests = 24 if dry else steady_requests
        self.max_prompt, self.max_output = (96, 64) if dry else (4000, 1000)
        self.max_model_len = 512 if dry else 8192
        self.iters = 1 if dry else 5
        # grammar and logprobs: rounds of base and variants back to back, steps per window (bench/grammar_cost.py)
        self.cost_steps, self.cost_rounds = (8, 2) if dry else (256, 5)


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hbm_read_bandwidth(device: str, dry: bool) -> float:
    """Bytes/s reading HBM: the best of a large reduction (read-only) and a copy (read + write)."""
    x = torch.empty((16 if dry else 2048) * 1024**2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    read = x.numel() * 2 / timed(lambda: x.sum(), 10)
    copy = 2 * x.numel() * 2 / timed(lambda: y.copy_(x), 10)
    return max(read, copy)


def matmul_rate(device: str, dry: bool) -> float:
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, 3 if dry else 20)


def fp8_matmul_rate(device: str, dry: bool) -> float:
    """The FP8 GEMM the engine runs: torch._scaled_mm with row-wise scales, bf16 out (CPU: the same call)."""
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
    run = lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    return 2 * n**3 / timed(run, 3 if dry else 20)


def make_weights(shape: dict, path: str, device: str) -> dict:
    """Random bf16 weights in HF layout, generated on the device and saved to ``path`` in ~4 GB shards."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = {k: v for k, v in shape.items() if k != "name"}
    LlamaConfig(**cfg).save_pretrained(path)
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    tensors = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)
    shard, shard_bytes, index, n = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard, shard_bytes, n = {}, 0, n + 1

    for name, dims in tensors.items():
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = (torch.randn(dims, device=device, generator=gen, dtype=torch.bfloat16) * 0.02).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        if shard_bytes > 4 * 1024**3:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    return cfg


def layer_params(cfg: dict) -> int:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return h * (q + 2 * kv) + q * h + 3 * h * inter


def attention_flops(cfg: dict, tokens: int, cached: int = 0) -> float:
    """QK^T and PV of ``tokens`` new tokens after ``cached`` ones, causal, all layers."""
    d = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    per_query = cached + (tokens + 1) / 2
    return cfg["num_hidden_layers"] * 2 * 2 * cfg["num_attention_heads"] * d * tokens * per_query


def prefill_flops(cfg: dict, tokens: int) -> float:
    """Matmul FLOPs of one prefill: projections and MLP for every token, causal attention, lm_head once."""
    projections = cfg["num_hidden_layers"] * 2 * tokens * layer_params(cfg)
    return projections + attention_flops(cfg, tokens) + 2 * cfg["vocab_size"] * cfg["hidden_size"]


def prefill_seconds(cfg: dict, tokens: int, cached: int, samples: bool, rates: dict, fp8: bool) -> float:
    """Roofline time of one prefill chunk: projections at the bf16 (or FP8) matmul rate, attention and lm_head
    (bf16 under fp8 too) at the bf16 rate."""
    projections = cfg["num_hidden_layers"] * 2 * tokens * layer_params(cfg)
    rest = attention_flops(cfg, tokens, cached) + samples * 2 * cfg["vocab_size"] * cfg["hidden_size"]
    return projections / rates["fp8_flops" if fp8 else "flops"] + rest / rates["flops"]


def kv_bytes_per_token(cfg: dict) -> int:
    """bf16 K and V of one token across all layers (bf16 under fp8 too)."""
    d = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * d * 2


def decode_weight_bytes(engine: Engine, cfg: dict) -> int:
    """Bytes a decode step reads of the weights (the embedding table only when it is also the lm_head)."""
    return sum(s.nbytes for s in engine.layout.slots if cfg["tie_word_embeddings"] or "embed_tokens" not in s.name)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def random_prompt(rng: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=rng).tolist()


def decode_b1_ms(engine: Engine, vocab: int, rng: torch.Generator, steps: int) -> float:
    """Median per-step time of one sequence decoding, after its prefill step."""
    engine.generate([random_prompt(rng, vocab, 32)], greedy(8))  # captures the batch-1 graph
    engine.add_request("b1", random_prompt(rng, vocab, 32), greedy(steps))
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[1:])


def prefill_ms(engine: Engine, vocab: int, rng: torch.Generator, tokens: int, iters: int) -> float:
    """One fresh ``tokens``-long prompt: the step that prefills it and samples one token."""

    def prefill() -> None:
        engine.add_request("p", random_prompt(rng, vocab, tokens), greedy(1))
        while engine.has_unfinished():
            engine.step()

    return 1e3 * timed(prefill, iters)


def bench_base(engine: Engine, cfg: dict, rng: torch.Generator, z: Sizes) -> dict:
    vocab = cfg["vocab_size"]
    r = {"decode_b1_ms": decode_b1_ms(engine, vocab, rng, z.decode_steps)}
    on_cuda = engine.device.type == "cuda"
    if on_cuda:
        # The batch-1 graph alone (no scheduler, input copies or sampling): what the GPU spends per token.
        graph, _ = engine.runner.graphs[(engine.runner.kv_key, 1)]
        r["decode_b1_graph_only_ms"] = 1e3 * timed(graph.replay, 50)
        # Same-run comparison: the batch-1 graph with cuBLAS for the projections instead of the Triton GEMV.
        gemv_ok, ops._gemv_ok = ops._gemv_ok, lambda x, w: False
        engine.runner.graphs.clear()
        engine.generate([random_prompt(rng, vocab, 32)], greedy(4))
        r["decode_b1_graph_only_cublas_ms"] = 1e3 * timed(engine.runner.graphs[(engine.runner.kv_key, 1)][0].replay, 50)
        ops._gemv_ok = gemv_ok
        engine.runner.graphs.clear()
    r["prefill_1024_ms"] = prefill_ms(engine, vocab, rng, z.prefill_len, z.iters)
    engine.runner.use_cuda_graphs = False  # same-run comparison: eager prefill
    r["prefill_1024_eager_ms"] = prefill_ms(engine, vocab, rng, z.prefill_len, z.iters)
    engine.runner.use_cuda_graphs = on_cuda
    prompts = [random_prompt(rng, vocab, z.prompt_len) for _ in range(z.c64)]
    engine.generate(prompts, greedy(4))
    sync()
    t = time.perf_counter()
    outs = engine.generate(prompts, greedy(z.output_len))
    elapsed = time.perf_counter() - t
    r["throughput_c64_tok_s"] = sum(len(o.token_ids) for o in outs) / elapsed
    r["c64_seconds"] = elapsed
    r["preemptions"] = engine.scheduler.num_preemptions
    return r


def first_token_s(engine: Engine, prompt: list[int]) -> float:
    """Seconds from adding a one-token request to its end, on an idle engine: its time to first token."""
    sync()
    t = time.perf_counter()
    engine.add_request("ttft", prompt, greedy(1))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t


def bench_prefix(engine: Engine, cfg: dict, rng: torch.Generator, z: Sizes) -> dict:
    """``prefix_ttft``, then the same with the split-context decode kernel off (keys ending ``_unsplit``): a hit's
    tail runs as decode rows, whose attention over the cached prefix is what the split spreads over the GPU."""
    r = prefix_ttft(engine, cfg, rng, z)
    with unsplit_decode(engine):
        r |= {f"{k}_unsplit": v for k, v in prefix_ttft(engine, cfg, rng, z).items()}
    rows = next(b for b in engine.runner.graph_sizes if b >= z.suffix_len)  # the hit's decode graph
    width = engine.runner.max_blocks_per_seq * engine.block_size
    r["prefix_hit_decode_splits"] = attention.decode_splits(rows, cfg["num_key_value_heads"], width, engine.device)
    return r


@contextlib.contextmanager
def unsplit_decode(engine: Engine):
    """Decode attention without the split-context variant; the decode graphs are recaptured on the way in and out
    (a captured graph keeps the split count it was captured with)."""
    saved = attention.MAX_SPLITS
    attention.MAX_SPLITS = 1
    engine.runner.graphs.clear()
    try:
        yield
    finally:
        attention.MAX_SPLITS = saved
        engine.runner.graphs.clear()


def prefix_ttft(engine: Engine, cfg: dict, rng: torch.Generator, z: Sizes) -> dict:
    """TTFT of a request whose 2048-token prefix the previous request left in the cache, over that one's."""
    vocab = cfg["vocab_size"]

    def ttft(prompt: list[int]) -> float:
        return first_token_s(engine, prompt)

    ttft(random_prompt(rng, vocab, z.prefix_len + z.suffix_len))  # warm-up: kernels of both shapes
    ttft(random_prompt(rng, vocab, z.prefix_len) + random_prompt(rng, vocab, z.suffix_len))
    first, second = [], []
    hit0 = engine.prefix_cache_tokens()[0]
    for _ in range(z.prefix_reps):
        prefix = random_prompt(rng, vocab, z.prefix_len)  # new each time: the first request is a miss
        first.append(ttft(prefix + random_prompt(rng, vocab, z.suffix_len)))
        second.append(ttft(prefix + random_prompt(rng, vocab, z.suffix_len)))
    hits = engine.prefix_cache_tokens()[0] - hit0
    return {
        "prefix_first_ttft_ms": 1e3 * statistics.median(first),
        "prefix_hit_ttft_ms": 1e3 * statistics.median(second),
        "prefix_hit_ttft_ratio": statistics.median(second) / statistics.median(first),
        "prefix_hit_tokens_per_request": hits / z.prefix_reps,
    }


def azure_sizes(n: int, z: Sizes, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) token counts of ``n`` requests drawn from the Azure LLM 2023 conversation trace,
    clipped to the run's limits (the trace's p99 prompt is 4142 tokens, its longest output 1000)."""
    from sim.traces import azure_bases

    conv = azure_bases()[0]
    rows = np.random.default_rng(seed).integers(0, len(conv.prompt), n)
    return [(int(min(max(conv.prompt[i], 1), z.max_prompt)), int(min(conv.output[i], z.max_output))) for i in rows]


class StepLog:
    """Wraps the runner: the roofline time of every batch the engine runs (see the module docstring)."""

    def __init__(self, engine: Engine, cfg: dict, rates: dict, fp8: bool) -> None:
        self.engine, self.cfg, self.rates, self.fp8 = engine, cfg, rates, fp8
        self.weight_bytes = decode_weight_bytes(engine, cfg)
        self.kv_per_token = kv_bytes_per_token(cfg)
        self.bound_s = 0.0
        self._execute = engine.runner.execute
        engine.runner.execute = self.execute

    def execute(self, batch):
        """A step's bound: its decode rows read the weights and their KV at HBM speed, its prompt chunks run at
        the matmul rate; a mixed step takes the longer of the two (its prompt rows ride on the same weight read)."""
        decoding = [c for c in batch.chunks if c.seq.status is Status.RUNNING]
        compute = sum(
            prefill_seconds(self.cfg, c.end - c.start, c.start, c.samples, self.rates, self.fp8)
            for c in batch.chunks
            if c.seq.status is not Status.RUNNING
        )
        memory = 0.0
        if decoding:
            kv = sum(len(c.seq) for c in decoding) * self.kv_per_token
            memory = (self.weight_bytes + kv) / self.rates["bandwidth"]
        self.bound_s += max(memory, compute)
        return self._execute(batch)

    def close(self) -> None:
        self.engine.runner.execute = self._execute


def bench_steady(engine: Engine, cfg: dict, rates: dict, z: Sizes, fp8: bool) -> dict:
    """Closed loop: ``concurrency`` requests in flight, a new one as each finishes, until ``steady_requests``
    were sent. Measured over the window where all ``concurrency`` run: from the first finish to the last send."""
    vocab = cfg["vocab_size"]
    sizes = azure_sizes(z.steady_requests, z)
    rng = torch.Generator().manual_seed(1)
    steps = StepLog(engine, cfg, rates, fp8)
    preempt0, sent, tokens = engine.scheduler.num_preemptions, 0, 0
    start = end = None

    def send() -> None:
        nonlocal sent
        p, o = sizes[sent]
        engine.add_request(f"s{sent}", random_prompt(rng, vocab, p), greedy(o))
        sent += 1

    for _ in range(z.concurrency):
        send()
    while engine.has_unfinished():
        outs = engine.step()
        if start is not None and end is None:
            tokens += sum(len(o.new_token_ids) for o in outs)
        for o in outs:
            if not o.finished:
                continue
            if start is None:
                sync()
                start, bound0 = time.perf_counter(), steps.bound_s
            if sent < len(sizes):
                send()
        if start is not None and end is None and sent == len(sizes):
            sync()
            end, bound, window_tokens = time.perf_counter(), steps.bound_s, tokens
    steps.close()
    return {
        "tok_s": window_tokens / (end - start),
        "roofline_tok_s": window_tokens / (bound - bound0),
        "window_s": end - start,
        "window_tokens": window_tokens,
        "requests": len(sizes),
        "mean_prompt": float(np.mean([p for p, _ in sizes])),
        "mean_output": float(np.mean([o for _, o in sizes])),
        "preemptions": engine.scheduler.num_preemptions - preempt0,
    }


def steady_keys(r: dict, prefix: str) -> dict:
    return {f"{prefix}_tok_s": r["tok_s"], f"{prefix}_roofline_tok_s": r["roofline_tok_s"],
            f"{prefix}_fraction_of_roofline": r["tok_s"] / r["roofline_tok_s"], f"{prefix}_detail": r}  # fmt: skip


def probe_logits(engine: Engine, prompts: list[list[int]]) -> torch.Tensor:
    """Last-position float32 logits of each prompt [P, vocab] (prefix cache off: every prompt computed)."""
    from gpu_runtime.engine.scheduler import Batch, Chunk
    from gpu_runtime.engine.sequence import Sequence

    rows = []
    for prompt in prompts:
        seq = Sequence("probe", prompt, greedy(1))
        engine.blocks.allocate(seq, len(seq))
        rows.append(engine.runner.run(Batch([Chunk(seq, 0, len(seq))], is_prefill=True))[0].float().cpu())
        engine.blocks.free(seq)
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error over the vocabulary, averaged over prompts."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).mean())


def quantize_on_device(engine: Engine, path: str) -> tuple[object, torch.Tensor]:
    """The fp8 layout of ``path`` filled from the bf16 engine's weights on the device (what the loader does on
    the host for a bf16 checkpoint served as fp8, without the disk round trip)."""
    layout = plan_weights(path, "fp8")
    buffer = torch.empty(layout.total_bytes, dtype=torch.uint8, device=engine.device)
    for s in layout.slots:
        if s.name.endswith("_scale"):
            continue
        src = engine.layout.view(engine._weights, s.name)
        if s.dtype == FP8_ELEMENT:
            q, scale = quantize_rows(src)
            layout.view(buffer, s.name).copy_(q)
            layout.view(buffer, s.name + "_scale").copy_(scale)
        else:
            layout.view(buffer, s.name).copy_(src)
    return layout, buffer


def dequantize_in_place(engine: Engine, layout, buffer: torch.Tensor) -> None:
    """Overwrite the bf16 engine's projections with the FP8 weights dequantized: the "same weights" reference."""
    for s in layout.slots:
        if s.dtype == FP8_ELEMENT:
            w = layout.view(buffer, s.name).float() * layout.view(buffer, s.name + "_scale")[:, None]
            engine.layout.view(engine._weights, s.name).copy_(w)


def steady_kv_blocks(engine_cfg: dict, z: Sizes, device: str, weight_bytes: int) -> int:
    """KV blocks for every run of a shape: what the device has left after ``weight_bytes`` still to allocate
    and 6 GiB for activations and graphs (the bf16 and FP8 engines never both hold a KV cache), at most what
    ``concurrency`` full-length sequences need."""
    want = z.concurrency * -(-z.max_model_len // 16)
    if device == "cpu":
        return want
    free, _ = torch.cuda.mem_get_info()
    return int(min(want, (free - weight_bytes - 6 * 1024**3) // (16 * kv_bytes_per_token(engine_cfg))))


def bench_shape(key: str, path: str, cfg: dict, rates: dict, z: Sizes, parts: set[str], args) -> dict:
    device = args.device
    rng = torch.Generator().manual_seed(0)
    kw = dict(max_num_seqs=max(z.c64, z.concurrency), max_num_batched_tokens=8192, max_model_len=z.max_model_len)
    blocks = steady_kv_blocks(cfg, z, device, plan_weights(path, "bfloat16").total_bytes)
    t = time.perf_counter()
    engine = Engine.from_pretrained(path, device=device, dtype="bfloat16", num_kv_blocks=blocks, **kw)
    log(f"bf16 engine loaded in {time.perf_counter() - t:.1f} s; {blocks} KV blocks")
    r: dict = {"shape": SHAPES[key]["name"], "decode_weight_bytes": decode_weight_bytes(engine, cfg)}
    if "base" in parts or "fp8" in parts:
        r |= bench_base(engine, cfg, rng, z) if "base" in parts else {"decode_b1_ms": decode_b1_ms(
            engine, cfg["vocab_size"], rng, z.decode_steps)}  # fmt: skip
        log("base", {k: v for k, v in r.items() if not isinstance(v, dict)})
    if "prefix" in parts:
        r |= bench_prefix(engine, cfg, rng, z)
        log("prefix", r["prefix_hit_ttft_ratio"], "unsplit", r["prefix_hit_ttft_ratio_unsplit"])
    if "steady" in parts:
        r |= steady_keys(bench_steady(engine, cfg, rates, z, fp8=False), "steady_c256")
        log("steady bf16", r["steady_c256_tok_s"], r["steady_c256_roofline_tok_s"])
    if "grammar" in parts:
        r |= bench_grammar(engine, path, cfg["vocab_size"], z.cost_steps, z.cost_rounds)
        log("grammar", {k: v for k, v in r.items() if k.startswith("grammar_")})
    if "logprobs" in parts:
        r |= bench_logprobs(engine, cfg["vocab_size"], z.cost_steps, z.cost_rounds)
        log("logprobs", {k: v for k, v in r.items() if k.startswith(("logprobs_", "penalties_"))})
    if "fp8" in parts:
        r |= bench_fp8(engine, path, cfg, rates, z, parts, kw, rng)
    else:
        engine.release()
    free_memory()
    return r


def bench_fp8(engine: Engine, path: str, cfg: dict, rates: dict, z: Sizes, parts, kw: dict, rng) -> dict:
    """Quantize the bf16 engine's weights on the device, measure accuracy, then the FP8 engine's speed."""
    probes = [random_prompt(rng, cfg["vocab_size"], n) for n in (300, 17, 64, 511)]
    original = probe_logits(engine, probes)
    engine.detach_kv()  # the bf16 KV goes: the FP8 engine gets the memory
    layout, buffer = quantize_on_device(engine, path)
    engine.attach_kv(torch.empty(64 * engine.kv_block_bytes, dtype=torch.uint8, device=engine.device))
    dequantize_in_place(engine, layout, buffer)
    dequantized = probe_logits(engine, probes)
    engine.detach_kv()
    engine.release()
    free_memory()
    blocks = steady_kv_blocks(cfg, z, str(buffer.device), 0)
    fp8 = Engine.from_weights(path, layout, buffer, buffer.device, "fp8", num_kv_blocks=blocks, **kw)
    logits = probe_logits(fp8, probes)
    r = {
        "fp8_weight_bytes": layout.total_bytes,
        "fp8_decode_weight_bytes": decode_weight_bytes(fp8, cfg),
        "fp8_logits_err_vs_bf16_same_weights": rel_err(logits, dequantized),
        "fp8_logits_err_vs_bf16_original": rel_err(logits, original),
        "fp8_dequantized_err_vs_bf16_original": rel_err(dequantized, original),
        "fp8_argmax_agree_vs_original": float((logits.argmax(1) == original.argmax(1)).float().mean()),
        "fp8_gemm": "torch._scaled_mm" if scaled_mm_supported(buffer.device) else "dequantize",
        "fp8_decode_b1_ms": decode_b1_ms(fp8, cfg["vocab_size"], rng, z.decode_steps),
        "fp8_prefill_1024_ms": prefill_ms(fp8, cfg["vocab_size"], rng, z.prefill_len, z.iters),
    }
    log("fp8", r)
    if "steady" in parts:
        r |= steady_keys(bench_steady(fp8, cfg, rates, z, fp8=True), "steady_c256_fp8")
        log("steady fp8", r["steady_c256_fp8_tok_s"], r["steady_c256_fp8_roofline_tok_s"])
    fp8.detach_kv()
    del fp8, buffer
    return r


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_transformers(path: str, cfg: dict, rng: torch.Generator, z: Sizes, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    log(f"transformers loaded in {time.perf_counter() - t:.1f} s")
    ids = torch.randint(0, cfg["vocab_size"], (z.c64, z.prompt_len), generator=rng).to(device)
    kw = dict(do_sample=False, pad_token_id=0)

    def gen(x: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, **kw)

    gen(ids[:2, :16], 4)
    b1 = ids[:1, :32]
    t64 = timed(lambda: gen(b1, 64), 1)
    t1 = timed(lambda: gen(b1, 1), 1)
    prefill = 1e3 * timed(lambda: model(ids[:1, : z.prompt_len].repeat(1, 2), logits_to_keep=1), 3)
    sync()
    t = time.perf_counter()
    out = gen(ids, z.output_len)
    sync()
    elapsed = time.perf_counter() - t
    return {
        "transformers_decode_b1_ms": 1e3 * (t64 - t1) / 63,
        "transformers_prefill_1024_ms": prefill,
        "transformers_throughput_c64_tok_s": (out.shape[1] - z.prompt_len) * z.c64 / elapsed,
        "transformers_c64_seconds": elapsed,
    }


def rooflines(r: dict, cfg: dict, rates: dict, z: Sizes) -> None:
    """Every figure's limit from the rates measured in this run, and each figure against it."""
    bw, flops = rates["bandwidth"], rates["flops"]
    r["decode_b1_roofline_ms"] = 1e3 * r["decode_weight_bytes"] / bw
    if "decode_b1_ms" in r:  # not measured when --parts leaves out base and fp8
        r["decode_fraction_of_roofline"] = r["decode_b1_roofline_ms"] / r["decode_b1_ms"]
    if "prefill_1024_ms" in r:
        r["prefill_1024_roofline_ms"] = 1e3 * prefill_flops(cfg, z.prefill_len) / flops
        r["prefill_x_roofline"] = r["prefill_1024_ms"] / r["prefill_1024_roofline_ms"]
        # Best case for the c64 run: every prefill at the matmul roofline, every decode step at the HBM roofline
        # for the weights alone, then with each step also reading every sequence's KV once.
        bound_s = z.c64 * prefill_flops(cfg, z.prompt_len) / flops + z.output_len * r["decode_weight_bytes"] / bw
        r["throughput_c64_roofline_tok_s"] = z.c64 * z.output_len / bound_s
        kv = sum(z.c64 * (z.prompt_len + i + 1) * kv_bytes_per_token(cfg) for i in range(z.output_len))
        r["throughput_c64_roofline_with_kv_tok_s"] = z.c64 * z.output_len / (bound_s + kv / bw)
    if "fp8_decode_b1_ms" in r:
        r["fp8_decode_speedup"] = r["decode_b1_ms"] / r["fp8_decode_b1_ms"]
        r["fp8_decode_b1_roofline_ms"] = 1e3 * r["fp8_decode_weight_bytes"] / bw
        r["fp8_decode_fraction_of_roofline"] = r["fp8_decode_b1_roofline_ms"] / r["fp8_decode_b1_ms"]
        r["fp8_prefill_1024_roofline_ms"] = 1e3 * prefill_seconds(cfg, z.prefill_len, 0, True, rates, fp8=True)
        r["fp8_prefill_x_roofline"] = r["fp8_prefill_1024_ms"] / r["fp8_prefill_1024_roofline_ms"]
    if "transformers_throughput_c64_tok_s" in r:
        r["throughput_x_transformers"] = r["throughput_c64_tok_s"] / r["transformers_throughput_c64_tok_s"]
        r["roofline_x_transformers"] = r["throughput_c64_roofline_tok_s"] / r["transformers_throughput_c64_tok_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8b,1b")
    parser.add_argument("--parts", default="base,prefix,steady,grammar,logprobs,fp8")
    parser.add_argument("--steady-requests", type=int, default=512, help="requests sent in the steady run")
    parser.add_argument("--out", default="bench/results/engine.json")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--unsplit-decode", action="store_true",
                        help="decode attention without its split-context variant (every part), to compare")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU, tiny shapes, to check the script")
    parser.add_argument("--cost-steps", type=int, help="grammar, logprobs: decode steps per window (default 256)")
    parser.add_argument("--cost-rounds", type=int, help="grammar, logprobs: rounds of base and variants (default 5)")
    args = parser.parse_args()
    if args.dry_run:
        args.shapes, args.device = "tiny", "cpu"
        args.out = args.out if args.out != parser.get_default("out") else "/tmp/warmserve-engine-dry.json"
    elif not torch.cuda.is_available():
        sys.exit("bench/engine.py needs a CUDA device (or --dry-run)")
    else:
        args.device = "cuda"
    parts = set(args.parts.split(","))
    if args.unsplit_decode:
        attention.MAX_SPLITS = 1
    z = Sizes(args.dry_run, args.steady_requests)
    z.cost_steps, z.cost_rounds = args.cost_steps or z.cost_steps, args.cost_rounds or z.cost_rounds
    assert z.steady_requests > z.concurrency, "the steady window needs more requests than are in flight"
    rates = {
        "bandwidth": hbm_read_bandwidth(args.device, args.dry_run),
        "flops": matmul_rate(args.device, args.dry_run),
    }
    rates["fp8_flops"] = fp8_matmul_rate(args.device, args.dry_run)
    log(f"HBM read {rates['bandwidth'] / 1e12:.2f} TB/s, matmul bf16 {rates['flops'] / 1e12:.0f} "
        f"fp8 {rates['fp8_flops'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    shapes = {}
    for key in args.shapes.split(","):
        path = f"/tmp/warmserve-bench-{key}"
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        cfg = make_weights(SHAPES[key], path, args.device)
        log(f"{SHAPES[key]['name']}: random weights written in {time.perf_counter() - t:.1f} s")
        r = bench_shape(key, path, cfg, rates, z, parts, args)
        if "base" in parts and not args.skip_transformers:
            r |= bench_transformers(path, cfg, torch.Generator().manual_seed(0), z, args.device)
            free_memory()
        rooflines(r, cfg, rates, z)
        log(json.dumps(r, indent=1))
        shapes[key] = r
        shutil.rmtree(path, ignore_errors=True)
        # after every shape: a later one may run out of time
        if parts <= COST_PARTS:
            append_cost_runs(args.out, r, parts, args.device)
        else:
            write(args.out, shapes, rates, args.device)


def append_cost_runs(out: str, r: dict, parts: set[str], device: str) -> None:
    """A run of only the cost parts adds one entry per part and shape to ``cost_runs`` in ``out`` (made if
    missing) and leaves the file's other figures as they are."""
    result = {}
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    prefixes = {"grammar": ("grammar_",), "logprobs": ("logprobs_", "penalties_")}
    for part in sorted(parts):
        result.setdefault("cost_runs", []).append({
            "part": part,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "PYTHONPATH=. python3 bench/engine.py " + " ".join(sys.argv[1:]),
            "torch": torch.__version__,
            "shape": r["shape"],
            **{k: v for k, v in r.items() if k.startswith(prefixes[part])},
        })  # fmt: skip
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"added {len(parts)} cost run(s) of {r['shape']} to {out}")


def write(out: str, shapes: dict, rates: dict, device: str) -> None:
    main_shape = shapes.get("8b") or next(iter(shapes.values()))
    keys = ["shape", "decode_b1_ms", "decode_b1_roofline_ms", "prefill_1024_ms", "prefill_1024_roofline_ms",
            "throughput_c64_tok_s", "transformers_throughput_c64_tok_s"]  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **{k: main_shape.get(k) for k in keys},
        "hbm_read_bandwidth_tb_s": rates["bandwidth"] / 1e12,
        "bf16_matmul_tflop_s": rates["flops"] / 1e12,
        "fp8_matmul_tflop_s": rates["fp8_flops"] / 1e12,
        "decode_max_splits": attention.MAX_SPLITS,
        "torch": torch.__version__,
        "command": "PYTHONPATH=. python3 bench/engine.py " + " ".join(sys.argv[1:]),
        "shapes": shapes,
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
