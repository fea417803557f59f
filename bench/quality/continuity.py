"""Do a model's chunks continue each other? Every object a prompt names is found by its colour in every
frame, the jump of its position across each chunk boundary is compared with its motion inside chunks, and
its overall displacement with the caption's direction.

    python -m bench.quality.continuity --model tiny      # 16 built-in prompts, seeds 0 and 1 (bench/results/continuity_tiny.txt)
    python -m bench.quality.continuity --model bench     # the held-out set, train/bench_heldout.json (bench/results/continuity_bench.txt)
    python -m bench.quality.continuity --model bench --prompts prompts.txt --seeds 0,1,2 --frames 96

Positions are measured per latent frame (the mean over the four decoded frames each latent frame gives):
the VAE decodes a latent frame into four nearly equal frames, so decoded motion is a staircase whose
frame-to-frame median badly underestimates the motion (real scenes passed through the VAE score a median
ratio of about 3.6 per decoded frame, and 1.1 per latent frame). A boundary is "continuous" when its
jump is at most ``--tolerance`` (2) times the median within-chunk step (a floor of half a pixel per frame
keeps a still object's ratio finite). The per-decoded-frame ratio is printed as well, for comparison.
``--reference`` measures real scenes of the model's training distribution, as rendered and through the
VAE: the ceiling a model can reach. Generations run without a cache: this measures the model, not the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

import magi1
from bench.quality.metrics import psnr
from magi1 import builtin
from train import bench_scenes, scenes
from train.benchmark_model import HELDOUT_FILE
from train.scenes import COLORS

CHUNK_FRAMES = 24  # decoded frames per chunk (6 latent frames)
LATENT_FRAMES = 4  # decoded frames per latent frame
DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
ENTERING = {"entering from the left": "moving right", "entering from the right": "moving left",
            "entering from the top": "moving down", "entering from the bottom": "moving up"}
TINY_PROMPTS = [f"a {color} ball {motion} over a {background}"
                for color in ("red", "yellow") for motion in DIRECTIONS for background in ("checkerboard", "gray wall")]
# How each model's training scenes move a camera pan's objects in the frame (frame widths per second):
# the tiny model's sprites stay put on screen, the benchmark's objects live in the panned world.
PAN_SPEEDS = {"tiny": 0.0, "bench": bench_scenes.PAN_SPEED}
SCENE_BATCHES = {"tiny": scenes.scene_batch, "bench": bench_scenes.scene_batch}


def object_track(video, rgb, *, threshold=0.3, min_pixels=2.0):
    """The object's centre per frame ``(frames, 2)`` as (x, y) in pixels: the centroid of the pixels near
    colour ``rgb`` (0..1), weighted by closeness; NaN in frames where it is not found. ``video`` is
    ``[3, frames, H, W]`` in [-1, 1]."""
    pixels = (video.float().clamp(-1, 1) + 1) / 2
    distance = (pixels - torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1, 1)).norm(dim=0)  # (F, H, W)
    weight = (1 - distance / threshold).clamp(min=0)
    mass = weight.sum(dim=(1, 2))
    ys = torch.arange(video.shape[2], dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(video.shape[3], dtype=torch.float32).view(1, 1, -1)
    centre = torch.stack([(weight * xs).sum(dim=(1, 2)), (weight * ys).sum(dim=(1, 2))], dim=1) / mass[:, None]
    centre[mass < min_pixels] = float("nan")
    return centre


def boundary_ratios(track, chunk_frames=CHUNK_FRAMES, group=LATENT_FRAMES, floor=0.5):
    """Jump across every chunk boundary over the median within-chunk step, with positions averaged over
    ``group`` frames (1: per decoded frame); None for a boundary where the object is lost on either side,
    or if it is never tracked inside chunks. ``floor``: the smallest motion per frame, in pixels."""
    frames = track.shape[0] // group * group
    position = track[:frames].reshape(-1, group, 2).mean(dim=1)  # NaN if lost in any of the group's frames
    steps = (position[1:] - position[:-1]).norm(dim=1)  # step i: position i -> i + 1
    per_chunk = chunk_frames // group
    boundaries = range(per_chunk, position.shape[0], per_chunk)
    inside = [float(s) for i, s in enumerate(steps) if (i + 1) % per_chunk and math.isfinite(float(s))]
    if not inside:
        return [None] * len(boundaries)
    per_step = max(statistics.median(inside), floor * group)
    jumps = [float(steps[b - 1]) for b in boundaries]
    return [jump / per_step if math.isfinite(jump) else None for jump in jumps]


def direction_matches(track, motion, min_shift=2.0, pan_shift=(0.0, 0.0)):
    """Whether the object's overall displacement goes the caption's way (by at least ``min_shift`` pixels,
    more along that axis than across it); None for a caption without a direction or an untracked object.
    ``pan_shift``: how far a camera pan moves a still object in the frame per frame (pixels), taken out."""
    if motion not in DIRECTIONS:
        return None
    seen = torch.isfinite(track).all(dim=1).nonzero().flatten()
    if seen.numel() < 2:
        return None
    first, last = int(seen[0]), int(seen[-1])
    dx, dy = (track[last] - track[first] - (last - first) * torch.tensor(pan_shift)).tolist()
    along = dx * DIRECTIONS[motion][0] + dy * DIRECTIONS[motion][1]
    across = abs(dy) if DIRECTIONS[motion][0] else abs(dx)
    return along >= min_shift and along > across


def caption_objects(prompt):
    """``(colour, motion)`` of every object a caption names, in the tiny model's phrasing ("a red ball moving
    right over ...") or the benchmark model's ("a red ball moving left quickly then stopping and a blue
    square entering from the top slowly over ..."); motion is a ``DIRECTIONS`` key or None (still)."""
    objects = prompt.split(",")[0]
    for where in (" over a", " over an", " in front of", " in the", " in a "):
        objects = objects.split(where)[0]
    found = []
    for part in objects.split(" and "):
        color = next((c for c in COLORS if f" {c} " in f" {part} "), None)
        if color is None:
            continue
        motion = next((m for m in DIRECTIONS if m in part), None)
        motion = next((m for phrase, m in ENTERING.items() if phrase in part), motion)
        found.append((color, motion))
    return found


