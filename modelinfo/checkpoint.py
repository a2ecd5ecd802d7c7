"""Where each tensor of a safetensors checkpoint is, read from the file headers alone (no torch).

`plan_layout` lays the tensors the engine needs into one weight buffer of the serving dtype; the GPU runtime
turns it into typed views, the warmer and the spec check only need its size (which equals
`ModelConfig.weight_bytes`: the plan checks every shape against config.json).

Under "fp8" a projection is either read as stored (an FP8 checkpoint: float8 weights and their ``weight_scale``)
or quantized by the loader from a bf16/fp32 weight, which then also writes the scale slot (``src_dtype`` "").
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from modelinfo.config import (
    ALIGN,
    ELEMENT_BYTES,
    FP8_ELEMENT,
    ModelConfig,
    ModelFileError,
    expected_shape,
    required_tensors,
    tensor_dtype,
)

SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}  # checkpoint dtypes we convert from
FP8_SOURCE = "F8_E4M3"
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class Slot:
    """One checkpoint tensor's place in the model's single weight buffer."""

    name: str  # tensor name in the checkpoint
    file: str  # absolute path of its .safetensors file
    file_offset: int  # absolute byte offset of its data in that file (8 + header_len + data_offsets[0])
    src_nbytes: int  # bytes in the file
    src_dtype: str  # safetensors dtype string, e.g. "BF16", "F32"; "" for a scale the loader computes
    shape: tuple[int, ...]
    offset: int  # byte offset in the model's weight buffer (in the serving dtype)
    nbytes: int  # bytes in the buffer (serving dtype)
    dtype: str = "float32"  # element type in the buffer (torch name): the serving dtype, or per tensor under fp8


def read_header(path: str) -> tuple[int, dict]:
    """(data start offset, header dict) of one safetensors file, with sizes checked against the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: truncated file (no safetensors header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
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


def checkpoint_files(model_dir: str) -> list[str]:
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


def plan_layout(model_dir: str, cfg: ModelConfig, dtype: str) -> tuple[tuple[Slot, ...], int]:
    """(slots, total bytes) of the weight buffer in `dtype`; ModelFileError naming the file and tensor for
    anything missing, truncated or shaped unlike config.json says."""
    found: dict[str, tuple[str, int, dict]] = {}
    for path in checkpoint_files(model_dir):
        data_start, header = read_header(path)
        for name, info in header.items():
            found[name] = (path, data_start, info)
    slots: list[Slot] = []
    offset = 0
    for group in required_tensors(cfg, dtype):
        offset = -(-offset // ALIGN) * ALIGN
        for name in group:
            element = tensor_dtype(cfg, name, dtype)
            shape = expected_shape(cfg, name)
            nbytes = _numel(shape) * ELEMENT_BYTES[element]
            if name.endswith(".weight_scale") and _quantized_on_load(found, name):
                slots.append(Slot(name, "", 0, 0, "", shape, offset, nbytes, element))
            else:
                slots.append(_source_slot(model_dir, found, name, shape, element, offset, nbytes))
            offset += nbytes
    return tuple(slots), -(-offset // ALIGN) * ALIGN


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _quantized_on_load(found: dict, scale_name: str) -> bool:
    """A scale slot is computed by the loader when its weight is stored unquantized (e.g. bf16)."""
    weight = found.get(scale_name.removesuffix("_scale"))
    return weight is not None and weight[2]["dtype"] != FP8_SOURCE


def _source_slot(model_dir: str, found: dict, name: str, want: tuple, element: str, offset: int, nbytes: int) -> Slot:
    if name not in found:
        raise ModelFileError(f"{model_dir}: tensor {name!r} missing from the safetensors files")
    path, data_start, info = found[name]
    shape = tuple(int(x) for x in info["shape"])
    src = info["dtype"]
    if src not in SAFETENSORS_BYTES:
        raise ModelFileError(f"{path}: tensor {name!r} has unsupported dtype {src}")
    if src == FP8_SOURCE and element != FP8_ELEMENT:
        raise ModelFileError(f"{path}: tensor {name!r} is FP8 (an FP8 checkpoint): deploy it with dtype fp8")
    if name.endswith(".weight_scale"):
        if _numel(shape) not in (want[0], 1):  # per output channel ([N] or [N, 1]) or per tensor
            raise ModelFileError(f"{path}: tensor {name!r} has shape {shape}, want one scale per row of {want[0]}")
    elif shape != want:
        raise ModelFileError(f"{path}: tensor {name!r} has shape {shape}, config.json implies {want}")
    begin, end = info["data_offsets"]
    if end - begin != _numel(shape) * SAFETENSORS_BYTES[src]:
        raise ModelFileError(f"{path}: tensor {name!r} byte range does not match its shape")
    return Slot(name, path, data_start + begin, end - begin, src, want, offset, nbytes, element)
