"""Per-token importance weights of one chunk: motion, detail, and their combination.

A chunk's latent is ``[C, T, H, W]``; a token covers a ``patch = (ph, pw)`` block of one latent frame,
so every weight map here has shape ``[T, H // ph, W // pw]``. A high weight makes a token's reuse
accumulator grow faster, so the token is recomputed more often.

The public functions validate their inputs (including a finiteness check, which costs one host sync);
the sampler's per-step path calls the ``_unchecked`` variants after validating shapes once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_number

COMBINE_MODES = ("max", "product", "blend")

# A frame counts as constant (all weights 1) when its spread is within float32 round-off: below
# CONSTANT_FRAME_RTOL of its largest value, plus a noise floor tied to the latent's own scale (a change
# or a local standard deviation below NOISE_FLOOR of the largest latent magnitude is not signal).
CONSTANT_FRAME_RTOL = 1e-5
NOISE_FLOOR = 1e-6


def motion_weights(latent, prev_frame=None, *, patch=(2, 2), floor=0.6, power=1.0):
    """Weights from the mean absolute change of each latent pixel against the previous latent frame.

    ``prev_frame`` (``[C, H, W]``) is the frame before ``latent[:, 0]``, normally the last latent frame
    of the previous chunk; without it frame 0 gets weight 1 everywhere.
    """
    ph, pw = _check_latent(latent, patch)
    _check_unit_interval("floor", floor)
    check_number("power", power, low=0.0, low_open=True)
    if prev_frame is not None:
        if not isinstance(prev_frame, torch.Tensor) or prev_frame.dim() != 3:
            raise ValueError(
                "prev_frame must be a tensor of shape [C, H, W] (the last latent frame of the previous chunk), "
                f"got {_describe(prev_frame)}"
            )
        expected = (latent.shape[0], latent.shape[2], latent.shape[3])
        if tuple(prev_frame.shape) != expected:
            raise ValueError(f"prev_frame shape {tuple(prev_frame.shape)} does not match the latent's [C, H, W] = {expected}")
        _check_finite("prev_frame", prev_frame)
    _check_finite("latent", latent)
    return _motion_weights_unchecked(latent, prev_frame, (ph, pw), float(floor), float(power))


def detail_weights(latent, *, window=3, patch=(2, 2), floor=0.5):
    """Weights from local texture: the variance of the channel-mean magnitude over a window."""
    ph, pw = _check_latent(latent, patch)
    _check_unit_interval("floor", floor)
    check_window("window", window, latent.shape[2], latent.shape[3])
    _check_finite("latent", latent)
    return _detail_weights_unchecked(latent, window, (ph, pw), float(floor))


def combine_weights(w_motion, w_detail, mode="max", lam=0.5):
    """Merge motion and detail weights: ``max``, ``product``, or ``blend`` = (1 - lam)·Wm + lam·Wd."""
    if mode not in COMBINE_MODES:
        raise ValueError(f"mode must be one of {COMBINE_MODES}, got {mode!r}")
    _check_unit_interval("lam", lam)
    for name, w in (("w_motion", w_motion), ("w_detail", w_detail)):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {_describe(w)}")
    if w_motion.shape != w_detail.shape:
        raise ValueError(f"w_motion shape {tuple(w_motion.shape)} and w_detail shape {tuple(w_detail.shape)} must match")
    return _combine_unchecked(w_motion, w_detail, mode, float(lam))


# --------------------------------------------------------------------------------------------------
# Hot path: no validation, no host syncs.


def _motion_weights_unchecked(latent, prev_frame, patch, floor, power):
    x = latent.float()
    diff = (x[:, 1:] - x[:, :-1]).abs().mean(dim=0)  # [T-1, H, W]: frames 1.. against their predecessor
    scale = x.abs().amax(dim=(0, 2, 3))  # [T]: largest magnitude of each frame
    noise = NOISE_FLOOR * torch.maximum(scale[1:], scale[:-1])
    if prev_frame is not None:
        prev = prev_frame.float()
        diff = torch.cat([(x[:, 0] - prev).abs().mean(dim=0, keepdim=True), diff])
        noise = torch.cat([NOISE_FLOOR * torch.maximum(scale[:1], prev.abs().amax().view(1)), noise])
    n = _normalise_per_frame(F.avg_pool2d(diff.unsqueeze(1), patch).squeeze(1), noise)
    if power != 1.0:
        n = n.pow(power)
    weights = floor + (1.0 - floor) * n
    if prev_frame is None:  # nothing to compare frame 0 against: treat it as fully dynamic
        weights = torch.cat([weights.new_ones((1,) + weights.shape[1:]), weights], dim=0)
    return weights


def _detail_weights_unchecked(latent, window, patch, floor):
    _, T, H, W = latent.shape
    mag = latent.float().abs().mean(dim=0).unsqueeze(1)  # [T, 1, H, W]
    pad = window // 2
    if pad:
        mag = F.pad(mag, (pad, pad, pad, pad), mode="reflect")
    # Two-pass population variance over each window (no E[m²] − E[m]² cancellation).
    patches = F.unfold(mag, kernel_size=window)  # [T, window², H·W]
    variance = (patches - patches.mean(dim=1, keepdim=True)).square().mean(dim=1).view(T, 1, H, W)
    noise = (NOISE_FLOOR * mag.amax(dim=(1, 2, 3))).square()  # a variance: the squared scale
    n = _normalise_per_frame(F.avg_pool2d(variance, patch).squeeze(1), noise)
    return floor + (1.0 - floor) * n


def _combine_unchecked(w_motion, w_detail, mode, lam):
    if mode == "max":
        return torch.maximum(w_motion, w_detail)
    if mode == "product":
        return w_motion * w_detail
    return (1.0 - lam) * w_motion + lam * w_detail


def _normalise_per_frame(values, noise):
    """Min–max normalise each frame of ``[T, h, w]`` to [0, 1]; a constant frame becomes all 1.

    ``noise`` ``[T]``: the spread below which a frame's variation is round-off, not signal.
    """
    lo = values.amin(dim=(1, 2), keepdim=True)
    hi = values.amax(dim=(1, 2), keepdim=True)
    spread = hi - lo
    varies = spread > CONSTANT_FRAME_RTOL * torch.maximum(hi.abs(), lo.abs()) + noise.view(-1, 1, 1)
    normalised = (values - lo) / torch.where(varies, spread, torch.ones_like(spread))
    return torch.where(varies, normalised, torch.ones_like(normalised))


# --------------------------------------------------------------------------------------------------
# Validation shared with the policy and the per-run state.


def check_window(name, window, height, width):
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"{name} must be an odd positive integer (e.g. 3 or 5), got {window!r}")
    if window > min(height, width):
        raise ValueError(
            f"{name}={window} is larger than the latent frame ({height}x{width}); use at most {min(height, width)}"
        )


def check_patch(patch):
    if (
        not isinstance(patch, (tuple, list))
        or len(patch) != 2
        or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch)
    ):
        raise ValueError(f"patch must be a pair of positive integers (ph, pw) such as (2, 2), got {patch!r}")
    return int(patch[0]), int(patch[1])


def check_grid(height, width, patch):
    ph, pw = patch
    if height < ph or height % ph or width < pw or width % pw:
        raise ValueError(
            f"latent H x W = {height}x{width} must be positive multiples of patch=({ph}, {pw}); "
            f"the nearest valid sizes are {_nearest_multiple(height, ph)}x{_nearest_multiple(width, pw)}"
        )


def _check_latent(latent, patch):
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point() or latent.dim() != 4:
        raise ValueError(f"latent must be a floating-point tensor of shape [C, T, H, W], got {_describe(latent)}")
    if latent.shape[0] < 1 or latent.shape[1] < 1:
        raise ValueError(f"latent must have at least one channel and one frame, got shape {tuple(latent.shape)}")
    patch = check_patch(patch)
    check_grid(latent.shape[2], latent.shape[3], patch)
    return patch


def _check_unit_interval(name, value):
    check_number(name, value, low=0.0, high=1.0)


def _check_finite(name, tensor):
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values; the weights need a finite latent")


def _nearest_multiple(value, multiple):
    return max(multiple, multiple * math.floor(value / multiple + 0.5))


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"
