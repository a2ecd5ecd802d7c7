"""FP8 weights on CPU: byte accounting, the published checkpoint formats, quantize-on-load, both loaders, and
logits against a bf16 run of the same dequantized weights (the CPU path dequantizes exactly)."""

from __future__ import annotations

import os

import pytest
import torch
from engine_models import build_model, prompts, write_dequantized, write_fp8_checkpoint

from gpu_runtime import Engine
from gpu_runtime.engine.scheduler import Batch, Chunk
from gpu_runtime.engine.sequence import SamplingParams, Sequence
from gpu_runtime.fp8 import Fp8Weight, emulated_linear, quantize_rows, quantize_tokens
from gpu_runtime.memory.loader import load
from gpu_runtime.weights import load_weights, plan_weights
from modelinfo import ModelFileError, config_from_dict, load_model_config
from sim.models import CONFIGS, shape

SKIP = ("model.layers.1.mlp.down_proj",)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    base = str(root / "bf16")
    build_model(base, "qwen2", num_key_value_heads=2, intermediate_size=128)  # qkv bias: the FP8 GEMM + bias
    out = {"quantize-on-load": base}
    write_fp8_checkpoint(base, str(root / "compressed"), "compressed-tensors")
    write_fp8_checkpoint(base, str(root / "fbgemm"), "fbgemm_fp8", skip=SKIP)
    write_fp8_checkpoint(base, str(root / "exact"), "fbgemm_fp8")  # float32 scales: what quantize-on-load makes
    out |= {"compressed-tensors": str(root / "compressed"), "fbgemm_fp8": str(root / "fbgemm")}
    refs = {"quantize-on-load": str(root / "exact"), "compressed-tensors": out["compressed-tensors"]}
    refs["fbgemm_fp8"] = out["fbgemm_fp8"]
    for name, src in refs.items():
        write_dequantized(src, str(root / f"deq-{name}"))
    return out, {name: str(root / f"deq-{name}") for name in refs}


def test_fp8_counts_one_byte_per_projection_weight_and_keeps_kv_in_bf16():
    cfg = config_from_dict(CONFIGS["llama-7b"][0])
    assert cfg.kv_bytes_per_token("fp8") == cfg.kv_bytes_per_token("bfloat16")
    ratio = cfg.weight_bytes("fp8") / cfg.weight_bytes("bfloat16")
    assert 0.5 < ratio < 0.52  # embeddings and lm_head stay bf16; scales add 4 bytes a row
    sim = shape("llama-7b", cfg, 1, "fp8")
    assert sim.weight_bytes == cfg.weight_bytes("fp8") and sim.params == cfg.num_params()


@pytest.mark.parametrize("fmt", ["quantize-on-load", "compressed-tensors", "fbgemm_fp8"])
def test_layout_size_matches_modelinfo_and_loaders_agree(dirs, fmt):
    path = dirs[0][fmt]
    layout = plan_weights(path, "fp8")
    assert layout.total_bytes == load_model_config(path).weight_bytes("fp8")
    skipped = layout.slot(SKIP[0] + ".weight").dtype
    assert skipped == ("bfloat16" if fmt == "fbgemm_fp8" else "float8_e4m3fn")
    reference = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    load_weights(layout, reference)
    chunk = 4096  # small chunks: conversions and computed scales straddle chunk boundaries
    chunks = [torch.zeros(chunk, dtype=torch.uint8) for _ in range(-(-layout.total_bytes // chunk))]
    fast = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    load(layout, chunks, fast, read_files=True, threads=3)
    assert torch.equal(fast, reference)


def last_logits(engine: Engine, prompt: list[int]) -> torch.Tensor:
    seq = Sequence("probe", prompt, SamplingParams(max_tokens=1))
    engine.blocks.allocate(seq, len(seq))
    logits = engine.runner.run(Batch([Chunk(seq, 0, len(seq))], is_prefill=True))[0]
    engine.blocks.free(seq)
    return logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", ["quantize-on-load", "compressed-tensors", "fbgemm_fp8"])
def test_fp8_logits_match_bf16_of_the_dequantized_weights(dirs, fmt):
    fp8 = Engine.from_pretrained(dirs[0][fmt], dtype="fp8", num_kv_blocks=64, prefix_caching=False)
    bf16 = Engine.from_pretrained(dirs[1][fmt], dtype="bfloat16", num_kv_blocks=64, prefix_caching=False)
    fp32 = Engine.from_pretrained(dirs[1][fmt], dtype="float32", num_kv_blocks=64, prefix_caching=False)
    for prompt in prompts(128, [5, 23, 40], seed=3):
        exact = last_logits(fp32, prompt)
        noise = rel_err(last_logits(bf16, prompt), exact)  # how far bf16 rounding alone moves the logits
        assert rel_err(last_logits(fp8, prompt), last_logits(bf16, prompt)) <= 2 * noise
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    batch = prompts(128, [7, 19], seed=4)
    assert [o.token_ids for o in fp8.generate(batch, greedy)] == [o.token_ids for o in bf16.generate(batch, greedy)]


def test_fp8_checkpoint_must_be_served_as_fp8_and_other_quantization_is_refused(dirs, tmp_path):
    with pytest.raises(ModelFileError, match="dtype fp8"):
        plan_weights(dirs[0]["compressed-tensors"], "bfloat16")
    raw = {**CONFIGS["llama-7b"][0], "quantization_config": {"quant_method": "gptq", "bits": 4}}
    with pytest.raises(ModelFileError, match="quant_method 'gptq'"):
        config_from_dict(raw)
    assert os.path.isfile(os.path.join(dirs[0]["fbgemm_fp8"], "model.safetensors"))


def test_per_token_activation_quantization_is_what_the_gpu_gemm_computes_up_to_fp8_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    q, scale = quantize_rows(w)
    assert rel_err(q.float() * scale[:, None], w) < 0.04  # e4m3: 3 mantissa bits
    weight = Fp8Weight(q, scale)
    exact = emulated_linear(x, weight).float()
    assert rel_err(emulated_linear(x, weight, quantize_activations=True).float(), exact) < 0.06
    xq, sx = quantize_tokens(x.float() * 1e4, ub=10.0)  # fbgemm's activation_scale_ub bounds the scale
    assert float(sx.max()) <= 10.0 / 448 + 1e-9
