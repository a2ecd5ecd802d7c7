"""GPU correctness check for the engine (run on the device, not in CI).

Same random bf16 weights in the engine (CUDA path: flash prefill, fused Triton ops, Triton paged decode, CUDA
graphs) and in transformers. For every generated position it reports the relative L2 error of the engine's
logits against transformers bf16 (the issue's target: <= 1e-2) and, to show the bf16 noise floor, both bf16
implementations against transformers in float32 on the same weights. The check passes when the engine is no
further from float32 than transformers' own bf16 run is (x1.25). Also: the Triton decode kernel (unsplit, and
split-context: forced, as chosen for a prefix hit's 16 rows and a long batch-1 context, replayed in a CUDA graph
with new lengths) and fused ops against their torch versions, the FP8 activation quantization kernel against the
torch path bit for bit and the FP8/bf16 GEMV at several rows per program, and graph reuse after re-attaching the
KV buffer at the same address.

    PYTHONPATH=. python3 bench/engine_gpu_check.py [--kernels-only] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import UTC, datetime

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_runtime import Engine, SamplingParams  # noqa: E402
from gpu_runtime.engine.attention import (  # noqa: E402
    decode_attention,
    decode_splits,
    paged_decode_torch,
    paged_decode_triton,
)

TOLERANCE = 1e-2

SHAPES = {
    "llama": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, rope_theta=500000.0),
    "qwen2": dict(hidden_size=896, intermediate_size=2432, num_hidden_layers=4, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=32000),
}  # fmt: skip


def build(path: str, arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Save random bf16 weights, then load them back as transformers bf16 and float32 models. Loading (rather
    than ``model.to(bfloat16)``) matters: ``.to`` also rounds the rotary ``inv_freq`` buffer to bf16, which moves
    transformers' rotary angles by ~0.1% per frequency and its logits by percents."""
    import transformers

    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, names + "Config")(max_position_embeddings=4096, **SHAPES[arch])
    torch.manual_seed(0)
    cls = getattr(transformers, names + "ForCausalLM")
    cls(config).to(torch.bfloat16).save_pretrained(path)
    hf = cls.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    hf32 = cls.from_pretrained(path, dtype=torch.float32).cuda().eval()
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32, "transformers rounded inv_freq"
    return hf, hf32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_engine(path: str, prompts: list[list[int]], fused: bool = True, triton_decode: bool = True):
    """(engine, outputs, per-prompt logits [generated, vocab]) for greedy decoding; the flags swap the fused
    Triton ops / the Triton decode kernel for their torch versions (diagnostics: which part costs accuracy)."""
    from gpu_runtime.engine import model as model_module
    from gpu_runtime.engine import ops

    ops._fused = (lambda t: t.is_cuda and ops.triton is not None) if fused else (lambda t: False)
    model_module.decode_attention = decode_attention if triton_decode else _torch_decode
    engine = Engine.from_pretrained(
        path, device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=1024, enforce_eager=not triton_decode
    )
    outs, logits = record(engine, prompts)
    ops._fused = lambda t: t.is_cuda and ops.triton is not None
    model_module.decode_attention = decode_attention
    return engine, outs, logits


def record(engine: Engine, prompts: list[list[int]]):
    """Greedy outputs and per-prompt logits [generated, vocab] of one ``generate`` call."""
    recorded: list[torch.Tensor] = []
    execute = engine.runner.execute

    def keep(batch):
        logits, prompt = execute(batch)
        recorded.append(logits.clone())
        return logits, prompt

    engine.runner.execute = keep
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    engine.runner.execute = execute
    # Step 0 prefills all prompts (one row each), then every decode step has one row per prompt, in order.
    logits = [torch.stack([recorded[0][i]] + [step[i] for step in recorded[1:]]) for i in range(len(prompts))]
    return outs, logits


def _torch_decode(q, k_cache, v_cache, meta):
    return paged_decode_torch(q, k_cache, v_cache, meta.block_tables, meta.context_lens)


