"""The offline demo model: a tiny random-weight Llama with a locally trained tokenizer.

`warmserve up` must serve on a fresh machine with nothing downloaded at run time, so it builds this model once in
the cache directory. Its weights are random: the text it writes is meaningless, but every byte of the serving path
(safetensors, tokenizer.json, chat template, eos ids) is the real format.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Enough varied English for a byte-level BPE to learn a few hundred merges.
CORPUS = [
    "WarmServe keeps model weights warm in GPU memory so the first token arrives without a cold start.",
    "A serverless function scales to zero when idle and back up when requests arrive.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Hello, how are you today? I am fine, thank you. What would you like to know?",
    "Large language models predict the next token given the tokens that came before.",
    "The gateway speaks the OpenAI API; the invoker routes requests through Redis streams.",
    "Numbers like 1, 2, 3, 42 and 2026 appear in text, and so do symbols: #, @, %, &.",
]


def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return tok


def llama_config(vocab_size: int, bos: int, eos: int, **overrides: object) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": vocab_size,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    } | overrides


def random_llama_weights(cfg: dict, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random weights of a Llama config; on `device` (a GPU draws billions of them in moments)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device) * 0.05

    w = {
        "model.embed_tokens.weight": rand(v, h),
        "model.norm.weight": torch.ones(h, device=device),
        "lm_head.weight": rand(v, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": rand(q_out, h),
            p + "self_attn.k_proj.weight": rand(kv_out, h),
            p + "self_attn.v_proj.weight": rand(kv_out, h),
            p + "self_attn.o_proj.weight": rand(h, q_out),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h, device=device),
            p + "post_attention_layernorm.weight": torch.ones(h, device=device),
        }
    return w


def build_tiny_llama(out_dir: Path, seed: int = 0, device: str = "cpu", **config_overrides: object) -> Path:
    """Write a complete Hugging Face model directory to `out_dir` (atomically: a half-written dir never appears)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("building the offline demo model (random weights, meaningless text) in %s", out_dir)
    tok = train_tokenizer()
    tok.save(str(tmp / "tokenizer.json"))
    bos, eos, end = tok.token_to_id("<s>"), tok.token_to_id("</s>"), tok.token_to_id("<|end|>")
    cfg = llama_config(tok.get_vocab_size(), bos, eos, **config_overrides)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": [eos, end], "do_sample": False})
    )
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (tmp / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    dtype = getattr(torch, str(cfg["torch_dtype"]))
    weights = {k: v.to(dtype).cpu() for k, v in random_llama_weights(cfg, seed, device).items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
