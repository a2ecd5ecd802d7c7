"""A model's shape, read from a Hugging Face ``config.json``, and what it costs in memory.

One ``ModelConfig`` covers the Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3 differ only in a
few switches (qkv bias, q/k norm, rope scaling, tied embeddings), so one model implementation serves them all.
Its byte counts (weights and KV per token in a serving dtype) are what the memory pool reserves, so the spec
check, the warmer and the simulator size models exactly as the worker will.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


# Serving dtypes a function may name, and their bytes per weight element. "fp8" stores the seven projections of
# every layer as float8 e4m3 (1 byte) plus one float32 scale per output channel; embeddings, norms, biases and
# lm_head stay bfloat16, activations and the KV cache too.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
FP8 = "fp8"
FP8_ELEMENT = "float8_e4m3fn"  # the torch name of the projections' element type under "fp8"
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, FP8_ELEMENT: 1}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Checkpoint quantization formats we read: llm-compressor's float-quantized compressed-tensors and Meta's fbgemm.
FP8_FORMATS = ("compressed-tensors", "fbgemm_fp8")
ALIGN = 256  # every contiguous group of tensors starts at a multiple of this in the weight buffer


class ModelFileError(ValueError):
    """A model directory file is missing, broken or describes something we cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...] = field(default=())
    fp8_checkpoint: bool = False  # config.json has an FP8 quantization_config: serve it with dtype "fp8"
    fp8_skip: tuple[str, ...] = ()  # modules the checkpoint left unquantized (names, prefixes, or "re:" patterns)
    activation_scale_ub: float | None = None  # fbgemm: clamp on each token's activation amax before scaling

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one token across all layers, in the activation dtype (bfloat16 under "fp8")."""
        return 2 * self.num_hidden_layers * self.kv_size * ELEMENT_BYTES[activation_dtype(dtype)]

    def weight_bytes(self, dtype: str) -> int:
        """The model's weight buffer in the serving dtype, as the worker lays it out (aligned groups)."""
        offset = 0
        for group in required_tensors(self, dtype):
            offset = -(-offset // ALIGN) * ALIGN
            for name in group:
                offset += _numel(expected_shape(self, name)) * ELEMENT_BYTES[tensor_dtype(self, name, dtype)]
        return -(-offset // ALIGN) * ALIGN

    def num_params(self) -> int:
        """Weight elements (scales not counted): prefill costs 2 FLOPs per parameter per token."""
        return sum(_numel(expected_shape(self, n)) for group in required_tensors(self) for n in group)

    def fp8_skipped(self, module: str) -> bool:
        """True if the checkpoint left ``module`` (e.g. ``model.layers.0.mlp.down_proj``) unquantized."""
        for entry in self.fp8_skip:
            if entry.startswith("re:"):
                if re.match(entry[3:], module):
                    return True
            elif module == entry or module.startswith(entry + "."):
                return True
        return False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def activation_dtype(dtype: str) -> str:
    """The dtype of activations and of the KV cache when serving in ``dtype``."""
    dtype_bytes(dtype)
    return "bfloat16" if dtype == FP8 else dtype


def is_fp8_projection(cfg: ModelConfig, name: str) -> bool:
    """A projection weight that "fp8" stores as float8 (all of them unless the checkpoint skipped its group)."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or module.rpartition(".")[2] not in PROJECTIONS:
        return False
    return not any(cfg.fp8_skipped(m) for m in _fused_group(module))


def _fused_group(module: str) -> list[str]:
    """The modules one fused matmul runs with ``module`` (they must share one element type)."""
    parent, _, leaf = module.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return [f"{parent}.{x}_proj" for x in "qkv"]
    if leaf in ("gate_proj", "up_proj"):
        return [f"{parent}.gate_proj", f"{parent}.up_proj"]
    return [module]


def tensor_dtype(cfg: ModelConfig, name: str, dtype: str) -> str:
    """Element type of tensor ``name`` in the weight buffer of a model served in ``dtype``."""
    if dtype != FP8:
        dtype_bytes(dtype)
        return dtype
    if name.endswith(".weight_scale"):
        return "float32"
    return FP8_ELEMENT if is_fp8_projection(cfg, name) else "bfloat16"


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def required_tensors(cfg: ModelConfig, dtype: str = "bfloat16") -> list[list[str]]:
    """The tensors the engine needs, in buffer order, as groups that must be contiguous. Under "fp8" each FP8
    projection group is followed by its per-output-channel scales (``<module>.weight_scale``), fused alike."""
    groups: list[list[str]] = [["model.embed_tokens.weight"]]

    def projections(names: list[str]) -> None:
        groups.append(names)
        if dtype == FP8 and is_fp8_projection(cfg, names[0]):
            groups.append([n + "_scale" for n in names])

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        groups.append([p + "input_layernorm.weight"])
        projections([p + f"self_attn.{x}_proj.weight" for x in "qkv"])
        if cfg.attention_bias:
            groups.append([p + f"self_attn.{x}_proj.bias" for x in "qkv"])
        if cfg.qk_norm:
            groups += [[p + "self_attn.q_norm.weight"], [p + "self_attn.k_norm.weight"]]
        projections([p + "self_attn.o_proj.weight"])
        groups.append([p + "post_attention_layernorm.weight"])
        projections([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        projections([p + "mlp.down_proj.weight"])
    groups.append(["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        groups.append(["lm_head.weight"])
    return groups


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape config.json implies for one of the `required_tensors` (a scale: one per output channel)."""
    if name.endswith(".weight_scale"):
        return expected_shape(cfg, name.removesuffix("_scale"))[:1]
    h, d = cfg.hidden_size, cfg.head_dim
    table = {
        "embed_tokens.weight": (cfg.vocab_size, h),
        "lm_head.weight": (cfg.vocab_size, h),
        "q_proj.weight": (cfg.q_size, h),
        "k_proj.weight": (cfg.kv_size, h),
        "v_proj.weight": (cfg.kv_size, h),
        "q_proj.bias": (cfg.q_size,),
        "k_proj.bias": (cfg.kv_size,),
        "v_proj.bias": (cfg.kv_size,),
        "o_proj.weight": (h, cfg.q_size),
        "gate_proj.weight": (cfg.intermediate_size, h),
        "up_proj.weight": (cfg.intermediate_size, h),
        "down_proj.weight": (h, cfg.intermediate_size),
        "q_norm.weight": (d,),
        "k_norm.weight": (d,),
        "layernorm.weight": (h,),
        "norm.weight": (h,),
    }
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    raise KeyError(f"no expected shape for tensor {name!r}")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: file missing")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load_model_config(model_dir: str, builtin: bool = True) -> ModelConfig:
    """Parse ``config.json`` (and ``generation_config.json`` for eos ids, which wins when present).
    ``builtin=False`` reads the generic fields of any architecture (the transformers reference engine runs
    what the builtin engine cannot); the byte counts then describe a Llama-shaped model of the same size."""
    path = os.path.join(model_dir, "config.json")
    cfg = config_from_dict(_read_json(path), path, builtin)
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        gen_eos = _eos_ids(_read_json(gen_path).get("eos_token_id"))
        if gen_eos:
            cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": gen_eos})
    return cfg


def config_from_dict(raw: dict, path: str = "config.json", builtin: bool = True) -> ModelConfig:
    """A ``ModelConfig`` from the decoded ``config.json`` (the simulator builds its model shapes this way);
    ModelFileError naming the file and field for anything the builtin engine cannot run (unless not `builtin`)."""
    archs = raw.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if not archs and raw.get("model_type") in ARCHITECTURES.values():
        arch = raw["model_type"]  # configs saved from a bare *Config carry no architectures list
    if not builtin:
        arch = arch or str(raw.get("model_type") or (archs or ["unknown"])[0])
        raw = {**raw, "hidden_act": "silu", "rope_scaling": None, "rope_parameters": None}
    if arch is None:
        raise ModelFileError(
            f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelFileError(f"{path}: unsupported hidden_act {raw['hidden_act']!r} (only silu)")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        # transformers >= 5 writes rope_parameters; older files have rope_theta and rope_scaling.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ModelFileError(f"{path}: unsupported rope type {rope_type!r} (default or llama3)")
        cfg = ModelConfig(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=_max_positions(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            **_fp8_fields(raw.get("quantization_config"), path),
        )
    except KeyError as e:
        raise ModelFileError(f"{path}: field {e.args[0]!r} missing") from e
    except (TypeError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{path}: bad field value ({e})") from e
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ModelFileError(f"{path}: num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def _fp8_fields(quant: dict | None, path: str) -> dict:
    """ModelConfig fields for a checkpoint's ``quantization_config``: FP8 e4m3 weights with per-channel (or
    per-tensor) scales in one of `FP8_FORMATS`; ModelFileError for any other quantization."""
    if not quant:
        return {}
    method = quant.get("quant_method")
    if method not in FP8_FORMATS:
        raise ModelFileError(f"{path}: unsupported quantization_config.quant_method {method!r}; supported: FP8 as "
                             f"{' or '.join(FP8_FORMATS)}")  # fmt: skip
    if method == "fbgemm_fp8":
        ub = quant.get("activation_scale_ub")
        skip = tuple(quant.get("modules_to_not_convert") or ())
        return {"fp8_checkpoint": True, "fp8_skip": skip, "activation_scale_ub": float(ub) if ub else None}
    for name, group in (quant.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("channel", "tensor"):
            raise ModelFileError(
                f"{path}: quantization_config.config_groups.{name}.weights: only 8-bit float weights with channel "
                f"or tensor scales are supported, got {w}"
            )
    return {"fp8_checkpoint": True, "fp8_skip": tuple(quant.get("ignore") or ())}


def _max_positions(raw: dict) -> int:
    """Longest sequence we run exactly. Sliding-window attention is not implemented, so a model that uses it
    (Mistral v0.1: window 4096) is capped at its window, where full attention and sliding attention agree."""
    limit = int(raw.get("max_position_embeddings", 4096))
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", raw.get("model_type") == "mistral")
    if window and uses_window:
        limit = min(limit, int(window))
    return limit
