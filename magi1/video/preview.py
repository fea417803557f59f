"""Live previews of MAGI-1 latents: a linear latent-to-RGB projection fitted from the VAE itself.

The MAGI-1 VAE is not a per-pixel linear map, but the mean colour of a region is close to a linear function
of its mean latent. ``fit_rgb_projection`` measures that function on the loaded VAE: it encodes frames of
solid colours (a grid over the RGB cube), averages each latent over space, and solves the least-squares
problem ``latent -> colour`` (with a little ridge: solid colours span only a few latent directions, and the
directions they leave out must not be amplified into noise). No numbers for one VAE are shipped, so a
fine-tuned or another MAGI-1-architecture VAE gets its own projection.

``project`` applies it to one latent frame: a ``[h, w, 3]`` uint8 image at latent resolution (one pixel per
8x8 video pixels), which ComfyUI scales to its preview size. Pure PyTorch; no ComfyUI import here.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

# 4 levels per channel: 64 solid colours (5 levels, or 16- or 64-pixel frames, fit the tiny VAE as well).
# The fit costs about 30 s once per VAE for the full-size VAE on a CPU, well under a second on a GPU.
COLOUR_LEVELS = 4
FIT_SIZE = 32  # pixels a side of each solid-colour frame (a 4x4 latent grid)
FIT_BATCH = 32  # colours encoded at once
# Ridge strength relative to the mean latent variance of the solid colours. Solid colours vary along only
# ~4 of the 16 latent directions; plain least squares (0) gives the others large weights, which turn the
# texture of real latents into colour noise (tiny VAE, previews vs decoded frames: 9.5-17 dB PSNR at 0,
# 28-30 dB at 0.1, 28-29 dB at 0.3, 24-28 dB at 1), for a fit error on the solid colours of 0.027 -> 0.036.
RIDGE = 0.1

_CACHE = weakref.WeakKeyDictionary()  # VAE -> its RGBProjection, fitted once


class RGBProjection(NamedTuple):
    """``rgb = matrix @ latent + bias``, RGB in [0, 1], latents at the DiT's scale (as the sampler has them)."""

    matrix: torch.Tensor  # [3, C] float32, CPU
    bias: torch.Tensor  # [3] float32, CPU


def solid_colours(levels=COLOUR_LEVELS):
    """``levels**3`` colours ``[N, 3]`` in [0, 1], a regular grid over the RGB cube (corners included)."""
    grid = torch.linspace(0.0, 1.0, levels)
    return torch.cartesian_prod(grid, grid, grid)


@torch.no_grad()
def encode_colours(vae, colours, size=FIT_SIZE, batch=FIT_BATCH):
    """The mean DiT-scale latent ``[N, C]`` of a one-frame ``size x size`` video of each colour ``[N, 3]``
    in [0, 1], encoded by ``vae`` (a ``MagiVAE``, or anything with its ``encode(video, tiling)``)."""
    means = []
    for part in colours.split(batch):
        video = (part * 2 - 1)[:, :, None, None, None].expand(-1, -1, 1, size, size)
        device = getattr(vae, "device", torch.device("cpu"))
        latent = vae.encode(video.to(device), None)  # [n, C, 1, size/8, size/8], untiled
        means.append(latent.float().mean(dim=(2, 3, 4)).cpu())
    return torch.cat(means)


def fit_least_squares(latents, colours, ridge=RIDGE):
    """The affine map ``latents [N, C] -> colours [N, 3]`` minimising the squared error plus ``ridge`` times
    the mean latent variance times ``|matrix|^2`` (the bias is not penalised)."""
    latents, colours = latents.double(), colours.double()
    mean_z, mean_c = latents.mean(0), colours.mean(0)
    z, c = latents - mean_z, colours - mean_c
    gram = z.T @ z
    penalty = ridge * gram.diagonal().mean().clamp(min=1e-12)
    matrix = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype), z.T @ c).T
    bias = mean_c - matrix @ mean_z
    return RGBProjection(matrix.float(), bias.float())


def fit_rgb_projection(vae, levels=COLOUR_LEVELS, size=FIT_SIZE, ridge=RIDGE):
    """Fit the latent-to-RGB projection of ``vae``: encode ``levels**3`` solid colours, least squares."""
    colours = solid_colours(levels)
    return fit_least_squares(encode_colours(vae, colours, size), colours, ridge)


def projection_for(vae):
    """``fit_rgb_projection(vae)``, fitted once per VAE object and kept while the VAE lives."""
    projection = _CACHE.get(vae)
    if projection is None:
        projection = _CACHE[vae] = fit_rgb_projection(vae)
    return projection


def fit_error(vae, projection, levels=COLOUR_LEVELS, size=FIT_SIZE):
    """Mean absolute error (in [0, 1] units) of ``projection`` on the encoded solid colours."""
    colours = solid_colours(levels)
    predicted = encode_colours(vae, colours, size) @ projection.matrix.T + projection.bias
    return float((predicted - colours).abs().mean())


@torch.no_grad()
def project(latents, projection):
    """RGB of latents ``[C, h, w]`` -> uint8 ``[h, w, 3]``; of ``[C, T, h, w]`` -> ``[T, h, w, 3]`` (CPU).
    Computed where the latents are, so that only the small uint8 image crosses to the CPU."""
    matrix = projection.matrix.to(latents.device, torch.float32)
    bias = projection.bias.to(latents.device, torch.float32)
    rgb = torch.tensordot(latents.float().movedim(0, -1), matrix, dims=([-1], [1])) + bias
    return rgb.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def preview_frame(latents, chunks=None):
    """The latent frame ``[C, h, w]`` a live preview shows of a step's denoised estimate ``[C, F, h, w]``
    covering the chunks ``(first, end)``: the middle frame of the first chunk, the one closest to done."""
    frames = latents.shape[1]
    if chunks is not None and chunks[1] > chunks[0] and frames % (chunks[1] - chunks[0]) == 0:
        frames //= chunks[1] - chunks[0]
    return latents[:, frames // 2]