def caption_pan(prompt):
    """+1 for "the camera pans right", -1 for left, 0 for a static camera."""
    return 1 if "camera pans right" in prompt else -1 if "camera pans left" in prompt else 0


def generate_video(model, prompt, seed, frames):
    """Decoded video ``[3, F, H, W]`` of a built-in model (no cache)."""
    dit, vae, encoder = model.load_dit(), model.load_vae(), model.load_text_encoder()
    states, mask = encoder.encode(prompt)
    request = magi1.VideoRequest(frames=frames, height=model.size, width=model.size, steps=model.steps, seed=seed)
    caption, caption_mask = magi1.chunk_captions(states, mask, request.chunks, model.special_tokens(),
                                                 length=dit.config.caption_max_length)
    result = magi1.generate(dit, request.with_changes(caption=caption, caption_mask=caption_mask))
    return vae.decode(result.latent)


def measure(video, prompt, pan_speed):
    """Rows ``(colour, latent-frame ratios, decoded-frame ratios, direction match)`` for each object."""
    size = video.shape[-1]
    pan_shift = (-caption_pan(prompt) * pan_speed * size / bench_scenes.FPS, 0.0)  # a right pan slides all left
    rows = []
    for color, motion in caption_objects(prompt):
        track = object_track(video, COLORS[color])
        rows.append((color, boundary_ratios(track), boundary_ratios(track, group=1),
                     direction_matches(track, motion, pan_shift=pan_shift)))
    return rows


def report(rows, tolerance):
    """Lines summing up ``rows`` of (prompt, seed, ratios, direction match)."""
    ratios = [r for _, _, rs, _ in rows for r in rs if r is not None]
    lost = sum(r is None for _, _, rs, _ in rows for r in rs)
    directions = [d for *_, d in rows if d is not None]
    videos = {}  # (prompt, seed) -> the tracked ratios of all its objects
    for prompt, seed, rs, _ in rows:
        videos.setdefault((prompt, seed), []).extend(r for r in rs if r is not None)
    tracked = [all(r <= tolerance for r in rs) for rs in videos.values() if rs]
    by_prompt = {}  # prompt -> the tracked ratios of all its videos
    for (prompt, _), rs in videos.items():
        by_prompt.setdefault(prompt, []).extend(rs)
    typical = [statistics.median(rs) <= tolerance for rs in by_prompt.values() if rs]
    lines = [f"{len(rows)} objects in {len(videos)} videos, {len(ratios) + lost} chunk boundaries ({lost} with the "
             "object lost: out of the frame, or not drawn)"]
    if ratios:
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        lines.append(f"boundary jump / within-chunk motion: median {q[1]:.2f}, quartiles {q[0]:.2f}-{q[2]:.2f}, "
                     f"max {max(ratios):.2f}; {sum(r <= tolerance for r in ratios) / len(ratios):.0%} of boundaries "
                     f"<= {tolerance:g}")
    if typical:
        lines.append(f"prompts whose median boundary ratio is <= {tolerance:g}: {sum(typical)}/{len(typical)} "
                     f"({sum(typical) / len(typical):.0%})")
    if tracked:
        lines.append(f"videos whose every tracked boundary is <= {tolerance:g}: {sum(tracked)}/{len(tracked)} "
                     f"({sum(tracked) / len(tracked):.0%})")
    if directions:
        lines.append(f"motion direction matches the caption: {sum(directions)}/{len(directions)} "
                     f"({sum(directions) / len(directions):.0%})")
    return lines


