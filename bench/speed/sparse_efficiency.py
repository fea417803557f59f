"""Sparse efficiency by a fixed protocol: does the wall time follow the FLOPs when half the tokens are computed?

    python -m bench.speed.sparse_efficiency                  # the benchmark model on the CPU, 7 rounds
    python -m bench.speed.sparse_efficiency --model tiny --fraction 0.25 --rounds 9

Whole generations of a built-in model (its example prompt, 48 frames, its steps) with exactly
``--fraction`` of every chunk's tokens computed at every step after the chunk's first (a random set each
step, no policy: ``bench.speed.forced_reuse``), against dense generations, in interleaved rounds (dense, sparse,
dense, sparse, ...) so that machine noise hits both alike. Each round gives a wall speed-up; divided by the
analytic FLOP ratio it is the sparse efficiency (1.0: wall time follows FLOPs exactly). Printed: the
median and range over the rounds, the same from the fastest dense and fastest sparse round (a
shared machine's noise only ever adds time), and where the time goes (inside the DiT against the DiT's FLOP ratio,
and the loop outside it per forward step).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import magi1
from magi1 import builtin

from .forced_reuse import ForcedFraction
from .timing import InsideDiT


def measure(model, fraction=0.5, rounds=7, frames=48, seed=0, log=print):
    """Per round: ``(dense wall, sparse wall, dense inside DiT, sparse inside DiT)`` seconds, and the stats of
    the last dense and sparse runs."""
    dit, encoder = model.load_dit(), model.load_text_encoder()
    request = magi1.VideoRequest(frames=frames, height=model.size, width=model.size, steps=model.steps, seed=seed)
    caption, caption_mask = magi1.chunk_captions(*encoder.encode(model.example_prompt), request.chunks,
                                                 model.special_tokens())
    request = request.with_changes(caption=caption, caption_mask=caption_mask)
    policy = ForcedFraction(fraction, seed=seed)
    timer = InsideDiT(dit)

    def generate(chosen):
        timer.seconds = 0.0
        result = magi1.generate(dit, request.with_changes(policy=chosen))
        return result.stats, timer.seconds

    try:
        generate(None), generate(policy)  # warm-up
        times, last = [], {}
        for index in range(rounds):
            (dense, dense_inside), (sparse, sparse_inside) = generate(None), generate(policy)
            times.append((dense.wall_seconds, sparse.wall_seconds, dense_inside, sparse_inside))
            last = {"dense": dense, "sparse": sparse}
            log(f"round {index + 1}/{rounds}: speed-up {dense.wall_seconds / sparse.wall_seconds:.2f}x")
    finally:
        timer.remove()
    return times, last


def summary(times, last, forward_steps):
    """Lines of the report from ``measure``'s output."""
    flop_ratio = last["dense"].flops / last["sparse"].flops
    speedups = [d / s for d, s, _, _ in times]
    efficiency = [x / flop_ratio for x in speedups]
    fastest_dense, fastest_sparse = min(d for d, *_ in times), min(s for _, s, *_ in times)
    best = fastest_dense / fastest_sparse
    inside = [di / si for _, _, di, si in times]
    outside_dense = statistics.median((d - di) / forward_steps for d, _, di, _ in times)
    outside_sparse = statistics.median((s - si) / forward_steps for _, s, _, si in times)
    dense_step = statistics.median(di / forward_steps for _, _, di, _ in times)
    return [
        f"tokens computed {last['sparse'].computed_fraction:.0%}, FLOP ratio {flop_ratio:.2f}x",
        f"wall speed-up: median {statistics.median(speedups):.2f}x (range {min(speedups):.2f}-{max(speedups):.2f})",
        f"sparse efficiency (wall speed-up / FLOP ratio): median {statistics.median(efficiency):.2f} "
        f"(range {min(efficiency):.2f}-{max(efficiency):.2f})",
        f"fastest rounds (noise only adds time): dense {fastest_dense:.3f} s, sparse {fastest_sparse:.3f} s, "
        f"speed-up {best:.2f}x, efficiency {best / flop_ratio:.2f}",
        f"inside the DiT: speed-up {statistics.median(inside):.2f}x (range {min(inside):.2f}-{max(inside):.2f})",
        f"outside the DiT per forward step: dense {outside_dense * 1000:.1f} ms, sparse {outside_sparse * 1000:.1f} ms "
        f"(a dense DiT step takes {dense_step * 1000:.1f} ms)",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(builtin.MODELS), default="bench", help="the built-in model")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of tokens computed after a chunk's first step")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    if not 0.0 < args.fraction <= 1.0:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    model = builtin.MODELS[args.model]
    times, last = measure(model, args.fraction, args.rounds, args.frames)
    layout = magi1.VideoRequest(frames=args.frames, height=model.size, width=model.size).layout()
    forward_steps = magi1.sampling.schedule.total_forward_steps(layout.chunk_num, model.steps, 4)
    lines = [f"# python -m bench.speed.sparse_efficiency --model {args.model} --fraction {args.fraction:g} "
             f"--rounds {args.rounds} ({args.frames} frames {model.size}x{model.size}, {model.steps} steps, CPU "
             f"{torch.get_num_threads()} threads)"] + summary(times, last, forward_steps)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
