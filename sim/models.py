"""The models the simulator serves, sized by `modelinfo` exactly as a worker reserves them.

Each is the published config.json of a Llama-2 checkpoint (the paper's 7B, 13B and 70B) and the tensor-parallel
degree the paper serves it at, plus Llama-3.1-8B (128k-token context, 8 KV heads) for long-context traffic,
which Llama-2's 4096 positions cannot serve. Weight and KV byte counts come from `modelinfo.ModelConfig` in the
serving dtype, so the simulator, the spec check and the worker's memory pool agree on what a model costs;
calibration profiles (sim/profiles/*.json) hold hardware speeds only.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelinfo import ModelConfig, config_from_dict

SERVING_DTYPE = "bfloat16"  # or "fp8": about half the weight bytes, so twice the models fit WARM

_LLAMA2 = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False}  # fmt: skip
CONFIGS = {  # name -> (config.json fields, tensor-parallel degree)
    "llama-7b": (_LLAMA2 | {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 32}, 1),
    "llama-13b": (_LLAMA2 | {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                             "num_attention_heads": 40, "num_key_value_heads": 40}, 2),
    "llama-70b": (_LLAMA2 | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                             "num_attention_heads": 64, "num_key_value_heads": 8}, 4),
    "llama3-8b": ({"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 128256,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                   "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}, 1),
}  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """What the engine model and the memory accounting need of one model served at one TP degree."""

    name: str
    weight_bytes: int  # whole model in the serving dtype (FP8 projections + their scales under "fp8")
    kv_bytes_per_token: int  # K and V of one token, all layers, whole model
    layers: int
    params: int  # weight elements: prefill costs 2 FLOPs per parameter per token
    tp: int

    @property
    def shard_bytes(self) -> int:
        return -(-self.weight_bytes // self.tp)


def shape(name: str, cfg: ModelConfig, tp: int, dtype: str = SERVING_DTYPE) -> ModelShape:
    weights = cfg.weight_bytes(dtype)
    return ModelShape(
        name=name,
        weight_bytes=weights,
        kv_bytes_per_token=cfg.kv_bytes_per_token(dtype),
        layers=cfg.num_hidden_layers,
        params=cfg.num_params(),
        tp=tp,
    )


MODELS: dict[str, ModelShape] = {name: shape(name, config_from_dict(raw), tp) for name, (raw, tp) in CONFIGS.items()}
