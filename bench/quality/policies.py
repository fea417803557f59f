"""The cache policies side by side on a built-in model: work saved against quality lost.

    python -m bench.quality.policies                 # the tiny model: about 20 minutes on 2 CPU cores
    python -m bench.quality.policies --quick         # a smoke run: one prompt, two thresholds, one repeat
    python -m bench.quality.policies --model bench --prompts bench/setups/calibration.json --calibrate   # the presets
    python -m bench.quality.policies --model bench --setup bench/setups/bench_heldout.json   # the benchmark model's held-out set
    python -m bench.quality.policies --model bench --prompts my.txt --seeds 0,1,2 --policies teacache,motion_detail/max/latent --taus 0.1,0.2

Prompts, seeds, policies and τ values come from the command line or a JSON ``--setup`` file (keys
``prompts``, ``seeds``, ``policies``, ``taus``, ``frames``, ``steps``; the command line wins). A policy is
written ``teacache``, ``flowcache``, ``motion/<proxy>``, ``motion_detail/<combine>/<proxy>``,
``hybrid/<combine>/<proxy>`` or ``released``, optionally followed by ``+<CachePolicy field>=<value>`` and
``+chunk=<chunk_tau / τ>`` (``family_policy``); a setup's policy may carry its own τ values. The
benchmark model defaults to its held-out prompts and seeds (``train/bench_heldout.json``).

Every policy generates the same prompts and seeds as ``off``. For each it reports the fraction of
token-steps computed, the analytic FLOP ratio (dense / spent), the wall speed-up over ``off`` (median of
``--repeats`` rounds, each round running every policy in turn, so that machine noise hits all alike),
and PSNR / SSIM of the decoded videos against ``off``'s over all frames, with the seed-to-seed spread of
the PSNR (the range of the per-seed means over the prompts). It prints the table, writes it to
``bench/results/policies_tiny.md`` (``policies_bench_heldout.md`` for the benchmark model) with a comparison at
equal FLOP savings, and plots quality and wall speed-up against the FLOP ratio beside it (``.png``, needs
matplotlib). ``--calibrate`` runs only the presets' policy (``PRESET_SPEC``) over a finer τ grid and writes
``calibration_tiny.md`` (``calibration_bench.md``) with the presets that rule gives; the shipped presets come
from the benchmark model's calibration set (never the held-out prompts or seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Optional

import torch

import magi1
from bench.quality.metrics import psnr, ssim, temporal_psnr
from cache_core import PRESET_SCHEDULE, CachePolicy
from cache_core.policy import PROXIES
from cache_core.token_weights import COMBINE_MODES
from magi1 import builtin
from train.benchmark_model import HELDOUT_FILE

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
PROMPTS = (
    "a red ball moving right over a checkerboard",
    "a yellow square bouncing in front of a gray wall",
    "a white triangle moving up over a grassy field",
    "a striped wall, the camera pans left",
)
SEEDS = (0, 1)
TAUS = (0.025, 0.05, 0.1, 0.2, 0.4)  # every policy's sweep
CALIBRATION_TAUS = (0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.25, 0.3)
# The presets' policy (``CachePolicy.preset_family``) written as a bench spec: what --calibrate sweeps.
PRESET_SPEC = "hybrid/max/denoised+velocity_extrapolation=1+chunk=1.5"
QUALITY_DB = 35.0  # the slow preset's quality bar: PSNR against off (SSIM about 0.96 on the tiny model)
COMMON = PRESET_SCHEDULE  # the same schedule for every policy: the presets' (warm-up 2, chunk-level 2, final 1)
# MotionCache's MAGI-1 configuration as released: motion weights on the noisy latent, warm-up 5, chunk-level
# 20, no final full steps, the old displacement replayed (no velocity rescale), no reuse cap.
RELEASED = dict(proxy="latent", warmup_steps=5, chunk_wise_steps=20, final_full_steps=0, max_reuse=None,
                rescale_reused_velocity=False)
POLICIES = ("teacache", "flowcache") + tuple(f"motion/{p}" for p in PROXIES) + tuple(
    f"motion_detail/{c}/{p}" for p in PROXIES for c in COMBINE_MODES)
RESULT_NAMES = {"tiny": ("policies_tiny", "calibration_tiny"), "bench": ("policies_bench_heldout", "calibration_bench")}


@dataclass
class Row:
    family: str  # mode, with combine mode and proxy for the token-level ones, and any options
    tau: float
    policy: CachePolicy
    steps: Optional[int] = None  # denoising steps of this row (None: the run's); compared with off at as many
    computed: float = 0.0
    flop_ratio: float = 1.0
    speedup: float = 1.0
    psnr: float = 0.0
    ssim: float = 0.0
    temporal: float = 0.0  # PSNR of the frame-to-frame changes against off's
    psnr_by_seed: dict = field(default_factory=dict)  # seed -> mean PSNR over the prompts
    ssim_by_seed: dict = field(default_factory=dict)
    temporal_by_seed: dict = field(default_factory=dict)

    @property
    def psnr_spread(self):
        """Seed-to-seed spread: the range of the per-seed mean PSNRs (0 with one seed)."""
        return _spread(self.psnr_by_seed)

    @property
    def ssim_spread(self):
        return _spread(self.ssim_by_seed)

    @property
    def temporal_spread(self):
        return _spread(self.temporal_by_seed)


def _spread(by_seed):
    values = list(by_seed.values())
    return max(values) - min(values) if values else 0.0


RELEASED_STEPS = 64  # MotionCache as released never reaches its token phase in 16 steps (5 + 20 before it)


def _value(text):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def _options(spec):
    """``base+name=value+...`` -> ``(base, {name: value})``; ``chunk`` is chunk_tau as a multiple of τ."""
    base, *parts = [part.strip() for part in spec.strip().split("+")]
    options = {}
    for part in parts:
        name, sep, value = part.partition("=")
        known = name == "chunk" or name in CachePolicy.__dataclass_fields__
        if not sep or not known or name in ("mode", "tau", "proxy", "weight_combine_mode"):
            raise ValueError(f"unknown policy option {part!r} in {spec!r}: write +<CachePolicy field>=<value> "
                             "(e.g. +velocity_extrapolation=1) or +chunk=<chunk_tau as a multiple of tau>")
        try:
            options[name] = _value(value)
        except ValueError:
            raise ValueError(f"policy option {part!r} in {spec!r}: {value!r} is not a number, true, false or none")
    return base, options


def family_policy(spec, tau):
    """``(family name, policy, steps)`` of a policy written ``teacache``, ``flowcache``, ``motion/<proxy>``,
    ``motion_detail/<combine>/<proxy>``, ``hybrid/<combine>/<proxy>`` (the proxy defaults to latent, the
    combine mode to the default's) or ``released`` (MotionCache exactly as released, at 64 steps), each
    optionally followed by ``+<CachePolicy field>=<value>`` options and ``+chunk=<chunk_tau / tau>``.
    ``steps`` is None except for ``released``."""
    base, options = _options(spec)
    chunk = options.pop("chunk", None)
    suffix = "".join(f" +{name}={value:g}" if isinstance(value, float) else f" +{name}={value}"
                     for name, value in sorted(options.items()))
    if chunk is not None:
        options["chunk_tau"] = round(chunk * tau, 9)  # as CachePolicy.preset_family rounds it
        suffix += f" +chunk={chunk:g}x"

    def made(family, steps=None, schedule=COMMON, **fields):
        try:
            return family + suffix, CachePolicy(tau=tau, **{**schedule, **fields, **options}), steps
        except (TypeError, ValueError) as error:
            raise ValueError(f"policy {spec!r}: {error}")

    if base in ("teacache", "flowcache"):
        return made(base, mode=base)
    if base == "released":
        return made(f"motioncache as released ({RELEASED_STEPS} steps)", RELEASED_STEPS, RELEASED, mode="motion")
    mode, *parts = [part.strip() for part in base.split("/")]
    combine = parts.pop(0) if mode in ("motion_detail", "hybrid") and parts and parts[0] in COMBINE_MODES else None
    proxy = parts.pop(0) if parts else "latent"
    if mode not in ("motion", "motion_detail", "hybrid") or parts or proxy not in PROXIES:
        raise ValueError(f"unknown policy {spec!r}: write teacache, flowcache, motion/<proxy>, "
                         f"motion_detail/<combine>/<proxy>, hybrid/<combine>/<proxy> or released (proxy: "
                         f"{', '.join(PROXIES)}; combine: {', '.join(COMBINE_MODES)}), then any +<option>=<value>")
    if mode == "motion":
        return made(f"motion / {proxy}", mode="motion", proxy=proxy)
    combine = combine or CachePolicy().weight_combine_mode
    return made(f"{mode} {combine} / {proxy}", mode=mode, proxy=proxy, weight_combine_mode=combine)


def configurations(taus=TAUS, policies=POLICIES):
    """The rows of a run: ``off``, then every policy over its τ values. A policy is a spec string (swept over
    ``taus``) or ``{"policy": spec, "taus": [...]}``; a row at another step count (``released``) brings its
    own ``off`` at that count."""
    rows = [Row("off", 0.0, None)]
    for entry in policies:
        spec, own_taus = (entry["policy"], entry["taus"]) if isinstance(entry, dict) else (entry, taus)
        for tau in own_taus:
            family, policy, steps = family_policy(spec, tau)
            if steps is not None and not any(r.policy is None and r.steps == steps for r in rows):
                rows.append(Row(f"off ({steps} steps)", 0.0, None, steps=steps))
            rows.append(Row(family, tau, policy, steps=steps))
    return rows


def run(rows, prompts, seeds, frames, steps, repeats, model=builtin.TINY, log=print):
    dit, vae, encoder = model.load_dit(), model.load_vae(), model.load_text_encoder()
    request = magi1.VideoRequest(frames=frames, height=model.size, width=model.size)
    captions = [magi1.chunk_captions(*encoder.encode(p), request.chunks, model.special_tokens()) for p in prompts]
    jobs = [(caption, seed) for caption in captions for seed in seeds]

    def generate(policy, caption, seed, row_steps):
        return magi1.generate(dit, request.with_changes(caption=caption[0], caption_mask=caption[1], steps=row_steps,
                                                        seed=seed, policy=policy))

    generate(None, *jobs[0], steps)  # warm-up
    references = {n: [vae.decode(generate(None, *job, n).latent) for job in jobs]
                  for n in sorted({row.steps or steps for row in rows})}
    walls = {id(row): [] for row in rows}
    for round_index in range(repeats):
        for row in rows:
            row_steps = row.steps or steps
            wall, flops, dense, computed, total, scores = 0.0, 0.0, 0.0, 0, 0, []
            for job, reference in zip(jobs, references[row_steps]):
                result = generate(row.policy, *job, row_steps)
                stats = result.stats
                wall += stats.wall_seconds
                flops, dense = flops + stats.flops, dense + stats.dense_flops
                computed, total = computed + stats.token_steps_computed, total + stats.token_steps_total
                if round_index == 0:  # identical videos count as 99 dB
                    video = vae.decode(result.latent)
                    scores.append((job[1], min(psnr(video, reference), 99.0), ssim(video, reference),
                                   min(temporal_psnr(video, reference), 99.0)))
            walls[id(row)].append(wall)
            if round_index == 0:
                row.computed, row.flop_ratio = computed / total, dense / flops
                for name, column in (("psnr", 1), ("ssim", 2), ("temporal", 3)):
                    setattr(row, name, statistics.mean(score[column] for score in scores))
                    setattr(row, name + "_by_seed", {seed: statistics.mean(score[column] for score in scores
                                                                           if score[0] == seed) for seed in seeds})
                log(f"{row.family} τ {row.tau:g}: {row.computed:.0%} of token-steps, {row.psnr:.1f} dB")
        log(f"round {round_index + 1}/{repeats} done")
    off = {row.steps or steps: statistics.median(walls[id(row)]) for row in rows if row.policy is None}
    for row in rows:
        row.speedup = off[row.steps or steps] / statistics.median(walls[id(row)])
    return rows


def psnr_at(rows, family, ratio, axis="flop_ratio", seed=None):
    """PSNR of a family interpolated at a FLOP ratio (``axis="speedup"``: a wall speed-up), over all seeds
    or one; None outside the measured range."""
    points = sorted((getattr(r, axis), r.psnr if seed is None else r.psnr_by_seed[seed])
                    for r in rows if r.family == family)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= ratio <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
    return None


def spread_at(rows, family, ratio, axis="flop_ratio"):
    """Seed-to-seed spread of the interpolated PSNR: the range of the per-seed values (None if unmeasured)."""
    seeds = next(r.psnr_by_seed for r in rows if r.family == family)
    values = [psnr_at(rows, family, ratio, axis, seed) for seed in seeds]
    return None if None in values else max(values) - min(values)


def table(rows):
    lines = ["| policy | τ | token-steps computed | FLOP ratio | wall speed-up | speed-up / FLOP ratio | PSNR dB | "
             "PSNR seed spread dB | SSIM | SSIM seed spread | temporal PSNR dB | temporal seed spread dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.family} | {r.tau:g} | {r.computed:.0%} | {r.flop_ratio:.2f}x | {r.speedup:.2f}x | "
                     f"{r.speedup / r.flop_ratio:.2f} | {r.psnr:.1f} | {r.psnr_spread:.1f} | {r.ssim:.4f} | "
                     f"{r.ssim_spread:.4f} | {r.temporal:.1f} | {r.temporal_spread:.1f} |")
    return "\n".join(lines)


def equal_cost(rows, axis="flop_ratio", ratios=(1.25, 1.5, 2.0)):
    """PSNR of every policy at equal FLOP savings (``axis="speedup"``: equal wall speed-ups), with its
    seed-to-seed spread."""
    what = "FLOPs" if axis == "flop_ratio" else "wall"
    families = list(dict.fromkeys(r.family for r in rows if r.policy is not None))
    lines = ["| policy | " + " | ".join(f"PSNR at {x:g}x {what} (seed spread)" for x in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for family in families:
        cells = []
        for x in ratios:
            value = psnr_at(rows, family, x, axis)
            cells.append("–" if value is None else f"{value:.1f} ({spread_at(rows, family, x, axis):.1f})")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def equal_flops(rows, ratios=(1.25, 1.5, 2.0)):
    return equal_cost(rows, "flop_ratio", ratios)


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

    figure, (quality, quality_wall, speed) = plt.subplots(1, 3, figsize=(19, 5))
    for family in dict.fromkeys(r.family for r in rows if r.policy is not None):
        points = sorted((r.flop_ratio, r.psnr, r.speedup) for r in rows if r.family == family)
        style = "--" if "denoised" in family else "-"
        quality.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=family)
        by_wall = sorted(points, key=lambda p: p[2])
        quality_wall.plot([p[2] for p in by_wall], [p[1] for p in by_wall], style, marker="o", label=family)
        speed.plot([p[0] for p in points], [p[2] for p in points], style, marker="o", label=family)
    top = max(r.flop_ratio for r in rows)
    speed.plot([1, top], [1, top], color="black", linewidth=0.8, label="speed-up = FLOP ratio")
    speed.plot([1, top], [0.8, 0.8 * top], color="gray", linewidth=0.8, linestyle=":", label="0.8 x FLOP ratio")
    quality.set(xlabel="FLOP ratio (dense / spent)", ylabel="PSNR vs off (dB)", title="Quality at equal FLOPs")
    quality_wall.set(xlabel="wall speed-up vs off", ylabel="PSNR vs off (dB)", title="Quality at equal wall time")
    speed.set(xlabel="FLOP ratio (dense / spent)", ylabel="wall speed-up vs off", title="Wall time against work saved")
    for axes in (quality, quality_wall, speed):
        axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _listed(text, kind=str):
    return [kind(item) for item in text.split(",") if item.strip()]


def setup(args):
    """Prompts, seeds, policies, τ values, frames and steps: the command line, else ``--setup``, else the
    model's defaults (the benchmark model: its held-out prompts and seeds)."""
    chosen = {}
    if args.setup:
        with open(args.setup) as f:
            chosen = json.load(f)
        unknown = set(chosen) - {"prompts", "seeds", "policies", "taus", "frames", "steps", "about"}
        if unknown:
            raise SystemExit(f"{args.setup}: unknown keys {sorted(unknown)}")
    if args.prompts:
        with open(args.prompts) as f:
            text = f.read()
        listed = json.loads(text) if args.prompts.endswith(".json") else None
        chosen["prompts"] = listed["prompts"] if listed else [line.strip() for line in text.splitlines() if line.strip()]
        if listed and "seeds" in listed:
            chosen["seeds"] = listed["seeds"]
    if args.model == "bench" and "prompts" not in chosen:
        with open(HELDOUT_FILE) as f:
            chosen = {**json.load(f), **chosen}
    for name, kind in (("seeds", int), ("policies", str), ("taus", float)):
        if getattr(args, name):
            chosen[name] = _listed(getattr(args, name), kind)
    for name in ("frames", "steps"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    model = builtin.MODELS[args.model]
    return (list(chosen.get("prompts", PROMPTS)), list(chosen.get("seeds", SEEDS)), list(chosen.get("policies", POLICIES)),
            list(chosen.get("taus", TAUS)), chosen.get("frames", 48), chosen.get("steps", model.steps))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(builtin.MODELS), default="tiny", help="the built-in model")
    parser.add_argument("--setup", help="a JSON file with any of prompts, seeds, policies, taus, frames, steps")
    parser.add_argument("--prompts", help="a text file, one prompt a line, or a JSON file with 'prompts' (and 'seeds')")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--policies", help="comma-separated: teacache, flowcache, motion/<proxy>, "
                                           "motion_detail/<combine>/<proxy>, hybrid/<combine>/<proxy>, released, "
                                           "each with any +<option>=<value> (default: all)")
    parser.add_argument("--taus", help="comma-separated thresholds, every policy's sweep (default "
                                       f"{','.join(map(str, TAUS))})")
    parser.add_argument("--frames", type=int, help="video frames (default 48)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's, 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one prompt and seed, two thresholds, one repeat")
    parser.add_argument("--calibrate", action="store_true",
                        help="only the presets' policy over a fine τ grid, and the presets it suggests")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the results (default: bench/results)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = builtin.MODELS[args.model]
    prompts, seeds, policies, taus, frames, steps = setup(args)
    repeats = args.repeats
    if args.quick:
        prompts, seeds, repeats, taus = prompts[:1], seeds[:1], 1, TAUS[2:4]
    family = family_policy(PRESET_SPEC, 0.1)[0]
    try:
        configs = configurations(taus, policies)
    except ValueError as error:
        raise SystemExit(str(error))
    if args.calibrate:
        configs = [configs[0]] + [Row(family, tau, CachePolicy.preset_family(tau)) for tau in CALIBRATION_TAUS]
    rows = run(configs, prompts, seeds, frames, steps, repeats, model=model)
    header = (f"{'Tiny' if model is builtin.TINY else 'Benchmark'} MAGI-1 model (built-in, `--model {model.name}`), "
              f"{len(prompts)} prompts x {len(seeds)} seeds ({', '.join(map(str, seeds))}), {frames} frames "
              f"{model.size}x{model.size}, {steps} steps, CPU ({torch.get_num_threads()} threads), wall time the "
              f"median of {repeats} rounds. Every policy: warm-up {COMMON['warmup_steps']}, chunk-level "
              f"{COMMON['chunk_wise_steps']}, final full {COMMON['final_full_steps']} steps, "
              f"max_reuse {COMMON['max_reuse']}. PSNR seed spread: the range of the per-seed mean PSNRs.")
    results_name, calibration_name = RESULT_NAMES[model.name]
    if args.calibrate:
        report = "\n\n".join([header, table(rows), calibration(rows, family)])
        name, title = calibration_name + ".md", f"# Preset calibration on the {model.name} model"
    else:
        report = "\n\n".join([header, table(rows), "Quality at equal FLOP savings (interpolated):", equal_flops(rows),
                                "Quality at equal wall speed-ups (interpolated):", equal_cost(rows, "speedup")])
        if any(r.family.startswith("motion_detail") for r in rows):
            report += ("\n\n" + f"Best MotionDetailCache variant at equal FLOPs: **{best_family(rows)}**. The presets "
                       "come from a finer τ sweep of the presets' policy on the benchmark model's calibration "
                       "set: `python -m bench.quality.policies --model bench --prompts bench/setups/calibration.json "
                       "--calibrate` (bench/results/calibration_bench.md).")
        name, title = results_name + ".md", f"# Cache policies on the {model.name} model"
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        f.write(title + "\n\n" + report + "\n")
    if not args.calibrate:
        try:
            plot(rows, os.path.join(args.out, results_name + ".png"))
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
    return rows


if __name__ == "__main__":
    main()