@torch.no_grad()
def errors(models: dict, prompts, outs, logits) -> dict[str, list[float]]:
    """Per generated position: relative L2 error of ``logits`` against each reference model."""
    errs: dict[str, list[float]] = {name: [] for name in models}
    for prompt, out, ours in zip(prompts, outs, logits, strict=True):
        full = torch.tensor([prompt + out.token_ids], device="cuda")
        for name, model in models.items():
            ref = model(full).logits[0, len(prompt) - 1 : -1]  # the logits that produced each generated token
            errs[name] += [rel_err(ours[j], ref[j]) for j in range(len(out.token_ids))]
    return errs


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def check_model(arch: str, tmp: str) -> dict:
    path = os.path.join(tmp, arch)
    hf, hf32 = build(path, arch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (n,), generator=g).tolist() for n in (300, 17, 64)]
    engine, outs, logits = run_engine(path, prompts)
    errs = errors({"bf16": hf, "fp32": hf32}, prompts, outs, logits)
    hf_logits = [hf(torch.tensor([p + o.token_ids], device="cuda")).logits[0, len(p) - 1 : -1] for p, o in
                 zip(prompts, outs, strict=True)]  # fmt: skip
    hf_errs = errors({"fp32": hf32}, prompts, outs, hf_logits)["fp32"]
    token_match = sum(
        int(ref[j].argmax()) == t for ref, o in zip(hf_logits, outs, strict=True) for j, t in enumerate(o.token_ids)
    )
    # One prompt at a time: the single-sequence prefill graph and the batch-1 decode graph with its Triton GEMVs
    # (the batched run above prefills eagerly and decodes at batch 4).
    alone = [record(engine, [p]) for p in prompts]
    alone_errs = errors({"fp32": hf32}, prompts, [o[0] for o, _ in alone], [lg[0] for _, lg in alone])["fp32"]
    # Short prompts prefilled together as decode rows, in several replays (this engine's replays hold 16 rows):
    # each prompt's first logits against the same prompt prefilled alone. A replay rewrites its graph's output, so
    # a group's logits taken after the next group's replay would belong to another prompt (rel. error ~1).
    short = [torch.randint(0, 32000, (n,), generator=g).tolist() for n in (12, 9, 14)]
    _, grouped = record(engine, short)
    first_alone = [record(engine, [p])[1][0][0] for p in short]
    grouped_err = max(rel_err(lg[0], ref) for lg, ref in zip(grouped, first_alone, strict=True))
    # Graph reuse across detach/attach at the same address.
    buffer = engine._kv_buffer
    graphs = len(engine.runner.graphs)
    engine._kv_owned = False
    engine.detach_kv()
    engine.attach_kv(buffer)
    again = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    result = {
        "max_rel_err_vs_transformers_bf16": max(errs["bf16"]),
        "mean_rel_err_vs_transformers_bf16": mean(errs["bf16"]),
        "prefill_rel_err_vs_transformers_bf16": max(errs["bf16"][0 :: len(outs[0].token_ids)]),
        "meets_1e-2_target": max(errs["bf16"]) <= TOLERANCE,
        "mean_rel_err_vs_fp32": mean(errs["fp32"]),
        "one_prompt_at_a_time_mean_rel_err_vs_fp32": mean(alone_errs),
        "one_prompt_at_a_time_max_rel_err_vs_fp32": max(alone_errs),
        "transformers_bf16_mean_rel_err_vs_fp32": mean(hf_errs),
        "greedy_tokens_agreeing_with_transformers_argmax": f"{token_match}/{sum(len(o.token_ids) for o in outs)}",
        "graphs_reused_after_reattach": len(engine.runner.graphs) == graphs,
        "same_tokens_after_reattach": [o.token_ids for o in again] == [o.token_ids for o in outs],
        "grouped_rows_first_logits_max_rel_err_vs_alone": grouped_err,
    }
    engine.release()
    for name, flags in (("torch_ops", dict(fused=False)), ("torch_decode", dict(triton_decode=False))):
        variant, v_outs, v_logits = run_engine(path, prompts, **flags)
        result[f"mean_rel_err_vs_fp32_with_{name}"] = mean(errors({"fp32": hf32}, prompts, v_outs, v_logits)["fp32"])
        variant.release()
    bound = 1.25 * result["transformers_bf16_mean_rel_err_vs_fp32"]
    # The pass criterion: within the rounding noise transformers' own bf16 run has (not the issue's 1e-2 target,
    # which `meets_1e-2_target` reports separately).
    result["as_accurate_as_transformers_bf16"] = (
        max(result["mean_rel_err_vs_fp32"], result["one_prompt_at_a_time_mean_rel_err_vs_fp32"]) <= bound
        # two bf16 paths to the same logits differ by bf16 noise (~1e-2); another prompt's logits by ~1.4
        and grouped_err <= 0.1
    )
    print(arch, result, flush=True)
    return result


