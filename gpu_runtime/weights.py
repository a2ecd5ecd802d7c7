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

import os
from dataclasses import dataclass

import torch

from modelinfo.checkpoint import Slot, plan_layout
from modelinfo.config import ModelFileError, load_model_config

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


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


def plan_weights(model_dir: str, dtype: torch.dtype) -> WeightLayout:
    """Lay out every needed checkpoint tensor in one buffer of ``dtype``; reads only headers."""
    model_dir = os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        raise ModelFileError(f"{model_dir}: model directory missing")
    slots, total = plan_layout(model_dir, load_model_config(model_dir), str(dtype).removeprefix("torch."))
    return WeightLayout(model_dir=model_dir, dtype=dtype, total_bytes=total, slots=slots)


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
