"""Tiny random-weight Hugging Face models for the engine tests (built locally; nothing is downloaded)."""

from __future__ import annotations

import json
import os

import torch

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def build_model(path: str, arch: str = "llama", seed: int = 0, eos: list[int] | None = None, **overrides):
    """Save a random-weight model of ``arch`` to ``path``; returns the transformers model (float32, eval)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random init gives near-uniform logits; widen them so greedy choices are far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25 if "embed" in name or "lm_head" in name else 0.08)
            elif "norm" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    if eos is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": eos}, f)
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers greedy decoding with its KV cache, ignoring eos: the reference token stream."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(n):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def write_fp8_checkpoint(src: str, dst: str, fmt: str, skip: tuple[str, ...] = ()) -> None:
    """Rewrite the model in ``src`` as a published FP8 checkpoint in ``dst``: float8 e4m3 projection weights
    with per-output-channel ``weight_scale`` [N, 1], as llm-compressor writes them (``fmt`` "compressed-tensors":
    bf16 scales, ``ignore``) or as Meta's FP8 Llama releases do ("fbgemm_fp8": float32 scales,
    ``modules_to_not_convert``). Modules in ``skip`` stay as they were."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gpu_runtime.fp8 import quantize_rows

    shutil.copytree(src, dst)
    tensors = {}
    for name, t in load_file(os.path.join(src, "model.safetensors")).items():
        if not _is_projection(name) or name.removesuffix(".weight") in skip:
            tensors[name] = t
            continue
        q, scale = quantize_rows(t)
        tensors[name] = q
        tensors[name + "_scale"] = scale[:, None].to(torch.bfloat16 if fmt == "compressed-tensors" else torch.float32)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    if fmt == "compressed-tensors":
        scheme = {"num_bits": 8, "type": "float", "symmetric": True}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head", *skip],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": {**scheme, "strategy": "channel", "dynamic": False},
                "input_activations": {**scheme, "strategy": "token", "dynamic": True},
            }},
        }  # fmt: skip
    else:
        config["quantization_config"] = {
            "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head", *skip],
        }  # fmt: skip
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


def write_dequantized(fp8_dir: str, dst: str) -> None:
    """The FP8 checkpoint in ``fp8_dir`` with every weight dequantized (weight x scale) to float32, no
    quantization_config: the reference its FP8 run must match."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(fp8_dir, dst)
    src = load_file(os.path.join(fp8_dir, "model.safetensors"))
    tensors = {}
    for name, t in src.items():
        if name.endswith("_scale"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = t.float() * src[name + "_scale"].float()
        tensors[name] = t.float()
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