def check_kernel() -> dict:
    """The Triton paged decode kernel, unsplit and split-context, against the torch reference (bf16)."""
    torch.manual_seed(0)
    blocks, bs, kvh, h, d = 512, 16, 8, 32, 128
    cache = torch.randn(blocks, 2, bs, kvh, d, device="cuda", dtype=torch.bfloat16)
    k, v = cache[:, 0], cache[:, 1]
    lens = torch.tensor([1, 16, 17, 100, 333, 0], device="cuda", dtype=torch.int32)
    tables = torch.randperm(blocks, device="cuda")[: 6 * 24].view(6, 24).int()
    q = torch.randn(6, h, d, device="cuda", dtype=torch.bfloat16)
    ref = paged_decode_torch(q[:5], k, v, tables[:5], lens[:5])
    errs = {
        "unsplit": rel_err(paged_decode_triton(q, k, v, tables, lens, splits=1)[:5], ref),
        "split_8": rel_err(paged_decode_triton(q, k, v, tables, lens, splits=8)[:5], ref),
    }
    # A prefix hit's tail as decode rows: 16 rows of one sequence over ~2048 cached tokens, then one row over 4000.
    hit_table = torch.randperm(blocks, device="cuda")[:256].int()
    for name, n, first in (("prefix_hit_16_rows", 16, 2033), ("batch1_4000", 1, 4000)):
        rows_lens = torch.arange(first, first + n, device="cuda", dtype=torch.int32)
        rows_tables = hit_table.repeat(n, 1)
        rq = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
        want = paged_decode_torch(rq, k, v, rows_tables, rows_lens)
        one = paged_decode_triton(rq, k, v, rows_tables, rows_lens, splits=1)
        split = paged_decode_triton(rq, k, v, rows_tables, rows_lens)
        errs[name] = rel_err(split, want)
        errs[name + "_vs_unsplit"] = rel_err(split, one)
        errs[name + "_splits"] = decode_splits(n, kvh, rows_tables.shape[1] * bs, q.device)
    errs["graph_replay_new_lengths"] = check_split_graph(q, k, v, tables)
    values = [e for name, e in errs.items() if not name.endswith("_splits")]
    print("triton paged decode vs torch", errs, flush=True)
    ok = all(e <= TOLERANCE for e in values) and all(errs[n] > 1 for n in errs if n.endswith("_splits"))
    return {"rel_err": errs["unsplit"], "rel_errs": errs, "within_tolerance": ok}


def check_split_graph(q, k, v, tables) -> float:
    """The split kernel captured in a CUDA graph (its scratch allocated at capture), replayed with other lengths."""
    lens = torch.zeros(q.shape[0], device="cuda", dtype=torch.int32)
    paged_decode_triton(q, k, v, tables, lens, splits=4)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_triton(q, k, v, tables, lens, splits=4)
    lens.copy_(torch.tensor([300, 0, 5, 64, 383, 129], dtype=torch.int32))
    graph.replay()
    live = lens > 0
    want = paged_decode_torch(q[live], k, v, tables[live], lens[live])
    return max(rel_err(out[live], want), float(out[~live].abs().max()))


