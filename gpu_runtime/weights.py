"""Weight layout contract: where every checkpoint tensor lives in a model's single weight buffer.

A model's weights occupy ONE flat byte buffer (from an ``Allocator``: plain torch memory or the worker's
pool). ``plan_weights`` reads only safetensors headers and decides each tensor's byte range in that buffer, so
a loader (the reference ``load_weights`` here, or the fast pinned/chunked loader) can fill the
buffer without knowing anything about the model, and the engine can take typed views of it without copying.

Slots are ordered so that q/k/v (weights, and biases) and gate/up sit back to back: the engine runs one fused
QKV matmul and one fused gate-up matmul on ``layout.fused(...)`` views, with no copy. Each group starts on a
256-byte boundary.

Under "fp8" slots have their own element types (float8 projections, float32 scales, bf16 for the rest);
``convert`` turns one slot's file bytes into buffer bytes (casting, or quantizing a bf16 projection and writing
its computed scale), shared by both loaders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gpu_runtime.fp8 import quantize_rows
from modelinfo.checkpoint import Slot, plan_layout
from modelinfo.config import DTYPE_BYTES, FP8_ELEMENT, ModelFileError, load_model_config

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
}
# The serving dtypes (modelinfo.DTYPE_BYTES names them) as torch dtypes; "fp8" names the projections' type.
SERVING_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8": torch.float8_e4m3fn,
}
assert set(SERVING_DTYPES) == set(DTYPE_BYTES)
_SERVING_NAMES = {v: k for k, v in SERVING_DTYPES.items()}


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

    @property
    def is_fp8(self) -> bool:
        return self.dtype == SERVING_DTYPES["fp8"]

    @property
    def activation_dtype(self) -> torch.dtype:
        """Activations and KV cache: bfloat16 under fp8, the serving dtype otherwise."""
        return torch.bfloat16 if self.is_fp8 else self.dtype

    def view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        """Typed view of one tensor inside ``buffer`` (a flat uint8 tensor); no copy."""
        s = self.slot(name)
        return buffer[s.offset : s.offset + s.nbytes].view(getattr(torch, s.dtype)).view(s.shape)

    def fused(self, buffer: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Adjacent slots as one view concatenated along dim 0 (fused QKV / gate-up); no copy."""
        slots = [self.slot(n) for n in names]
        for a, b in zip(slots, slots[1:], strict=False):
            if a.offset + a.nbytes != b.offset or a.shape[1:] != b.shape[1:]:
                raise ValueError(f"{self.model_dir}: {a.name} and {b.name} are not adjacent in the layout")
        start, end = slots[0].offset, slots[-1].offset + slots[-1].nbytes
        return buffer[start:end].view(getattr(torch, slots[0].dtype)).view(-1, *slots[0].shape[1:])

    def needs_conversion(self, s: Slot) -> bool:
        """The file bytes of ``s`` are not its buffer bytes (cast, quantize, or a broadcast scale)."""
        return SAFETENSORS_DTYPES[s.src_dtype] != getattr(torch, s.dtype) or s.src_nbytes != s.nbytes

    def convert(self, s: Slot, raw: bytearray) -> list[tuple[Slot, torch.Tensor]]:
        """The buffer bytes (flat uint8) of slot ``s`` from its file bytes ``raw``, and of the scale slot a
        quantized projection also fills."""
        src = torch.frombuffer(raw, dtype=SAFETENSORS_DTYPES[s.src_dtype])
        if s.dtype == FP8_ELEMENT and s.src_dtype != "F8_E4M3":
            q, scale = quantize_rows(src.view(s.shape))
            return [(s, q.view(torch.uint8).flatten()), (self.slot(s.name + "_scale"), scale.view(torch.uint8))]
        out = src.to(getattr(torch, s.dtype)).expand(s.shape[0]) if src.numel() == 1 else src
        return [(s, out.to(getattr(torch, s.dtype)).contiguous().view(torch.uint8).flatten())]


def plan_weights(model_dir: str, dtype: torch.dtype | str) -> WeightLayout:
    """Lay out every needed checkpoint tensor in one buffer of ``dtype`` (a serving dtype: a name of
    ``SERVING_DTYPES`` or its torch dtype); reads only headers."""
    model_dir = os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ModelFileError(f"{model_dir}: model directory missing")
    name = dtype if isinstance(dtype, str) else _SERVING_NAMES[dtype]
    slots, total = plan_layout(model_dir, load_model_config(model_dir), name)
    return WeightLayout(model_dir=model_dir, dtype=SERVING_DTYPES[name], total_bytes=total, slots=slots)


def load_weights(layout: WeightLayout, buffer: torch.Tensor) -> None:
    """Reference loader: read each slot from its file, convert to the layout dtype, copy into ``buffer``."""
    if buffer.dtype != torch.uint8 or buffer.numel() < layout.total_bytes:
        raise ValueError(f"weight buffer must be uint8 with >= {layout.total_bytes} bytes")
    handles: dict[str, object] = {}
    try:
        for s in layout.slots:
            if not s.src_dtype:
                continue  # a computed scale: its weight's conversion writes it
            f = handles.get(s.file) or handles.setdefault(s.file, open(s.file, "rb"))  # noqa: SIM115
            f.seek(s.file_offset)
            data = bytearray(f.read(s.src_nbytes))
            if len(data) != s.src_nbytes:
                raise ModelFileError(f"{s.file}: truncated file while reading {s.name!r}")
            for slot, flat in layout.convert(s, data):
                buffer[slot.offset : slot.offset + slot.nbytes].copy_(flat)
    finally:
        for f in handles.values():
            f.close()
