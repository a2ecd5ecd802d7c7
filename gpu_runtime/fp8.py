"""FP8 (e4m3) linear layers: per-output-channel weight scales, dynamic per-token activation scales.

A weight ``W`` [N, K] is stored as ``Wq`` float8 e4m3 with ``scale`` [N] float32, ``W ~= Wq * scale[:, None]``.
On Hopper-class GPUs a projection quantizes its input per token (``x ~= xq * sx[:, None]``, scale from the
row's absolute max) and runs one FP8 GEMM, ``torch._scaled_mm``, that applies both scales in its epilogue. At one
row (batch-1 decode) the Triton GEMV reads the FP8 weight and applies its scale instead, with the activation left
in bfloat16: decode is bound by the weight bytes, not by the multiply. Everywhere else (CPU, CI) the weight is
dequantized exactly (``Wq.float() * scale``) and multiplied in float32: the model then computes what a bf16 model
with the dequantized weights would, which is what the CPU tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row still gets a finite scale


@dataclass
class Fp8Weight:
    weight: torch.Tensor  # [N, K] float8_e4m3fn, row-major (a view of the weight buffer)
    scale: torch.Tensor  # [N] float32: one scale per output channel
    activation_ub: float | None = None  # fbgemm checkpoints: clamp a token's absmax before scaling

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization of ``w`` [N, K] -> (float8 [N, K], float32 scales [N]); the loader's path for a
    bf16/fp32 checkpoint served as "fp8"."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_tokens(x: torch.Tensor, ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of activations ``x`` [T, K] -> (float8 [T, K], float32 scales [T, 1])."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    if ub is not None:
        amax = amax.clamp(max=ub)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm_supported(device: torch.device) -> bool:
    """Row-wise scaled FP8 GEMMs need compute capability 9.0 (Hopper) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [T, K] (bf16) @ W^T -> [T, N] in x's dtype; see the module docstring for the paths."""
    if scaled_mm_supported(x.device):
        xq, sx = quantize_tokens(x, w.activation_ub)
        # mat2 must be column-major: the row-major [N, K] weight transposed is exactly that, no copy.
        out = torch._scaled_mm(xq, w.weight.t(), scale_a=sx, scale_b=w.scale[None, :], out_dtype=x.dtype)
        return out + bias if bias is not None else out
    return emulated_linear(x, w, bias, quantize_activations=False)


def emulated_linear(
    x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None, quantize_activations: bool = False
) -> torch.Tensor:
    """The dequantizing reference: exact products of the dequantized FP8 values, accumulated in float32. With
    ``quantize_activations`` it also rounds ``x`` per token as the GPU GEMM does (what ``_scaled_mm`` computes,
    up to accumulation order)."""
    if quantize_activations:
        xq, sx = quantize_tokens(x, w.activation_ub)
        xf = xq.float() * sx
    else:
        xf = x.float()
    return F.linear(xf, w.dequantize(), None if bias is None else bias.float()).to(x.dtype)
