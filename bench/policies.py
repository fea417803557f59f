"""The cache policies side by side on the built-in tiny model: work saved against quality lost.

    python -m bench.policies                 # about 20 minutes on 2 CPU cores
    python -m bench.policies --quick         # a smoke run: one prompt, two thresholds, one repeat
    python -m bench.policies --calibrate     # the default policy over a fine τ grid: the presets (5 minutes)

Every policy generates the same prompts and seeds as ``off``. For each it reports the fraction of
token-steps computed, the analytic FLOP ratio (dense / spent), the wall speed-up over ``off`` (median of
``--repeats`` rounds, each round running every policy in turn, so that machine noise hits all alike),
and PSNR / SSIM of the decoded videos against ``off``'s over all frames. It prints the table, writes it to
``bench/results.md`` with a comparison at equal FLOP savings, and plots quality and wall speed-up against
the FLOP ratio in ``bench/results.png`` (needs matplotlib). ``--calibrate`` runs only the default policy
over a finer τ grid and writes ``bench/calibration.md`` with the presets that rule gives.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

import torch

import magi1
from bench.metrics import psnr, ssim
from cache_core import PRESET_SCHEDULE, CachePolicy
from magi1 import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = (
    "a red ball moving right over a checkerboard",
    "a yellow square bouncing in front of a gray wall",
    "a white triangle moving up over a grassy field",
    "a striped wall, the camera pans left",
)
SEEDS = (0, 1)
TAUS = (0.025, 0.05, 0.1, 0.2, 0.4)  # every policy's sweep
CALIBRATION_TAUS = (0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2)
QUALITY_DB = 35.0  # the slow preset's quality bar: PSNR against off (SSIM about 0.96 on the tiny model)
COMMON = PRESET_SCHEDULE  # the same schedule for every policy: the presets' (warm-up 2, chunk-level 2, final 1)


@dataclass
class Row:
    family: str  # mode, with combine mode and proxy for the token-level ones
    tau: float
    policy: CachePolicy
    computed: float = 0.0
    flop_ratio: float = 1.0
    speedup: float = 1.0
    psnr: float = 0.0
    ssim: float = 0.0


def configurations(taus=TAUS):
    rows = [Row("off", 0.0, None)]
    for mode in ("teacache", "flowcache"):
        rows += [Row(mode, tau, CachePolicy(mode=mode, tau=tau, **COMMON)) for tau in taus]
    for proxy in ("latent", "denoised"):
        rows += [Row(f"motion / {proxy}", tau, CachePolicy(mode="motion", tau=tau, proxy=proxy, **COMMON))
                 for tau in taus]
        for combine in ("max", "product", "blend"):
            rows += [Row(f"motion_detail {combine} / {proxy}", tau,
                         CachePolicy(mode="motion_detail", tau=tau, proxy=proxy, weight_combine_mode=combine, **COMMON))
                     for tau in taus]
    return rows


def run(rows, prompts, seeds, frames, steps, repeats, log=print):
    dit, vae, encoder = tiny.load_tiny_dit(), tiny.load_tiny_vae(), tiny.load_tiny_text_encoder()
    chunks = magi1.VideoLayout.plan(frames, tiny.SIZE, tiny.SIZE).chunk_num
    captions = [magi1.chunk_captions(*encoder.encode(p), chunks, tiny.tiny_special_tokens()) for p in prompts]
    jobs = [(caption, seed) for caption in captions for seed in seeds]

    def generate(policy, caption, seed):
        return magi1.generate(dit, *caption, frames=frames, height=tiny.SIZE, width=tiny.SIZE, steps=steps,
                              seed=seed, policy=policy)

    generate(None, *jobs[0])  # warm-up
    references = [vae.decode(generate(None, *job).latent) for job in jobs]
    walls = {id(row): [] for row in rows}
    for round_index in range(repeats):
        for row in rows:
            wall, flops, dense, computed, total, scores = 0.0, 0.0, 0.0, 0, 0, []
            for job, reference in zip(jobs, references):
                result = generate(row.policy, *job)
                stats = result.stats
                wall += stats.wall_seconds
                flops, dense = flops + stats.flops, dense + stats.dense_flops
                computed, total = computed + stats.token_steps_computed, total + stats.token_steps_total
                if round_index == 0:
                    video = vae.decode(result.latent)
                    scores.append((psnr(video, reference), ssim(video, reference)))
            walls[id(row)].append(wall)
            if round_index == 0:
                row.computed, row.flop_ratio = computed / total, dense / flops
                row.psnr = statistics.mean(min(p, 99.0) for p, _ in scores)  # identical videos count as 99 dB
                row.ssim = statistics.mean(s for _, s in scores)
        log(f"round {round_index + 1}/{repeats} done")
    off = statistics.median(walls[id(rows[0])])
    for row in rows:
        row.speedup = off / statistics.median(walls[id(row)])
    return rows


def psnr_at(rows, family, ratio):
    """PSNR of a family interpolated at a FLOP ratio (None outside the measured range)."""
    points = sorted((r.flop_ratio, r.psnr) for r in rows if r.family == family)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= ratio <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
    return None


def table(rows):
    lines = ["| policy | τ | token-steps computed | FLOP ratio | wall speed-up | speed-up / FLOP ratio | PSNR dB | SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.family} | {r.tau:g} | {r.computed:.0%} | {r.flop_ratio:.2f}x | {r.speedup:.2f}x | "
                     f"{r.speedup / r.flop_ratio:.2f} | {r.psnr:.1f} | {r.ssim:.4f} |")
    return "\n".join(lines)


def equal_flops(rows, ratios=(1.25, 1.5, 2.0)):
    families = list(dict.fromkeys(r.family for r in rows if r.family != "off"))
    lines = ["| policy | " + " | ".join(f"PSNR at {x:g}x FLOPs" for x in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for family in families:
        cells = [psnr_at(rows, family, x) for x in ratios]
        lines.append(f"| {family} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def best_family(rows, prefix="motion_detail"):
    """The ``prefix`` family with the highest mean PSNR over the equal-FLOP points they all reach."""
    families = list(dict.fromkeys(r.family for r in rows if r.family.startswith(prefix)))
    ratios = [x for x in (1.25, 1.5, 2.0) if all(psnr_at(rows, f, x) is not None for f in families)]
    if not ratios:  # no common range: the best mean PSNR
        return max(families, key=lambda f: statistics.mean(r.psnr for r in rows if r.family == f))
    return max(families, key=lambda f: statistics.mean(psnr_at(rows, f, x) for x in ratios))


def suggest_presets(rows, family, quality_db=QUALITY_DB):
    """``slow``: the ``family`` row saving the most FLOPs whose PSNR against ``off`` stays at or above
    ``quality_db``; ``fast``: the row whose FLOP saving is nearest twice slow's. Returns ``(slow, fast)``
    (None where no row qualifies). FLOPs rather than wall time: the wall speed-up tracks them and is noisy."""
    candidates = sorted((r for r in rows if r.family == family), key=lambda r: r.tau)
    good = [r for r in candidates if r.psnr >= quality_db]
    if not good:
        return None, None
    slow = max(good, key=lambda r: r.flop_ratio)
    target = 2 * (1 - 1 / slow.flop_ratio)
    fast = min((r for r in candidates if r.tau >= slow.tau), key=lambda r: abs((1 - 1 / r.flop_ratio) - target))
    return slow, fast


def calibration(rows, family):
    slow, fast = suggest_presets(rows, family)
    lines = [f"Presets for **{family}** (slow: the largest FLOP saving at >= {QUALITY_DB:g} dB PSNR against off; "
             "fast: about twice slow's FLOP saving):"]
    for name, row in (("slow", slow), ("fast", fast)):
        if row is None:
            lines.append(f"- {name}: no configuration qualifies")
        else:
            lines.append(f"- {name}: τ {row.tau:g} ({row.computed:.0%} of token-steps, {row.flop_ratio:.2f}x FLOPs, "
                         f"{row.speedup:.2f}x wall, {row.psnr:.1f} dB, SSIM {row.ssim:.3f})")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (quality, speed) = plt.subplots(1, 2, figsize=(13, 5))
    for family in dict.fromkeys(r.family for r in rows if r.family != "off"):
        points = sorted((r.flop_ratio, r.psnr, r.speedup) for r in rows if r.family == family)
        style = "--" if family.endswith("denoised") else "-"
        quality.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=family)
        speed.plot([p[0] for p in points], [p[2] for p in points], style, marker="o", label=family)
    top = max(r.flop_ratio for r in rows)
    speed.plot([1, top], [1, top], color="black", linewidth=0.8, label="speed-up = FLOP ratio")
    speed.plot([1, top], [0.8, 0.8 * top], color="gray", linewidth=0.8, linestyle=":", label="0.8 x FLOP ratio")
    quality.set(xlabel="FLOP ratio (dense / spent)", ylabel="PSNR vs off (dB)", title="Quality against work saved")
    speed.set(xlabel="FLOP ratio (dense / spent)", ylabel="wall speed-up vs off", title="Wall time against work saved")
    quality.legend(fontsize=7)
    speed.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one prompt and seed, two thresholds, one repeat")
    parser.add_argument("--calibrate", action="store_true",
                        help="only the default policy over a fine τ grid, and the presets it suggests")
    parser.add_argument("--out", default=HERE, help="folder for the results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    prompts, seeds, taus, repeats = PROMPTS, SEEDS, TAUS, args.repeats
    if args.quick:
        prompts, seeds, repeats = PROMPTS[:1], SEEDS[:1], 1
        taus = TAUS[2:4]
    default = CachePolicy(**COMMON)
    family = f"motion_detail {default.weight_combine_mode} / {default.proxy}"
    configs = configurations(taus)
    if args.calibrate:
        configs = [configs[0]] + [Row(family, tau, default.replace(tau=tau)) for tau in CALIBRATION_TAUS]
    rows = run(configs, prompts, seeds, args.frames, args.steps, repeats)
    header = (f"Tiny MAGI-1 (built-in), {len(prompts)} prompts x {len(seeds)} seeds, {args.frames} frames "
              f"{tiny.SIZE}x{tiny.SIZE}, {args.steps} steps, CPU ({torch.get_num_threads()} threads), wall time the "
              f"median of {repeats} rounds. Every policy: warm-up {COMMON['warmup_steps']}, chunk-level "
              f"{COMMON['chunk_wise_steps']}, final full {COMMON['final_full_steps']} steps, "
              f"max_reuse {COMMON['max_reuse']}.")
    if args.calibrate:
        report = "\n\n".join([header, table(rows), calibration(rows, family)])
        name, title = "calibration.md", "# Preset calibration on the tiny model"
    else:
        report = "\n\n".join([header, table(rows), "Quality at equal FLOP savings (interpolated):", equal_flops(rows),
                                f"Best MotionDetailCache variant at equal FLOPs: **{best_family(rows)}**. The presets "
                                "come from a finer τ sweep of the default policy: `python -m bench.policies "
                                "--calibrate` (bench/calibration.md)."])
        name, title = "results.md", "# Cache policies on the tiny model"
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        f.write(title + "\n\n" + report + "\n")
    if not args.calibrate:
        try:
            plot(rows, os.path.join(args.out, "results.png"))
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
    return rows


if __name__ == "__main__":
    main()
