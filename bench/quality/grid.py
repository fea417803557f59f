"""The cache policies on a dense τ grid, video by video: a measurement that can rank policies.

    python -m bench.quality.grid --setup bench/setups/grid_heldout.json            # run (resumes), then report
    python -m bench.quality.grid --setup bench/setups/grid_heldout.json --report   # the report of what is done

Every (prompt, seed) of the setup is generated once without a cache (the reference), then by every policy
at every τ of its grid; each video's numbers go to a JSON-lines file as soon as they are measured
(``bench/results/<setup name>.jsonl``), so an interrupted run resumes where it stopped, and the report can
be made from a partial run (it says how many videos each point has).

Per video: the FLOPs spent and the dense run's, the wall time, and its quality against the reference:

* PSNR and SSIM over all frames (as ``bench.quality.policies``);
* **first-chunk PSNR**: over the first chunk's 24 frames only. Attention is causal in chunks, so the first
  chunk's error is the cache's own: no earlier chunk's difference carries into it;
* **moving / static PSNR**: over the pixels that change between the reference's frames far more than its
  median change (its moving objects and pans) and over the half that change least, apart (``motion_regions``).

The report (``bench/results/<setup name>.md``) gives, per policy and τ, the means and the seed spread (the
range of the per-seed means); and at fixed FLOP ratios, each policy's PSNR read between its two
measured τ that bracket the ratio, **only where they are at most** ``MAX_GAP`` **apart** in FLOP ratio
("not measured" otherwise, never bridged), and its paired difference from the default policy over the same
videos with a 95% interval (the videos are the same, so the interval is far tighter than the seed spread).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import magi1
from magi1 import builtin
from magi1.sampling.layout import frames_made

from .metrics import psnr, ssim
from .policies import HERE, PRESET_SPEC, family_policy

MAX_GAP = 0.25  # FLOP ratio: the widest gap between two measured points that a value is read across
RATIOS = (1.2, 1.25, 1.33, 1.5, 1.75, 2.0, 2.25, 2.4, 2.5, 3.0, 3.5, 4.0)
BLOCK = 4  # pixels: motion is measured on blocks of BLOCK x BLOCK
MOVING_FACTOR = 4.0  # a block moves where it changes by more than this times the median change
CEILING_DB = 99.0  # identical videos count as this
OFF = "off"  # the reference's records


# ------------------------------------------------------------------------------------------------- measure
def region_psnr(video, reference, mask):
    """PSNR over the pixels of ``mask`` (``[F, H, W]`` bool, broadcast over channels); None when empty."""
    n = int(mask.sum()) * video.shape[0]
    if n == 0:
        return None
    se = (video.double() - reference.double()).pow(2) * mask
    mse = float(se.sum()) / n
    return CEILING_DB if mse == 0 else min(10 * math.log10(4.0 / mse), CEILING_DB)


def motion_regions(reference):
    """``(moving, static)`` masks ``[F, H, W]`` of the reference: where its 4x4 blocks change between frames
    (to the frame before or after) by more than ``MOVING_FACTOR`` times the median change, and where by at most
    the median. Relative to the median, not a fixed threshold: generated videos flicker everywhere a little,
    by different amounts per model."""
    blocks = F.avg_pool2d(reference.mean(dim=0), BLOCK)  # [F, H/4, W/4]
    step = (blocks[1:] - blocks[:-1]).abs()
    change = torch.zeros_like(blocks)
    change[1:] = step
    change[:-1] = torch.maximum(change[:-1], step)
    change = change.repeat_interleave(BLOCK, dim=1).repeat_interleave(BLOCK, dim=2)
    median = float(change.median())
    return change > MOVING_FACTOR * median, change <= median


def video_scores(video, reference, chunk_frames):
    moving, static = motion_regions(reference)
    first = slice(0, min(chunk_frames, video.shape[1]))
    return dict(psnr=min(psnr(video, reference), CEILING_DB), ssim=ssim(video, reference),
                first_chunk_psnr=min(psnr(video[:, first], reference[:, first]), CEILING_DB),
                moving_psnr=region_psnr(video, reference, moving), static_psnr=region_psnr(video, reference, static))


def _append(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_setup(path):
    with open(path) as f:
        setup = json.load(f)
    if not setup.get("prompts") or not setup.get("seeds") or not setup.get("policies"):
        raise SystemExit(f"{path}: a grid setup needs prompts, seeds and policies (each with its taus)")
    return setup


def done_keys(path):
    keys = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    keys.add((r["policy"], r["tau"], r["prompt"], r["seed"]))
    return keys


def run(setup, out_path, log=print):
    """Measure every (prompt, seed) x (policy, τ) not yet in ``out_path``, appending a line per video."""
    model = builtin.MODELS[setup.get("model", "bench")]
    frames, steps = setup.get("frames", 48), setup.get("steps", model.steps)
    dit, vae, encoder = model.load_dit(), model.load_vae(), model.load_text_encoder()
    base = magi1.VideoRequest(frames=frames, height=model.size, width=model.size, steps=steps)
    chunk_frames = frames_made(base.chunk_width)  # the first chunk's video frames
    grid = [(entry["policy"], tau) for entry in setup["policies"] for tau in entry["taus"]]
    for spec, tau in grid:  # before anything runs: "released" has its own step count and its own off
        if family_policy(spec, tau)[2] is not None:
            raise SystemExit(f"{spec}: the grid compares every policy at the setup's {steps} steps; run it with "
                             "python -m bench.quality.policies")
    done = done_keys(out_path)
    for p, prompt in enumerate(setup["prompts"]):
        caption = magi1.chunk_captions(*encoder.encode(prompt), base.chunks, model.special_tokens())
        for seed in setup["seeds"]:
            todo = [(spec, tau) for spec, tau in grid if (spec, tau, p, seed) not in done]
            if not todo:
                continue
            request = base.with_changes(caption=caption[0], caption_mask=caption[1], seed=seed)
            began = time.perf_counter()
            off = magi1.generate(dit, request)
            off_wall = time.perf_counter() - began
            reference = vae.decode(off.latent)
            if (OFF, 0.0, p, seed) not in done:  # the reference's own record: its wall time
                _append(out_path, dict(policy=OFF, tau=0.0, prompt=p, seed=seed, flops=off.stats.flops,
                                       dense_flops=off.stats.dense_flops, wall=off_wall, computed=1.0,
                                       **video_scores(reference, reference, chunk_frames)))
            for spec, tau in todo:
                _, policy, _ = family_policy(spec, tau)
                began = time.perf_counter()
                result = magi1.generate(dit, request.with_changes(policy=policy))
                wall = time.perf_counter() - began
                video = vae.decode(result.latent)
                stats = result.stats
                record = dict(policy=spec, tau=tau, prompt=p, seed=seed, flops=stats.flops,
                              dense_flops=stats.dense_flops, wall=wall,
                              computed=stats.token_steps_computed / stats.token_steps_total,
                              **video_scores(video, reference, chunk_frames))
                _append(out_path, record)
            log(f"prompt {p + 1}/{len(setup['prompts'])} seed {seed}: {len(todo)} videos")


# -------------------------------------------------------------------------------------------------- report
def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def points(records):
    """``{policy: [(tau, flop ratio, {(prompt, seed): record}), ...]}`` sorted by FLOP ratio."""
    by_point = {}
    for r in records:
        by_point.setdefault((r["policy"], r["tau"]), {})[(r["prompt"], r["seed"])] = r
    out = {}
    for (spec, tau), videos in by_point.items():
        ratio = sum(v["dense_flops"] for v in videos.values()) / sum(v["flops"] for v in videos.values())
        out.setdefault(spec, []).append((tau, ratio, videos))
    return {spec: sorted(rows, key=lambda row: row[1]) for spec, rows in out.items()}


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def seed_spread(videos, key):
    by_seed = {}
    for (_, seed), r in videos.items():
        if r[key] is not None:
            by_seed.setdefault(seed, []).append(r[key])
    means = [statistics.mean(v) for v in by_seed.values()]
    return max(means) - min(means) if len(means) > 1 else 0.0


def bracket(rows, ratio, max_gap=MAX_GAP):
    """The two measured points around ``ratio`` and the weight of the upper one, or None when the ratio is
    outside the measured range or the points are more than ``max_gap`` apart (a point within 0.02 of the
    ratio counts alone)."""
    for tau, r, videos in rows:
        if abs(r - ratio) <= 0.02:
            return (tau, r, videos), (tau, r, videos), 0.0
    for low, high in zip(rows, rows[1:]):
        if low[1] <= ratio <= high[1]:
            if high[1] - low[1] > max_gap:
                return None
            return low, high, (ratio - low[1]) / (high[1] - low[1])
    return None


def at_ratio(rows, ratio, key="psnr"):
    """``{video: value}`` read at ``ratio`` between the bracketing points, over the videos both measured."""
    found = bracket(rows, ratio)
    if found is None:
        return None
    low, high, w = found
    shared = set(low[2]) & set(high[2])
    values = {}
    for video in shared:
        a, b = low[2][video][key], high[2][video][key]
        if a is not None and b is not None:
            values[video] = a + (b - a) * w
    return values


def paired(values, reference):
    """Mean of ``values - reference`` over their shared videos, and its 95% half-width (t ~ 2)."""
    shared = sorted(set(values) & set(reference))
    if len(shared) < 2:
        return None
    diffs = [values[v] - reference[v] for v in shared]
    return statistics.mean(diffs), 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)


def point_table(table_points, off):
    lines = ["| policy | τ | videos | FLOP ratio | wall speed-up | computed | PSNR dB | seed spread | SSIM | "
             "first-chunk PSNR | moving PSNR | static PSNR |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, rows in table_points.items():
        for tau, ratio, videos in rows:
            v = list(videos.values())
            lines.append(
                f"| {spec} | {tau:g} | {len(v)} | {ratio:.2f}x | {_wall_speedup(videos, off):.2f}x | "
                f"{_mean(r['computed'] for r in v):.0%} | {_mean(r['psnr'] for r in v):.1f} | "
                f"{seed_spread(videos, 'psnr'):.1f} | {_mean(r['ssim'] for r in v):.4f} | "
                f"{_mean(r['first_chunk_psnr'] for r in v):.1f} | {_fmt(_mean(r['moving_psnr'] for r in v))} | "
                f"{_fmt(_mean(r['static_psnr'] for r in v))} |")
    return "\n".join(lines)


def _wall_speedup(videos, off):
    """The reference's wall time over the policy's, summed over the same videos."""
    shared = [v for v in videos if v in off]
    spent = sum(videos[v]["wall"] for v in shared)
    return sum(off[v]["wall"] for v in shared) / spent if spent else float("nan")


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def equal_cost_table(table_points, default, key="psnr", ratios=RATIOS):
    """Per FLOP ratio: each policy's mean ``key`` there (or "not measured") and its paired difference from
    ``default`` (or another baseline) over the same videos (95% interval)."""
    specs = list(table_points)
    head = "| FLOP ratio | " + " | ".join(specs) + " |"
    lines = [head, "|---|" + "---|" * len(specs)]
    for ratio in ratios:
        base = at_ratio(table_points.get(default, []), ratio, key)
        cells = []
        for spec in specs:
            values = at_ratio(table_points[spec], ratio, key)
            if not values:
                cells.append("not measured")
                continue
            cell = f"{statistics.mean(values.values()):.1f}"
            if spec != default and base:
                diff = paired(values, base)
                if diff is not None:
                    cell += f" ({diff[0]:+.1f} ± {diff[1]:.1f})"
            cells.append(cell)
        lines.append(f"| {ratio:g}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedup_at_quality(rows, bar, key="psnr", seed=None):
    """The largest FLOP ratio at which the policy's mean ``key`` (over one seed's videos, or all) is at least
    ``bar``: a measured point, or read between two neighbours at most ``MAX_GAP`` apart where the mean
    crosses the bar. Where the crossing lies in a wider gap, ``(low, high)``: somewhere in between, not
    measured. None when no point reaches the bar."""
    def mean_at(videos):
        values = [r[key] for (_, s), r in videos.items() if (seed is None or s == seed) and r[key] is not None]
        return statistics.mean(values) if values else None

    measured = [(ratio, mean_at(videos)) for _, ratio, videos in rows]
    measured = [(r, q) for r, q in measured if q is not None]
    best = None
    for i, (ratio, quality) in enumerate(measured):
        if quality >= bar:
            best = ratio
            if i + 1 < len(measured) and measured[i + 1][1] < bar:
                (r1, q1) = measured[i + 1]
                if r1 - ratio > MAX_GAP:
                    best = (ratio, r1)
                else:
                    best = ratio + (r1 - ratio) * (quality - bar) / (quality - q1)
    return best


def _speedup_text(value):
    if value is None:
        return "below the bar"
    if isinstance(value, tuple):
        return f"{value[0]:.2f}x to {value[1]:.2f}x (not measured between)"
    return f"{value:.2f}x"


def quality_bar_table(table_points, seeds, bars=(35.0, 30.0, 25.0)):
    lines = ["| policy | " + " | ".join(f"at >= {bar:g} dB (per seed)" for bar in bars) + " |",
             "|---|" + "---|" * len(bars)]
    for spec, rows in table_points.items():
        cells = []
        for bar in bars:
            per_seed = [speedup_at_quality(rows, bar, seed=seed) for seed in seeds]
            cells.append(f"{_speedup_text(speedup_at_quality(rows, bar))} ("
                         + ", ".join(_speedup_text(v) for v in per_seed) + ")")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(setup, records, name):
    off = {(r["prompt"], r["seed"]): r for r in records if r["policy"] == OFF}
    table_points = points([r for r in records if r["policy"] != OFF])
    default = setup.get("default", PRESET_SPEC)
    default = default if default in table_points else None
    videos = set(off)
    lines = [f"# {name}: the cache policies on a dense τ grid", "",
             f"`python -m bench.quality.grid --setup bench/setups/{name}.json`: {setup.get('about', '')}", "",
             f"{len(videos)} videos ({len(setup['prompts'])} prompts x {len(setup['seeds'])} seeds in the setup), "
             f"{setup.get('frames', 48)} frames, {setup.get('steps', 16)} steps, built-in `{setup.get('model', 'bench')}` "
             f"model, CPU (2 cores). Seed spread: the range of the per-seed mean PSNRs. Wall speed-up: the "
             "reference runs' wall time over the policy's, on the same videos (one run each).", "",
             "## Every point", "", point_table(table_points, off), "",
             "## Speed-up at equal quality", "",
             "The largest FLOP ratio whose mean PSNR against no cache is at least the bar (over all videos, and "
             "per seed), read between measured points only where they are at most "
             f"{MAX_GAP}x apart.", "", quality_bar_table(table_points, setup["seeds"]), ""]
    for key, title in (("psnr", "PSNR"), ("first_chunk_psnr", "first-chunk PSNR (the cache's own error)"),
                       ("moving_psnr", "moving-region PSNR"), ("static_psnr", "static-region PSNR")):
        lines += [f"## {title} at equal FLOP ratio", "",
                  f"Read between the two measured τ around each ratio when they are at most {MAX_GAP}x apart, "
                  "else not measured; in brackets the paired difference from the default over the same videos "
                  "with its 95% interval.", "", equal_cost_table(table_points, default, key) if default else
                  "(the default policy is not in this run)", ""]
    for base in setup.get("baselines", []):  # more paired comparisons, against other policies of the run
        if base in table_points:
            lines += [f"## PSNR at equal FLOP ratio against {base}", "", equal_cost_table(table_points, base), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.quality.grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", required=True, help="a JSON file: prompts, seeds, policies (each with taus), "
                        "model, frames, steps, default (the policy the others are compared with)")
    parser.add_argument("--report", action="store_true", help="only write the report of what is measured")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the results")
    args = parser.parse_args(argv)
    setup = load_setup(args.setup)
    name = os.path.splitext(os.path.basename(args.setup))[0]
    jsonl = os.path.join(args.out, name + ".jsonl")
    if not args.report:
        run(setup, jsonl)
    text = report(setup, read_records(jsonl), name)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
