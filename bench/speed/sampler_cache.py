"""Whole generations with and without the cache, side by side: wall time against FLOPs, and what the
cache's bookkeeping costs.

    python -m bench.speed.sampler_cache                          # a small random DiT on the CPU
    python -m bench.speed.sampler_cache --size 4.5B --height 720 --width 720 --frames 96   # on a GPU

For ``off`` and for ``motion_detail`` at each threshold τ it prints the median wall time of
``--repeats`` runs (interleaved, so that machine noise hits every policy alike), the wall speed-up
beside the FLOP ratio, and the fraction of token-steps computed. Random weights, so the numbers
measure cost, not quality.

Bookkeeping (change features, decisions, token weights, velocity reuse) is the time a cached run
spends outside the DiT beyond what the plain run spends there, per forward step, as a share of one
dense forward step. The sparse forward's gathers and scatters happen inside the DiT: they are the extra
time of a sparse call that computes every token over the dense call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import magi1
from cache_core import CachePolicy
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS

from .timing import InsideDiT

SIZES = {
    "tiny": dict(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4, num_query_groups=2,
                 kv_channels=64, caption_channels=64, caption_max_length=32, in_channels=16, out_channels=16, apply_layernorm_1p=True),
    # the 4.5B-base-like configuration of the official-pipeline fixtures (tests/fixtures/dit_tiny_base.json)
    "fixture": dict(num_layers=2, hidden_size=64, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    kv_channels=16, caption_channels=32, caption_max_length=16, in_channels=16, out_channels=16, apply_layernorm_1p=True),
    "4.5B": OFFICIAL_MODEL_CONFIGS["4.5B"],
    "24B": OFFICIAL_MODEL_CONFIGS["24B"],
}


def policies(taus, steps):
    warmup = max(1, steps * 5 // 64)
    chunk_wise = steps * 20 // 64
    out = {"off": None}
    for tau in taus:
        out[f"motion_detail tau={tau:g}"] = CachePolicy(mode="motion_detail", tau=tau, warmup_steps=warmup,
                                                        chunk_wise_steps=chunk_wise)
    return out


def gather_scatter_share(model, layout, repeats):
    """Extra time of an all-active sparse chunk call over the dense one (steady state: one cached chunk)."""
    ct = layout.tokens_per_chunk
    config, device = model.config, model.device
    x = torch.randn(1, 16, layout.chunk_width, layout.latent_height, layout.latent_width, device=device)
    caption = torch.randn(1, 1, config.caption_max_length, config.caption_channels, device=device)
    mask = torch.ones(1, 1, config.caption_max_length, dtype=torch.bool, device=device)
    cache = magi1.KVCache.for_model(model, 2 * ct)
    every = [torch.arange(ct, device=device)]

    def call(active):
        return model(x, torch.full((1, 1), 0.5, device=device), caption, mask, [(0, 2 * ct)], slice_point=1,
                     kv_cache=cache, kv_write_chunks=1, active=active)

    times = {"dense": [], "sparse": []}
    for _ in range(2):
        call(None), call(every)
    for _ in range(repeats):
        for name, active in (("dense", None), ("sparse", every)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            call(active)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - began)
    return statistics.median(times["sparse"]) / statistics.median(times["dense"]) - 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--passes", type=int, default=1, choices=[1, 3], help="guidance passes (1: distilled)")
    parser.add_argument("--taus", default="0.0065,0.013,0.026")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = magi1.random_dit(SIZES[args.size], seed=args.seed, device=device, dtype=dtype)
    model.distill = args.passes == 1
    timer = InsideDiT(model)
    request = magi1.VideoRequest(frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                                 seed=args.seed, guidance=magi1.Guidance(passes=args.passes))
    layout = request.layout(model.config.patch_size)
    generated = request.chunks
    generator = torch.Generator().manual_seed(args.seed)
    caption = torch.randn(generated, model.config.caption_max_length, model.config.caption_channels,
                          generator=generator)
    mask = torch.zeros(generated, model.config.caption_max_length, dtype=torch.bool)
    mask[:, : model.config.caption_max_length // 2] = True
    request = request.with_changes(caption=caption, caption_mask=mask)
    runs = policies([float(t) for t in args.taus.split(",")], args.steps)

    generate = lambda policy: magi1.generate(model, request.with_changes(policy=policy))  # noqa: E731
    generate(None)  # warm-up
    wall = {name: [] for name in runs}
    inside = {name: [] for name in runs}
    stats = {}
    for _ in range(args.repeats):
        for name, policy in runs.items():
            timer.seconds = 0.0
            result = generate(policy)
            wall[name].append(result.stats.wall_seconds)
            inside[name].append(timer.seconds)
            stats[name] = result.stats

    forward_steps = magi1.sampling.schedule.total_forward_steps(layout.chunk_num, args.steps, 4)
    off_wall, off_inside = statistics.median(wall["off"]), statistics.median(inside["off"])
    dense_step = off_inside / forward_steps
    off_outside = (off_wall - off_inside) / forward_steps
    print(f"MAGI-1 sampler, {args.size} random DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, {dtype}), {args.device}, {args.frames} frames {args.height}x{args.width} "
          f"({layout.chunk_num} chunks of {layout.tokens_per_chunk} tokens), {args.steps} steps, "
          f"{args.passes}-pass guidance, median of {args.repeats}")
    print(f"dense forward step {dense_step * 1000:.1f} ms; loop outside the DiT without cache "
          f"{off_outside * 1000:.2f} ms per step")
    header = f"{'policy':28s} {'wall s':>8s} {'speed-up':>9s} {'FLOP ratio':>11s} {'speed/FLOP':>11s} " \
             f"{'computed':>9s} {'bookkeeping':>12s}"
    print(header)
    for name in runs:
        s = stats[name]
        w = statistics.median(wall[name])
        outside = (w - statistics.median(inside[name])) / forward_steps
        bookkeeping = (outside - off_outside) / dense_step
        speedup = off_wall / w
        print(f"{name:28s} {w:8.2f} {speedup:8.2f}x {s.flop_ratio:10.2f}x {speedup / s.flop_ratio:11.2f} "
              f"{s.computed_fraction:9.0%} {bookkeeping:11.1%}")
    print(f"sparse gathers/scatters (all tokens active vs dense, one chunk call): "
          f"{gather_scatter_share(model, layout, args.repeats * 3):+.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
