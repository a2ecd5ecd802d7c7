"""Weight layout contract: where every checkpoint tensor lives in a model's single weight buffer.

A model's weights occupy ONE flat byte buffer (from an ``Allocator``: plain torch memory or the worker's
pool). ``plan_weights`` reads only safetensors headers and decides each tensor's byte range in that buffer, so
a loader (the reference ``load_weights`` here, or the fast pinned/chunked loader) can fill the
buffer without knowing anything about the model, and the engine can take typed views of it without copying.

Slots are ordered so that q/k/v (weights, and biases) and gate/up sit back to back: the engine runs one fused
QKV matmul and one fused gate-up matmul on ``layout.fused(...)`` views, with no copy. Each group starts on a
256-byte boundary.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

import torch

from gpu_runtime.engine.config import ModelConfig, ModelFileError, load_model_config

ALIGN = 256

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

# Buffers that some old checkpoints carry but the engine recomputes.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor's place in the model's single weight buffer."""

    name: str  # tensor name in the checkpoint
    file: str  # absolute path of its .safetensors file
    file_offset: int  # absolute byte offset of its data in that file (8 + header_len + data_offsets[0])
    src_nbytes: int  # bytes in the file
    src_dtype: str  # safetensors dtype string, e.g. "BF16", "F32"
    shape: tuple[int, ...]
    offset: int  # byte offset in the model's weight buffer (in the TARGET dtype)
    nbytes: int  # bytes in the buffer (target dtype)


@dataclass(frozen=True)
class WeightLayout:
    model_dir: str
    dtype: torch.dtype
    total_bytes: int
    slots: tuple[Slot, ...]

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(f"{self.model_dir}: no tensor {name!r} in the weight layout")

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.slots)

    def view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        """Typed view of one tensor inside ``buffer`` (a flat uint8 tensor); no copy."""
        s = self.slot(name)
        return buffer[s.offset : s.offset + s.nbytes].view(self.dtype).view(s.shape)

    def fused(self, buffer: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Adjacent slots as one view concatenated along dim 0 (fused QKV / gate-up); no copy."""
        slots = [self.slot(n) for n in names]
        for a, b in zip(slots, slots[1:], strict=False):
            if a.offset + a.nbytes != b.offset or a.shape[1:] != b.shape[1:]:
                raise ValueError(f"{self.model_dir}: {a.name} and {b.name} are not adjacent in the layout")
        start, end = slots[0].offset, slots[-1].offset + slots[-1].nbytes
        return buffer[start:end].view(self.dtype).view(-1, *slots[0].shape[1:])


def _read_header(path: str) -> tuple[int, dict]:
    """(data start offset, header dict) of one safetensors file, with sizes checked against the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: truncated file (no safetensors header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100 * 1024 * 1024:
                raise ModelFileError(f"{path}: truncated file or bad header length {header_len}")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: safetensors header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, info in header.items():
        end = info["data_offsets"][1]
        if data_start + end > size:
            raise ModelFileError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {size}"
            )
    return data_start, header


def _checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFileError(f"{index}: not a valid safetensors index ({e!r})") from e
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise ModelFileError(f"{index}: shard {name!r} listed but missing")
        return [os.path.join(model_dir, n) for n in files]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ModelFileError(f"{model_dir}: no *.safetensors files (and no model.safetensors.index.json)")
    return [os.path.join(model_dir, n) for n in files]


def required_tensors(cfg: ModelConfig) -> list[list[str]]:
    """The tensors the engine needs, in buffer order, as groups that must be contiguous."""
    groups: list[list[str]] = [["model.embed_tokens.weight"]]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        groups.append([p + "input_layernorm.weight"])
        groups.append([p + f"self_attn.{x}_proj.weight" for x in "qkv"])
        if cfg.attention_bias:
            groups.append([p + f"self_attn.{x}_proj.bias" for x in "qkv"])
        if cfg.qk_norm:
            groups += [[p + "self_attn.q_norm.weight"], [p + "self_attn.k_norm.weight"]]
        groups.append([p + "self_attn.o_proj.weight"])
        groups.append([p + "post_attention_layernorm.weight"])
        groups.append([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        groups.append([p + "mlp.down_proj.weight"])
    groups.append(["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        groups.append(["lm_head.weight"])
    return groups


def _expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
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
    return None


def plan_weights(model_dir: str, dtype: torch.dtype) -> WeightLayout:
    """Lay out every needed checkpoint tensor in one buffer of ``dtype``; reads only headers."""
    model_dir = os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ModelFileError(f"{model_dir}: model directory missing")
    cfg = load_model_config(model_dir)
    found: dict[str, tuple[str, int, dict]] = {}
    for path in _checkpoint_files(model_dir):
        data_start, header = _read_header(path)
        for name, info in header.items():
            found[name] = (path, data_start, info)
    elem = torch.empty((), dtype=dtype).element_size()
    slots: list[Slot] = []
    offset = 0
    for group in required_tensors(cfg):
        offset = -(-offset // ALIGN) * ALIGN
        for name in group:
            if name not in found:
                raise ModelFileError(f"{model_dir}: tensor {name!r} missing from the safetensors files")
            path, data_start, info = found[name]
            shape = tuple(int(x) for x in info["shape"])
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ModelFileError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            want = _expected_shape(cfg, name)
            if want is not None and shape != want:
                raise ModelFileError(f"{path}: tensor {name!r} has shape {shape}, config.json implies {want}")
            begin, end = info["data_offsets"]
            n = 1
            for x in shape:
                n *= x
            src_elem = torch.empty((), dtype=SAFETENSORS_DTYPES[info["dtype"]]).element_size()
            if end - begin != n * src_elem:
                raise ModelFileError(f"{path}: tensor {name!r} byte range does not match its shape")
            slot = Slot(name, path, data_start + begin, end - begin, info["dtype"], shape, offset, n * elem)
            slots.append(slot)
            offset += n * elem
    total = -(-offset // ALIGN) * ALIGN
    return WeightLayout(model_dir=model_dir, dtype=dtype, total_bytes=total, slots=tuple(slots))


def load_weights(layout: WeightLayout, buffer: torch.Tensor) -> None:
    """Reference loader: read each slot from its file, convert to the layout dtype, copy into ``buffer``."""
    if buffer.dtype != torch.uint8 or buffer.numel() < layout.total_bytes:
        raise ValueError(f"weight buffer must be uint8 with >= {layout.total_bytes} bytes")
    handles: dict[str, object] = {}
    try:
        for s in layout.slots:
            f = handles.get(s.file) or handles.setdefault(s.file, open(s.file, "rb"))  # noqa: SIM115
            f.seek(s.file_offset)
            data = bytearray(f.read(s.src_nbytes))
            if len(data) != s.src_nbytes:
                raise ModelFileError(f"{s.file}: truncated file while reading {s.name!r}")
            src = torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[s.src_dtype]).view(s.shape)
            layout.view(buffer, s.name).copy_(src)
    finally:
        for f in handles.values():
            f.close()
