"""Engine benchmark on the lent GPU: the engine against the hardware limits and against transformers.

For each shape (Llama-3-8B and Llama-3.2-1B, random bf16 weights generated on the device into /tmp):
- batch-1 decode ms/token vs the HBM roofline (decode weight bytes / HBM read bandwidth measured in this run);
- one 1024-token prefill vs the matmul roofline (prefill FLOPs / bf16 matmul rate measured in this run);
- output tokens/s for 64 concurrent requests (512 tokens in, 128 out) vs transformers ``generate`` on a
  batch of the same 64 prompts, same weights.
Writes bench/results/engine.json (top-level figures are the 8B shape; every shape under "shapes").

    PYTHONPATH=. python3 bench/engine.py [--shapes 8b,1b] [--out bench/results/engine.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_runtime import Engine, SamplingParams  # noqa: E402
from gpu_runtime.engine import ops  # noqa: E402

SHAPES = {
    "8b": dict(name="Llama-3-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
               rope_theta=500000.0, max_position_embeddings=8192),
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192),
}  # fmt: skip
CONCURRENCY, PROMPT_LEN, OUTPUT_LEN = 64, 512, 128


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def timed(fn, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hbm_read_bandwidth() -> float:
    """Bytes/s reading HBM: the best of a large reduction (read-only) and a copy (read + write)."""
    x = torch.empty(2 * 1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    read = x.numel() * 2 / timed(lambda: x.sum(), 10)
    copy = 2 * x.numel() * 2 / timed(lambda: y.copy_(x), 10)
    return max(read, copy)


def matmul_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, 20)


def make_weights(shape: dict, path: str) -> dict:
    """Random bf16 weights in HF layout, generated on the GPU and saved to ``path`` in ~4 GB shards."""
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
    gen = torch.Generator(device="cuda").manual_seed(0)
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
            t = (torch.randn(dims, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        if shard_bytes > 4 * 1024**3:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    return cfg


def prefill_flops(cfg: dict, tokens: int) -> float:
    """Matmul FLOPs of one prefill: projections and MLP for every token, causal attention, lm_head once."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim", h // heads)
    q, kv = heads * d, cfg["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    attention = 2 * 2 * heads * d * tokens * (tokens + 1) / 2  # QK^T and PV, causal half
    return layers * (2 * tokens * per_layer + attention) + 2 * cfg["vocab_size"] * h


def kv_bytes_per_token(cfg: dict) -> int:
    """bf16 K and V of one token across all layers."""
    d = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * d * 2


def bench_engine(path: str, cfg: dict, rng: torch.Generator) -> dict:
    t = time.perf_counter()
    blocks = CONCURRENCY * -(-(PROMPT_LEN + OUTPUT_LEN) // 16) + 256
    engine = Engine.from_pretrained(
        path, device="cuda", dtype="bfloat16", num_kv_blocks=blocks, max_num_seqs=CONCURRENCY,
        max_num_batched_tokens=8192, max_model_len=2048,
    )  # fmt: skip
    log(f"engine loaded in {time.perf_counter() - t:.1f} s; {blocks} KV blocks")
    vocab = cfg["vocab_size"]
    greedy = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=rng).tolist()

    # batch-1 decode: per-step times after the prefill step
    engine.generate([prompt(32)], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # graph
    engine.add_request("b1", prompt(32), SamplingParams(max_tokens=257, temperature=0.0, ignore_eos=True))
    steps = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    decode_ms = 1e3 * statistics.median(steps[1:])
    # The batch-1 graph alone (no scheduler, input copies or sampling): what the GPU spends per token.
    graph, _ = engine.runner.graphs[(engine.runner.kv_key, 1)]
    graph_ms = 1e3 * timed(graph.replay, 50)
    # Same-run comparison: the batch-1 graph with cuBLAS for the projections instead of the Triton GEMV.
    gemv_ok, ops._gemv_ok = ops._gemv_ok, lambda x, w: False
    engine.runner.graphs.clear()
    engine.generate([prompt(32)], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    cublas_graph_ms = 1e3 * timed(engine.runner.graphs[(engine.runner.kv_key, 1)][0].replay, 50)
    ops._gemv_ok = gemv_ok
    engine.runner.graphs.clear()

    # 1024-token prefill: one step that prefills and samples one token
    def prefill() -> None:
        engine.add_request("p", prompt(1024), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()

    prefill_ms = 1e3 * timed(prefill, 5)
    engine.runner.use_cuda_graphs = False  # same-run comparison: eager prefill
    eager_prefill_ms = 1e3 * timed(prefill, 5)
    engine.runner.use_cuda_graphs = True

    # 64 concurrent requests
    prompts = [prompt(PROMPT_LEN) for _ in range(CONCURRENCY)]
    engine.generate(prompts[:CONCURRENCY], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate(prompts, greedy)
    elapsed = time.perf_counter() - t
    produced = sum(len(o.token_ids) for o in outs)
    result = {
        "decode_b1_ms": decode_ms,
        "decode_b1_graph_only_ms": graph_ms,
        "decode_b1_graph_only_cublas_ms": cublas_graph_ms,
        "prefill_1024_ms": prefill_ms,
        "prefill_1024_eager_ms": eager_prefill_ms,
        "throughput_c64_tok_s": produced / elapsed,
        "c64_seconds": elapsed,
        "preemptions": engine.scheduler.num_preemptions,
    }
    result["decode_weight_bytes"] = sum(
        s.nbytes for s in engine.layout.slots if cfg["tie_word_embeddings"] or "embed_tokens" not in s.name
    )
    engine.release()
    return result


def free_gpu_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def bench_transformers(path: str, cfg: dict, rng: torch.Generator) -> dict:
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    log(f"transformers loaded in {time.perf_counter() - t:.1f} s")
    vocab = cfg["vocab_size"]
    ids = torch.randint(0, vocab, (CONCURRENCY, PROMPT_LEN), generator=rng).cuda()
    kw = dict(do_sample=False, pad_token_id=0)

    def gen(x: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, **kw)

    gen(ids[:2, :16], 4)
    b1 = ids[:1, :32]
    t64 = timed(lambda: gen(b1, 64), 1)
    t1 = timed(lambda: gen(b1, 1), 1)
    prefill_ms = 1e3 * timed(lambda: model(ids[:1, :PROMPT_LEN].repeat(1, 2), logits_to_keep=1), 3)
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = gen(ids, OUTPUT_LEN)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    produced = (out.shape[1] - PROMPT_LEN) * CONCURRENCY
    return {
        "transformers_decode_b1_ms": 1e3 * (t64 - t1) / 63,
        "transformers_prefill_1024_ms": prefill_ms,
        "transformers_throughput_c64_tok_s": produced / elapsed,
        "transformers_c64_seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8b,1b")
    parser.add_argument("--out", default="bench/results/engine.json")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/engine.py needs a CUDA device")
    bandwidth, flops = hbm_read_bandwidth(), matmul_rate()
    log(f"HBM read {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    shapes = {}
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        path = f"/tmp/warmserve-bench-{key}"
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        cfg = make_weights(shape, path)
        log(f"{shape['name']}: random weights written in {time.perf_counter() - t:.1f} s")
        rng = torch.Generator().manual_seed(0)
        r = {"shape": shape["name"], **bench_engine(path, cfg, rng)}
        free_gpu_memory()
        r["decode_b1_roofline_ms"] = 1e3 * r["decode_weight_bytes"] / bandwidth
        r["prefill_1024_roofline_ms"] = 1e3 * prefill_flops(cfg, 1024) / flops
        r["decode_fraction_of_roofline"] = r["decode_b1_roofline_ms"] / r["decode_b1_ms"]
        r["prefill_x_roofline"] = r["prefill_1024_ms"] / r["prefill_1024_roofline_ms"]
        # Best case for the c64 run: every prefill at the matmul roofline, every decode step at the HBM roofline
        # for the weights alone (KV reads ignored).
        bound_s = (
            CONCURRENCY * prefill_flops(cfg, PROMPT_LEN) / flops + OUTPUT_LEN * r["decode_weight_bytes"] / bandwidth
        )
        r["throughput_c64_roofline_tok_s"] = CONCURRENCY * OUTPUT_LEN / bound_s
        # The same bound with each decode step also reading every sequence's KV cache once (at 64 x 600 tokens
        # this is a quarter of the 8B step's bytes).
        kv_bytes = sum(CONCURRENCY * (PROMPT_LEN + i + 1) * kv_bytes_per_token(cfg) for i in range(OUTPUT_LEN))
        r["throughput_c64_roofline_with_kv_tok_s"] = CONCURRENCY * OUTPUT_LEN / (bound_s + kv_bytes / bandwidth)
        if not args.skip_transformers:
            r |= bench_transformers(path, cfg, rng)
            free_gpu_memory()
            hf_tok_s = r["transformers_throughput_c64_tok_s"]
            r["throughput_x_transformers"] = r["throughput_c64_tok_s"] / hf_tok_s
            r["roofline_x_transformers"] = r["throughput_c64_roofline_tok_s"] / hf_tok_s
        log(json.dumps(r, indent=1))
        shapes[key] = r
        shutil.rmtree(path, ignore_errors=True)
        write(args.out, shapes, bandwidth, flops)  # after every shape: a later one may run out of time


def write(out: str, shapes: dict, bandwidth: float, flops: float) -> None:
    main_shape = shapes.get("8b") or next(iter(shapes.values()))
    keys = ["shape", "decode_b1_ms", "decode_b1_roofline_ms", "prefill_1024_ms", "prefill_1024_roofline_ms",
            "throughput_c64_tok_s", "transformers_throughput_c64_tok_s"]  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **{k: main_shape.get(k) for k in keys},
        "hbm_read_bandwidth_tb_s": bandwidth / 1e12,
        "bf16_matmul_tflop_s": flops / 1e12,
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
