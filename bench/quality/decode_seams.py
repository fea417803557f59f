"""Seams of the tiled VAE decode: the release decodes 12-frame temporal tiles without overlap, and each tile
boundary shows as a jump of the frame-to-frame change (issue 20: 6-8 inside tiles, 15-20 at frames
11-13, 23-25, ...). This compares temporal tilings on

1. the built-in tiny model: a 96-frame generation (demo.sample, 24 latent frames) decoded by its VAE;
2. the full-size VAE architecture (``VAEConfig()``, 24 blocks of width 1024) with random weights (seed 0),
   on 24 latent frames that change smoothly in time (so that any jump is the tiling's). 720p latents
   (90 x 160) take hours on a 2-core CPU: ``--size`` sets the latent height and width (default 8);
3. the cost at 720p (16 x 24 x 90 x 160 latents, 256-pixel spatial tiles), computed: tiles, decoder
   FLOPs relative to the release's tiling, and tokens (activation memory) of the largest tile.

    python -m bench.quality.decode_seams                 # all three (bench/results/decode_seams.txt)
    python -m bench.quality.decode_seams --skip-random   # the tiny model and the cost table only

Metric: d_t = mean |frame_t - frame_(t-1)| over pixels and channels on the 0-255 scale (frames clamped to
[-1, 1]). "seam" is its mean at the release's tile boundaries (t = 12, 24, ...), "elsewhere" its mean
over the frames at least two away from one; the spike ratio is seam / elsewhere. The untiled decode is
the reference without seams (the content's own ratio). peak/median = max_t d_t / median_t d_t, which
catches a seam wherever a tiling puts it. A random-weight decoder makes the four frames of a latent frame
unlike each other (d_t is about 100 everywhere), so its table takes d_t between frames 4 apart (the same
frame of consecutive latent frames; "seam": the four that cross a boundary). Times are wall-clock on this machine (shared: noisy).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import magi1
from magi1.video.vae import SEAMLESS, VAETiling

RELEASE_FRAMES = 12  # the release's temporal tile, in frames
TILINGS = {
    "as released (12 frames, no overlap)": VAETiling(),
    "untiled in time (reference)": VAETiling(length=10 ** 4),
    "12 frames, overlap 1/3 (1 latent)": VAETiling(length=12, temporal_overlap=1 / 3),
    "16 frames, overlap 1/4 (1 latent)": VAETiling(length=16, temporal_overlap=0.25),
    "16 frames, overlap 1/2 (2 latents)": VAETiling(length=16, temporal_overlap=0.5),
    "48 frames, no overlap": VAETiling(length=48),
}
RANDOM_TILINGS = ("as released (12 frames, no overlap)", "untiled in time (reference)",
                  "12 frames, overlap 1/3 (1 latent)", "16 frames, overlap 1/2 (2 latents)")


def label(name, tiling):
    return f"**{name}: SEAMLESS, MAGI-1 Decode's default**" if tiling == SEAMLESS else name


def seam_stats(video, lag=1):
    """(seam mean, elsewhere mean, spike ratio, peak / median) of a decoded video, with d_t taken between
    frames ``lag`` apart (seams: the differences that cross a release tile boundary)."""
    video = video.clamp(-1, 1)
    d = (video[:, lag:] - video[:, :-lag]).abs().mean(dim=(0, 2, 3)) * 127.5
    t = torch.arange(lag, video.shape[1])  # d[i] compares frame t = i + lag with t - lag
    phase = t % RELEASE_FRAMES
    crosses = phase < lag
    away = (phase >= lag + 1) & (phase <= RELEASE_FRAMES - 2)
    seam, elsewhere = d[crosses].mean().item(), d[away].mean().item()
    return seam, elsewhere, seam / elsewhere, (d.max() / d.median()).item()


def seam_table(vae, latent, title, lag=1, tilings=TILINGS):
    rows = [f"### {title}", "", "| temporal tiling | frames | seam | elsewhere | spike ratio | peak/median | "
            "decode s |", "|---|---|---|---|---|---|---|"]
    for name, tiling in tilings.items():
        began = time.perf_counter()
        video = vae.decode(latent, tiling)
        seconds = time.perf_counter() - began
        seam, elsewhere, ratio, peak = seam_stats(video, lag)
        rows.append(f"| {label(name, tiling)} | {video.shape[1]} | {seam:.2f} | {elsewhere:.2f} | {ratio:.2f} | {peak:.2f} | "
                    f"{seconds:.1f} |")
        print(rows[-1], flush=True)
    return rows


def tiny_latent(frames=96, seed=0):
    import demo  # the repository root's demo: the generation a user's first run makes

    result, vae = demo.sample(frames=frames, seed=seed)
    return vae, result.latent


def smooth_latent(frames=24, size=8, seed=0):
    """DiT-scale latents of unit variance that turn smoothly over the clip: a cos(phase) + b sin(phase)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(16, 1, size, size, generator=g) for _ in range(2))
    phase = torch.linspace(0, math.pi / 2, frames).view(1, frames, 1, 1)
    return a * phase.cos() + b * phase.sin()


def cost_table(config=magi1.VAEConfig(), latent_shape=(24, 90, 160)):
    """Tiles, relative decoder FLOPs and largest-tile tokens of each tiling at 720p, computed."""
    from magi1.video.vae import _spatial_plan, _starts, _temporal_tile_stride, _temporal_tiles

    vae = magi1.build_vae(config, device="meta")
    e, depth = config.embed_dim, config.depth
    rows = ["### Cost at 720p (16 x 24 x 90 x 160 latents, 256-pixel spatial tiles), computed", "",
            "| temporal tiling | tiles | decoder FLOPs vs release | tokens of a tile (activation memory) |",
            "|---|---|---|---|"]
    base = None
    for name, tiling in TILINGS.items():
        (th, tw), stride, _, _ = _spatial_plan(vae, tiling)
        heights = [min(th, latent_shape[1] - i) for i in _starts(latent_shape[1], stride[0])]
        widths = [min(tw, latent_shape[2] - j) for j in _starts(latent_shape[2], stride[1])]
        temporal = _temporal_tiles(latent_shape[0], *_temporal_tile_stride(tiling, vae.temporal_factor))
        flops, tiles, largest = 0, 0, 0
        for _, size, _ in temporal:
            for h in heights:
                for w in widths:
                    n = size * h * w + 1
                    flops += depth * (24 * n * e * e + 4 * n * n * e)
                    tiles, largest = tiles + 1, max(largest, n)
        base = base or flops
        rows.append(f"| {label(name, tiling)} | {tiles} | {flops / base:.2f}x | {largest} ({largest / 3073:.2f}x) |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-random", action="store_true", help="skip the full-size random-weight VAE (minutes)")
    parser.add_argument("--size", type=int, default=8, help="latent height and width of the random-weight run")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    vae, latent = tiny_latent()
    out = seam_table(vae, latent, f"Tiny model: a 96-frame generation ({latent.shape[1]} latent frames, 64x64)")
    if not args.skip_random:
        big = magi1.random_vae(magi1.VAEConfig(), seed=0)
        title = (f"Full-size VAE, random weights (seed 0): 24 smooth latent frames of {args.size}x{args.size} "
                 f"({args.size * 8}x{args.size * 8} pixels; 720p's 90x160 is too slow on this CPU); d between frames 4 apart")
        tilings = {name: TILINGS[name] for name in RANDOM_TILINGS}
        out += [""] + seam_table(big, smooth_latent(size=args.size), title, lag=4, tilings=tilings)
        del big
    out += [""] + cost_table()
    print()
    print("\n".join(out))


if __name__ == "__main__":
    main()