def check_gemv() -> dict:
    """The batch-1 GEMV at several rows per program on bf16 and FP8 weights against float32."""
    from gpu_runtime import fp8
    from gpu_runtime.engine import ops

    torch.manual_seed(0)
    xs = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) * 3
    gemv = {}
    w = torch.randn(6144 + 8, 4096, device="cuda", dtype=torch.bfloat16) * 0.02  # N not a multiple of rows
    wq, scale = fp8.quantize_rows(w)
    for rows in (1, 2, 4):
        cfg = ops.GemvConfig(rows, 2048, 4, 1)
        gemv[f"bf16_rows{rows}"] = rel_err(ops.gemv(xs, w, None, None, cfg), xs.float() @ w.float().T)
        want = xs.float() @ (wq.float() * scale[:, None]).T
        gemv[f"fp8_rows{rows}"] = rel_err(ops.gemv(xs, wq, None, scale, cfg._replace(block_k=4096)), want)
    out = {"gemv_rel_err": gemv, "within_1e-2": all(e <= 1e-2 for e in gemv.values())}
    print("gemv", out, flush=True)
    return out


def check_ops() -> dict:
    """Fused Triton ops against the same ops in torch (CUDA), bf16."""
    from gpu_runtime.engine import ops
    from gpu_runtime.engine.attention import AttnMeta

    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    x, r = (torch.randn(64, 4096, dtype=dt, device=dev) for _ in range(2))
    w = torch.randn(4096, dtype=dt, device=dev)
    gu = torch.randn(64, 2 * 14336, dtype=dt, device=dev)
    h, kvh, d = 32, 8, 128
    qkv = torch.randn(64, (h + 2 * kvh) * d, dtype=dt, device=dev)
    pos = torch.randint(0, 4096, (64,), device=dev)
    freqs = torch.randn(4096, d // 2, device=dev)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotary tables repeat their first half
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    qn, kn = torch.randn(d, dtype=dt, device=dev), torch.randn(d, dtype=dt, device=dev)
    w_qkv, b_qkv = torch.randn(6144, 4096, dtype=dt, device=dev) * 0.02, torch.randn(6144, dtype=dt, device=dev)
    w_down = torch.randn(4096, 14336, dtype=dt, device=dev) * 0.02
    results = []
    for fused in (False, True):
        ops._fused = lambda t, fused=fused: fused
        kc = torch.zeros(8, 16, kvh, d, dtype=dt, device=dev)
        vc = torch.zeros_like(kc)
        slot = torch.arange(64, device=dev, dtype=torch.int32)
        meta = AttnMeta(True, slot // 16, slot % 16)
        q, k, _ = ops.qkv_rope_store(qkv, pos, cos, sin, (h, kvh, d), (qn, kn), 1e-6, kc, vc, meta)
        results.append([*ops.add_rms_norm(x, r, w, 1e-5), ops.silu_and_mul(gu), q, k, kc, vc])
        # batch-1 projections: Triton GEMV when fused, cuBLAS otherwise
        results[-1] += [ops.linear(x[:1], w_qkv, b_qkv), ops.linear(gu[:1, :14336], w_down)]
    ops._fused = lambda t: t.is_cuda and ops.triton is not None
    names = ["rms_norm", "residual", "silu_mul", "rope_q", "rope_k", "k_cache", "v_cache", "gemv_bias", "gemv"]
    out = {
        n: {"exact_fraction": float((a == b).float().mean()), "rel_err": rel_err(b, a)}
        for n, a, b in zip(names, *results, strict=True)
    }
    out["within_1e-2"] = all(v["rel_err"] <= 1e-2 for v in out.values())
    print("fused ops vs torch", out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--kernels-only", action="store_true", help="the kernel, ops and GEMV checks, no models")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("engine_gpu_check needs a CUDA device")
    results = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python3 " + " ".join(sys.argv),
        "tolerance": TOLERANCE,
        "kernel": check_kernel(),
        "ops": check_ops(),
        "gemv": check_gemv(),
    }
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for arch in [] if args.kernels_only else SHAPES:
            results[arch] = check_model(arch, tmp)
    verdicts = {"kernel": "within_tolerance", "ops": "within_1e-2", "gemv": "within_1e-2"}
    results["all_checks_passed"] = all(
        r[verdicts.get(name, "as_accurate_as_transformers_bf16")] for name, r in results.items() if isinstance(r, dict)
    )
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if results["all_checks_passed"] else 1)


if __name__ == "__main__":
    main()
