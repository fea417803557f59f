"""Video quality against a reference: PSNR and SSIM over all frames, and PSNR of the frame-to-frame
changes (temporal consistency); videos ``[3, F, H, W]`` in [-1, 1]."""

from __future__ import annotations

import math

import torch

RANGE = 2.0  # [-1, 1]


def psnr(video, reference):
    """Peak signal-to-noise ratio in dB over every pixel of every frame (inf when equal)."""
    mse = (video.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(RANGE ** 2 / mse)


def temporal_psnr(video, reference):
    """PSNR of the frame-to-frame differences against the reference's (peak: the pixel range, as for
    ``psnr``): low when a video flickers or moves differently, even where each frame alone is close."""
    return psnr(video[:, 1:] - video[:, :-1], reference[:, 1:] - reference[:, :-1])


def _gaussian(size=11, sigma=1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _band(n, g):
    """``(n, n - len(g) + 1)`` matrix whose column j holds ``g`` at rows j..j+len(g)-1: ``z @ band`` is
    the valid 1-D correlation of z's last axis with ``g``."""
    size = g.numel()
    band = torch.zeros(n, n - size + 1, dtype=g.dtype)
    for j in range(n - size + 1):
        band[j:j + size, j] = g
    return band


def ssim(video, reference, size=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid positions
    only) over the frames and colour channels."""
    c1, c2 = (0.01 * RANGE) ** 2, (0.03 * RANGE) ** 2
    x = video.double().permute(1, 0, 2, 3).reshape(-1, *video.shape[2:])  # (F * 3, H, W)
    y = reference.double().permute(1, 0, 2, 3).reshape(-1, *reference.shape[2:])
    g = _gaussian(size, sigma)
    # The five local statistics at once, blurred by the separable window as two banded matrix products
    # (the same sums as the 11x11 window, an order of magnitude faster than a 2-D convolution on a CPU).
    stacked = torch.cat([x, y, x * x, y * y, x * y])
    mx, my, xx, yy, xy = (_band(x.shape[1], g).T @ (stacked @ _band(x.shape[2], g))).chunk(5)
    vx, vy, cxy = xx - mx ** 2, yy - my ** 2, xy - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return value.mean().item()
