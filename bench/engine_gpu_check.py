"""GPU correctness check for the engine (run on the device, not in CI).

Same random bf16 weights in the engine (CUDA path: flash prefill, Triton paged decode, CUDA graphs) and in
transformers; every sampled position's logits must be within 1e-2 relative error (L2 over the vocabulary) of
transformers'. Also checks the Triton decode kernel against the torch reference on a random paged cache, and
that re-attaching the KV buffer at the same address reuses the captured graphs.

    PYTHONPATH=. python3 bench/engine_gpu_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_runtime import Engine, SamplingParams  # noqa: E402
from gpu_runtime.engine.attention import paged_decode_torch, paged_decode_triton  # noqa: E402

TOLERANCE = 1e-2

SHAPES = {
    "llama": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, rope_theta=500000.0),
    "qwen2": dict(hidden_size=896, intermediate_size=2432, num_hidden_layers=4, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=32000),
}  # fmt: skip


def build(path: str, arch: str) -> torch.nn.Module:
    import transformers

    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, names + "Config")(max_position_embeddings=4096, **SHAPES[arch])
    torch.manual_seed(0)
    model = getattr(transformers, names + "ForCausalLM")(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return model.cuda().eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_model(arch: str, tmp: str) -> dict:
    path = os.path.join(tmp, arch)
    hf = build(path, arch)
    engine = Engine.from_pretrained(path, device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=1024)
    recorded: list[torch.Tensor] = []
    run = engine.runner.run
    engine.runner.run = lambda batch: recorded.append(run(batch).clone()) or recorded[-1]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (n,), generator=g).tolist() for n in (300, 17, 64)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    # recorded[i] rows follow the scheduler's order; rebuild it: step 0 prefills all three, then decode steps.
    worst, token_match = 0.0, 0
    with torch.no_grad():
        for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            full = torch.tensor([prompt + out.token_ids], device="cuda")
            ref = hf(full).logits[0, len(prompt) - 1 : -1]  # logits that produced each generated token
            ours = torch.stack([recorded[0][i]] + [step[i] for step in recorded[1:]])
            errs = [rel_err(ours[j], ref[j]) for j in range(len(out.token_ids))]
            worst = max(worst, *errs)
            token_match += sum(int(ref[j].argmax()) == t for j, t in enumerate(out.token_ids))
    # Graph reuse across detach/attach at the same address.
    buffer = engine._kv_buffer
    graphs = len(engine.runner.graphs)
    engine._kv_owned = False
    engine.detach_kv()
    engine.attach_kv(buffer)
    again = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    result = {
        "max_rel_err": worst,
        "greedy_tokens_agreeing_with_transformers_argmax": f"{token_match}/{sum(len(o.token_ids) for o in outs)}",
        "graphs_reused_after_reattach": len(engine.runner.graphs) == graphs,
        "same_tokens_after_reattach": [o.token_ids for o in again] == [o.token_ids for o in outs],
        "ok": worst <= TOLERANCE,
    }
    print(arch, result, flush=True)
    return result


def check_kernel() -> dict:
    torch.manual_seed(0)
    blocks, bs, kvh, h, d = 256, 16, 8, 32, 128
    cache = torch.randn(blocks, 2, bs, kvh, d, device="cuda", dtype=torch.bfloat16)
    k, v = cache[:, 0], cache[:, 1]
    lens = torch.tensor([1, 16, 17, 100, 333, 0], device="cuda", dtype=torch.int32)
    tables = torch.randperm(blocks, device="cuda")[: 6 * 24].view(6, 24).int()
    q = torch.randn(6, h, d, device="cuda", dtype=torch.bfloat16)
    ref = paged_decode_torch(q[:5], k, v, tables[:5], lens[:5])
    out = paged_decode_triton(q, k, v, tables, lens)
    err = rel_err(out[:5], ref)
    print("triton paged decode vs torch", err, flush=True)
    return {"rel_err": err, "ok": err <= TOLERANCE and bool(torch.isfinite(out).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("engine_gpu_check needs a CUDA device")
    results = {"device": torch.cuda.get_device_name(), "tolerance": TOLERANCE, "kernel": check_kernel()}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for arch in SHAPES:
            results[arch] = check_model(arch, tmp)
    results["ok"] = all(r["ok"] for r in results.values() if isinstance(r, dict))
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    main()
