"""The layer classes the DiT is built from, injected as an ``operations`` namespace (``Linear``,
``LayerNorm``, ``Conv3d``), as ComfyUI's models take ``comfy.ops``.

``CastOps`` (the default) is ``torch.nn`` whose layers cast their weights to the input's dtype and device
when those differ, and do nothing else: a bfloat16 weight meets a float32 input where the official model
computes in float32 (``linear_proj``), and a float8 weight is computed in the input's dtype. In ComfyUI
the loader passes ``comfy.ops.manual_cast``, which does the same and also lets the ModelPatcher keep
layers in host memory ("lowvram") and patch them.

The layers the operations cannot express hold their parameters themselves and move them to the input's
device in ``forward`` (a no-op when the parameters are there already), so that a partially loaded model
works whatever was left on the offload device: the zero-centred norms, the RoPE bands and the null
caption (``magi1/network/dit.py``), and the official fp8 layers (``QuantizedFp8Linear`` below).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
QUANT_BLOCK_BYTES = 256 * 2 ** 20  # the official fp8 layers quantise their input in blocks of this much float32


def cast_to(tensor, like):
    """``tensor`` in ``like``'s dtype and on its device (itself when it is already)."""
    if tensor is None or (tensor.dtype == like.dtype and tensor.device == like.device):
        return tensor
    return tensor.to(device=like.device, dtype=like.dtype)


def on_device_of(tensor, like):
    """``tensor`` on ``like``'s device, dtype kept."""
    return tensor if tensor.device == like.device else tensor.to(like.device)


class CastOps:
    """``torch.nn`` layers that compute in the dtype of their input (weights cast when they differ) and
    skip weight initialisation (a built model is always loaded)."""

    class Linear(nn.Linear):
        def reset_parameters(self):
            return None

        def forward(self, x):
            return F.linear(x, cast_to(self.weight, x), cast_to(self.bias, x))

    class LayerNorm(nn.LayerNorm):
        def reset_parameters(self):
            return None

        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, cast_to(self.weight, x), cast_to(self.bias, x), self.eps)

    class Conv3d(nn.Conv3d):
        def reset_parameters(self):
            return None

        def forward(self, x):
            return self._conv_forward(x, cast_to(self.weight, x), cast_to(self.bias, x))


@functools.lru_cache(maxsize=None)  # one class per operations namespace
def scaled_fp8_linear(operations):
    """A Linear of ``operations`` holding a float8 weight with one float32 scale (``scale_weight``, the
    convention of ComfyUI's scaled-fp8 files): ``y = x W^T * scale``, the scale applied to the input
    (``(x * scale) W^T``), so the layer's own cast (and ComfyUI's partial loading) handles the weight."""

    class ScaledFp8Linear(operations.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale_weight = nn.Parameter(torch.ones((), device=self.weight.device), requires_grad=False)

        def forward(self, x):
            return super().forward(x * cast_to(self.scale_weight, x))

    return ScaledFp8Linear


class QuantizedFp8Linear(nn.Module):
    """A linear layer of the official ``*_distill_quant`` checkpoints: ``weight [1, out, in]`` float8, a
    per-tensor ``weight_scale [1]``, an ``input_scale`` (``[in]`` for the per-tensor kind, ``[1]`` for the
    per-channel kind) and, for the per-channel kind, a ``smooth_scale [1, in]``.

    The input is divided by ``input_scale`` (per-tensor kind) or ``smooth_scale`` (per-channel kind) in
    float32, clamped to the float8 range, rounded to bfloat16 and then to float8; the product of the float8
    operands is accumulated in float32 and multiplied by ``input_scale[0] * weight_scale[0]`` (the kernel
    reads one value per scale), then rounded to ``out_dtype`` (bfloat16 as released).
    """

    def __init__(self, in_features, out_features, *, per_channel, out_dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.per_channel = in_features, out_features, per_channel
        self.out_dtype = out_dtype
        f32 = dict(dtype=torch.float32, device=device)
        self.weight = nn.Parameter(torch.empty(1, out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(1, **f32), requires_grad=False)
        self.input_scale = nn.Parameter(torch.empty(1 if per_channel else in_features, **f32), requires_grad=False)
        if per_channel:
            self.smooth_scale = nn.Parameter(torch.empty(1, in_features, **f32), requires_grad=False)

    def quantize_input(self, x):
        """``x`` in float8 after the division by its scale, in row blocks of at most 256 MiB of float32 (as
        the official code does, so the float32 copy never spans the whole activation)."""
        divisor = on_device_of(self.smooth_scale if self.per_channel else self.input_scale, x).reshape(-1).float()
        flat = x.reshape(-1, self.in_features)
        out = torch.empty(flat.shape, dtype=FP8, device=x.device)
        rows = max(1, QUANT_BLOCK_BYTES // (4 * self.in_features))
        for start in range(0, flat.shape[0], rows):
            part = flat[start:start + rows].float() / divisor
            out[start:start + rows] = part.clamp(-FP8_MAX, FP8_MAX).to(torch.bfloat16).to(FP8)
        return out.view(x.shape)

    def forward(self, x):
        x_fp8 = self.quantize_input(x)
        weight = on_device_of(self.weight, x)[0]
        scale_a, scale_b = on_device_of(self.input_scale, x)[0], on_device_of(self.weight_scale, x)[0]
        return fp8_matmul(x_fp8, weight, scale_a, scale_b, self.out_dtype)


def fp8_matmul(x_fp8, weight_fp8, scale_a, scale_b, out_dtype):
    """``(x W^T) * scale_a * scale_b`` of float8 operands with a float32 accumulator, rounded to ``out_dtype``.

    On GPUs with float8 arithmetic (compute capability 8.9+) ``torch._scaled_mm`` runs it, as the official
    kernel does (its sizes must be multiples of 16, as the official checkpoints' are). Other CUDA GPUs
    multiply the operands cast to bfloat16 (exact: every float8 value is a bfloat16 one; float32
    accumulation, the product rounded to bfloat16 before the scales: one extra rounding); the CPU
    multiplies them in float32.
    """
    shape = x_fp8.shape
    x2 = x_fp8.reshape(-1, shape[-1]).contiguous()
    if x2.shape[0] == 0:  # no rows (a context-parallel rank without tokens in this call)
        return torch.empty(*shape[:-1], weight_fp8.shape[0], dtype=out_dtype, device=x2.device)
    if x2.is_cuda and fp8_arithmetic(x2.device) and x2.shape[1] % 16 == 0 and weight_fp8.shape[0] % 16 == 0:
        out = torch._scaled_mm(x2, weight_fp8.t(), scale_a=scale_a.float(), scale_b=scale_b.float(),
                               out_dtype=out_dtype)
    else:  # in row blocks, so that the float32 products never span the whole output
        compute = torch.bfloat16 if x2.is_cuda else torch.float32
        weight, scale = weight_fp8.to(compute).t(), scale_a * scale_b
        out = torch.empty(x2.shape[0], weight.shape[1], dtype=out_dtype, device=x2.device)
        rows = max(1, QUANT_BLOCK_BYTES // (4 * weight.shape[1]))
        for start in range(0, x2.shape[0], rows):
            out[start:start + rows] = ((x2[start:start + rows].to(compute) @ weight).float() * scale).to(out_dtype)
    return out.reshape(*shape[:-1], weight_fp8.shape[0])


@functools.lru_cache(maxsize=None)  # asked by every official fp8 layer call: once per device
def fp8_arithmetic(device):
    """Whether ``device`` multiplies float8 natively (NVIDIA Ada/Hopper and later)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:  # ROCm's float8 is another format (e4m3fnuz)
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