def summary(title, rows, tolerance):
    """Both measures of ``rows`` ``(prompt, seed, colour, latent ratios, frame ratios, direction)``."""
    per_latent = [(p, s, latent, d) for p, s, _, latent, _, d in rows]
    per_frame = [(p, s, frame, d) for p, s, _, _, frame, d in rows]
    return ["", f"{title}, per latent frame:"] + report(per_latent, tolerance) + \
        [f"{title}, per decoded frame (the VAE's staircase inflates it):"] + report(per_frame, tolerance)[1:2]


def _show(ratios):
    return ", ".join("lost" if r is None else f"{r:.1f}" for r in ratios)


def prompt_set(args):
    """Prompts and seeds: ``--prompts`` (text or JSON), else the model's default set."""
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0, 1]
    if not args.prompts:
        if args.model == "tiny":
            return TINY_PROMPTS, seeds
        args.prompts = HELDOUT_FILE
    with open(args.prompts) as f:
        text = f.read()
    if args.prompts.endswith(".json"):
        listed = json.loads(text)
        return listed["prompts"], seeds if args.seeds else listed.get("seeds", seeds)
    return [line.strip() for line in text.splitlines() if line.strip()], seeds


def reference_videos(model, count, frames, seed=12345):
    """``count`` real scenes of the model's training distribution: ``(caption, rendered, through the VAE)``."""
    vae = model.load_vae()
    for index in range(count):
        videos, captions = SCENE_BATCHES[model.name](seed + index, 1, frames, model.size)
        yield captions[0], videos[0], vae.decode(vae.encode(videos[0]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(builtin.MODELS), default="tiny", help="the built-in model")
    parser.add_argument("--prompts", help="a text file, one prompt a line, or a JSON file with 'prompts' (and "
                                          "'seeds'); default: 16 prompts for tiny, train/bench_heldout.json for bench")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the JSON file's, else 0,1)")
    parser.add_argument("--frames", type=int, default=96, help="video frames (24 per chunk)")
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--reference", type=int, default=0, metavar="N",
                        help="also measure N real scenes of the model's training distribution, rendered and through "
                             "the VAE (the ceiling)")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    model, pan_speed = builtin.MODELS[args.model], PAN_SPEEDS[args.model]
    prompts, seeds = prompt_set(args)
    for prompt in prompts:
        if not caption_objects(prompt):
            raise SystemExit(f"the prompt {prompt!r} names no colour the tracker knows ({', '.join(COLORS)})")
    lines = [f"# python -m bench.quality.continuity --model {args.model} ({len(prompts)} prompts, seeds "
             f"{','.join(map(str, seeds))}, {args.frames} frames, no cache)"]

    def note(line):
        print(line, flush=True)
        lines.append(line)

    rows, real, through_vae = [], [], []
    for prompt in prompts:
        for seed in seeds:
            for color, latent, frame, direction in measure(generate_video(model, prompt, seed, args.frames), prompt,
                                                           pan_speed):
                rows.append((prompt, seed, color, latent, frame, direction))
                note(f"{prompt!r} seed {seed}, the {color} object: boundary ratios {_show(latent)} (per decoded "
                     f"frame {_show(frame)}); direction {'-' if direction is None else 'ok' if direction else 'wrong'}")
    reconstruction = []  # PSNR of each real scene through the VAE: is the model's VAE good enough for its scenes?
    for caption, rendered, decoded in reference_videos(model, args.reference, args.frames):
        real += [(caption, 0, *row) for row in measure(rendered, caption, pan_speed)]
        through_vae += [(caption, 0, *row) for row in measure(decoded, caption, pan_speed)]
        reconstruction.append(psnr(decoded.clamp(-1, 1), rendered))
    for line in summary(f"{args.model} model, no cache", rows, args.tolerance):
        note(line)
    if args.reference:
        for title, reference in ((f"{args.reference} real scenes as rendered", real),
                                 ("the same scenes through the VAE", through_vae)):
            for line in summary(title, reference, args.tolerance):
                note(line)
        note(f"the VAE's reconstruction of these scenes: PSNR median {statistics.median(reconstruction):.1f} dB "
             f"(range {min(reconstruction):.1f}-{max(reconstruction):.1f})")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
