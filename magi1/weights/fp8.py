"""Float8 DiT weights: which kind a checkpoint stores, and storing a high-precision checkpoint in float8.

Three kinds (``magi1.network.dit.LayerFactory``):

- ``fp8_e4m3fn``: the transformer layers' large weights in float8 e4m3, no scale (values beyond +-448
  saturate; MAGI-1's weights are far below);
- ``fp8_e4m3fn_scaled``: the same with one float32 ``scale_weight`` per weight, ``W = W8 * scale``, the
  scale chosen so that the largest magnitude maps to 448 (ComfyUI's scaled-fp8 files; their
  ``scaled_fp8`` marker tensor is ignored);
- ``fp8_official``: the official ``*_distill_quant`` checkpoints (``weight_scale`` / ``input_scale`` /
  ``smooth_scale``, ``[1, out, in]`` weights in layers 1 .. L-2).
"""

from __future__ import annotations

import math

import torch

from ..network.ops import FP8, FP8_MAX

KINDS = ("fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official")
SCALED_MARKER = "scaled_fp8"  # ComfyUI's scaled-fp8 files hold this empty tensor


def stored_kind(shapes, dtypes):
    """The float8 kind a checkpoint's tensors show (``None`` for a high-precision checkpoint); a clear
    error for a float8 layout none of the kinds is."""
    if any(k.endswith(".smooth_scale") for k in shapes):  # only the official layout has smoothing scales
        return "fp8_official"
    if not any(d.startswith("F8") for k, d in dtypes.items() if k != SCALED_MARKER):
        return None
    if any(k.endswith((".weight_scale", ".input_scale", ".comfy_quant")) for k in shapes):
        raise ValueError("this checkpoint stores float8 weights in a layout the pack does not read (per-layer "
                         "weight_scale/comfy_quant tensors, as ComfyUI's newer quantised files do): load the "
                         "bfloat16 checkpoint and pick weight_dtype fp8_e4m3fn_scaled, or the official "
                         "*_distill_quant checkpoint")
    return "fp8_e4m3fn_scaled" if any(k.endswith(".scale_weight") for k in shapes) else "fp8_e4m3fn"


def ignored_keys(shapes):
    """Keys of a ComfyUI scaled-fp8 file the model does not hold: its marker, and the input scales its
    float8 matrix products may use (the weights are computed in high precision here)."""
    return {k for k in shapes if k == SCALED_MARKER or k.endswith(".scale_input")}


def model_shapes(shapes):
    """The shapes as the model holds them: ignored keys dropped, one-element weight scales as scalars."""
    return {k: (() if k.endswith(".scale_weight") and math.prod(v) == 1 else v)
            for k, v in shapes.items() if k not in ignored_keys(shapes)}


def to_fp8(weight, scaled):
    """``(float8 weight, float32 scale or None)`` of a high-precision weight."""
    weight = weight.float()
    scale = None
    if scaled:
        amax = weight.abs().max()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        weight = weight / scale
    return weight.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def converter(targets, kind):
    """``convert(key, tensor) -> {key: tensor}`` storing a high-precision checkpoint's tensors as the
    model built for ``kind`` holds them (``targets``: the model's ``state_dict(keep_vars=True)``)."""
    scaled = kind == "fp8_e4m3fn_scaled"

    def convert(key, tensor):
        target = targets[key]
        if target.dtype != FP8 or tensor.dtype == FP8:
            return {key: tensor.to(target.dtype).reshape(target.shape)}
        weight, scale = to_fp8(tensor, scaled)
        out = {key: weight}
        if scaled:
            out[key[: -len("weight")] + "scale_weight"] = scale
        return out

    return convert


def nbytes_by_dtype(model):
    """Bytes of a model's parameters and buffers per dtype name, e.g. ``{"float8_e4m3fn": ..}``."""
    totals = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        name = str(tensor.dtype).replace("torch.", "")
        totals[name] = totals.get(name, 0) + tensor.numel() * tensor.element_size()
    return totals


def official_layout(model, values):
    """``values`` (by parameter name, of the same model in high precision) in the layout of ``model``, built
    for ``fp8_official``: each quantised layer's weight in float8 ``[1, out, in]`` with ``weight_scale =
    max|W| / 448`` and input and smoothing scales of 1. No calibration: for benchmarks and tests with
    random weights, not a way to make official-quality fp8 checkpoints."""
    from ..network.ops import QuantizedFp8Linear

    params = dict(model.named_parameters())
    out = {k: v.to(params[k].dtype) for k, v in values.items() if k in params and v.shape == params[k].shape}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedFp8Linear):
            weight, scale = to_fp8(values[name + ".weight"], scaled=True)
            device = weight.device
            out[name + ".weight"] = weight[None]
            out[name + ".weight_scale"] = scale.reshape(1)
            out[name + ".input_scale"] = torch.ones(module.input_scale.shape, device=device)
            if module.per_channel:
                out[name + ".smooth_scale"] = torch.ones(module.smooth_scale.shape, device=device)
    return out
