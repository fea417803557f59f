"""Video quality against a reference: PSNR and SSIM over all frames (videos ``[3, F, H, W]`` in [-1, 1])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RANGE = 2.0  # [-1, 1]


def psnr(video, reference):
    """Peak signal-to-noise ratio in dB over every pixel of every frame (inf when equal)."""
    mse = (video.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(RANGE ** 2 / mse)


def _gaussian(size=11, sigma=1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(video, reference, size=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid positions
    only) over the frames and colour channels."""
    c1, c2 = (0.01 * RANGE) ** 2, (0.03 * RANGE) ** 2
    x = video.double().permute(1, 0, 2, 3).reshape(-1, 1, *video.shape[2:])  # (F * 3, 1, H, W)
    y = reference.double().permute(1, 0, 2, 3).reshape(-1, 1, *reference.shape[2:])
    g = _gaussian(size, sigma)
    window = (g[:, None] * g[None, :])[None, None]

    def blur(z):
        return F.conv2d(z, window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return value.mean().item()
