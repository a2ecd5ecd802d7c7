"""The Llama-family forward pass over weight views (no nn.Module, no copies).

Every weight is a view of the model's single weight buffer (see ``gpu_runtime.weights``); q/k/v and gate/up
are fused views, so a layer is five matmuls. Under "fp8" a projection is an ``Fp8Weight`` (the float8 view and
its per-channel scales, fused alike) and ``ops.linear`` picks the FP8 path. Numerics follow transformers
(RMSNorm in float32, rotary tables in float32 cast to the activation dtype) so CPU float32 output is
token-identical to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_runtime.engine.attention import AttnMeta, decode_attention, prefill_attention
from gpu_runtime.engine.ops import add_rms_norm, linear, qkv_rope_store, silu_and_mul
from gpu_runtime.fp8 import FP8, Fp8Weight
from gpu_runtime.weights import WeightLayout
from modelinfo.config import ModelConfig

Projection = torch.Tensor | Fp8Weight


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Projection
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Projection
    post_norm: torch.Tensor
    gate_up: Projection
    down: Projection


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3 long-context scaling when configured (as transformers does)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, layout: WeightLayout, weights: torch.Tensor) -> None:
        self.cfg = cfg
        w = lambda name: layout.view(weights, name)  # noqa: E731

        def proj(names: list[str]) -> Projection:
            weight = layout.fused(weights, names)
            if weight.dtype != FP8:
                return weight
            scale = layout.fused(weights, [n + "_scale" for n in names])
            return Fp8Weight(weight, scale, cfg.activation_scale_ub)

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else w("lm_head.weight")
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(
                LayerWeights(
                    input_norm=w(p + "input_layernorm.weight"),
                    qkv=proj([a + f"{x}_proj.weight" for x in "qkv"]),
                    qkv_bias=layout.fused(weights, [a + f"{x}_proj.bias" for x in "qkv"])
                    if cfg.attention_bias
                    else None,
                    q_norm=w(a + "q_norm.weight") if cfg.qk_norm else None,
                    k_norm=w(a + "k_norm.weight") if cfg.qk_norm else None,
                    o=proj([a + "o_proj.weight"]),
                    post_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=proj([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                    down=proj([p + "mlp.down_proj.weight"]),
                )
            )
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings).float(), inv_frequencies(cfg))
        emb = torch.cat((freqs, freqs), dim=-1).to(weights.device)
        self.cos = emb.cos().to(layout.activation_dtype)
        self.sin = emb.sin().to(layout.activation_dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttnMeta,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm for flattened tokens ``input_ids`` [T]."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h = F.embedding(input_ids, self.embed)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x, residual = add_rms_norm(h, residual, layer.input_norm, eps)
            qkv = linear(x, layer.qkv, layer.qkv_bias)
            qk_norm = (layer.q_norm, layer.k_norm) if cfg.qk_norm else None
            q, k, v = qkv_rope_store(qkv, positions, self.cos, self.sin, heads, qk_norm, eps, k_cache, v_cache, meta)
            if meta.is_prefill:
                o = prefill_attention(q, k, v, k_cache, v_cache, meta)
            else:
                o = decode_attention(q, k_cache, v_cache, meta)
            h = linear(o.flatten(1), layer.o)
            x, residual = add_rms_norm(h, residual, layer.post_norm, eps)
            h = linear(silu_and_mul(linear(x, layer.gate_up)), layer.down)
        return add_rms_norm(h, residual, self.norm, eps)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
