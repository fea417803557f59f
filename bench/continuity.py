"""Do a model's chunks continue each other? Each prompt's object is found by its colour in every frame,
and the jump of its position across a chunk boundary is compared with its motion from frame to frame
inside chunks; the overall displacement is checked against the caption's direction.

    python -m bench.continuity                              # the tiny model, its default prompts, seeds 0 and 1
    python -m bench.continuity --prompts prompts.txt --seeds 0,1,2 --frames 96

A boundary is "continuous" when its jump is at most ``--tolerance`` (2) times the median within-chunk
motion per frame (a floor of half a pixel keeps a still object's ratio finite). Generations run without
a cache: this measures the model, not the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

import magi1
from magi1 import tiny
from train.scenes import COLORS

CHUNK_FRAMES = 24  # decoded frames per chunk (6 latent frames, 4 frames each)
DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
DEFAULT_PROMPTS = [f"a {color} ball {motion} over a {background}"
                   for color in ("red", "yellow") for motion in DIRECTIONS for background in ("checkerboard", "gray wall")]


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


def boundary_ratios(track, chunk_frames=CHUNK_FRAMES, floor=0.5):
    """Jump across every chunk boundary over the median within-chunk step (both in pixels per frame);
    None for a boundary where the object is lost on either side, or if it is never tracked inside chunks."""
    steps = (track[1:] - track[:-1]).norm(dim=1)  # step f: frame f -> f + 1
    inside = [float(s) for f, s in enumerate(steps) if (f + 1) % chunk_frames and math.isfinite(float(s))]
    if not inside:
        return [None] * ((track.shape[0] - 1) // chunk_frames)
    per_frame = max(statistics.median(inside), floor)
    ratios = []
    for boundary in range(chunk_frames, track.shape[0], chunk_frames):
        jump = float(steps[boundary - 1])
        ratios.append(jump / per_frame if math.isfinite(jump) else None)
    return ratios


def direction_matches(track, motion, min_shift=2.0):
    """Whether the object's overall displacement goes the caption's way (by at least ``min_shift`` pixels,
    more along that axis than across it); None for a caption without a direction or an untracked object."""
    if motion not in DIRECTIONS:
        return None
    seen = track[torch.isfinite(track).all(dim=1)]
    if seen.shape[0] < 2:
        return None
    dx, dy = (seen[-1] - seen[0]).tolist()
    along = dx * DIRECTIONS[motion][0] + dy * DIRECTIONS[motion][1]
    across = abs(dy) if DIRECTIONS[motion][0] else abs(dx)
    return along >= min_shift and along > across


ENTERING = {"entering from the left": "moving right", "entering from the right": "moving left",
            "entering from the top": "moving down", "entering from the bottom": "moving up"}


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


def tiny_video(prompt, seed, frames):
    dit, vae, encoder = tiny.load_tiny_dit(), tiny.load_tiny_vae(), tiny.load_tiny_text_encoder()
    states, mask = encoder.encode(prompt)
    chunks = magi1.VideoLayout.plan(frames, tiny.SIZE, tiny.SIZE).chunk_num
    caption, caption_mask = magi1.chunk_captions(states, mask, chunks, tiny.tiny_special_tokens(),
                                                 length=dit.config.caption_max_length)
    result = magi1.generate(dit, caption, caption_mask, frames=frames, height=tiny.SIZE, width=tiny.SIZE,
                            steps=tiny.STEPS, seed=seed)
    return vae.decode(result.latent)


def report(rows, tolerance):
    """Lines summing up ``rows`` of (prompt, seed, ratios, direction match)."""
    ratios = [r for _, _, rs, _ in rows for r in rs if r is not None]
    lost = sum(r is None for _, _, rs, _ in rows for r in rs)
    directions = [d for *_, d in rows if d is not None]
    continuous = [all(r is not None and r <= tolerance for r in rs) for _, _, rs, _ in rows]
    lines = [f"{len(rows)} tracked objects, {len(ratios) + lost} chunk boundaries ({lost} with the object lost)"]
    if ratios:
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        lines.append(f"boundary jump / within-chunk motion per frame: median {q[1]:.2f}, quartiles {q[0]:.2f}-{q[2]:.2f}, "
                     f"max {max(ratios):.2f}; {sum(r <= tolerance for r in ratios) / len(ratios):.0%} of boundaries "
                     f"<= {tolerance:g}")
    lines.append(f"objects whose every boundary is <= {tolerance:g}: {sum(continuous) / len(rows):.0%}")
    if directions:
        lines.append(f"motion direction matches the caption: {sum(directions)}/{len(directions)} "
                     f"({sum(directions) / len(directions):.0%})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", help="a text file, one prompt a line, or a JSON file with 'prompts' (and "
                                          "'seeds'), such as train/bench_heldout.json (default: 16 built-in prompts)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--frames", type=int, default=96, help="video frames (24 per chunk)")
    parser.add_argument("--tolerance", type=float, default=2.0)
    args = parser.parse_args(argv)
    prompts, seeds = DEFAULT_PROMPTS, [int(s) for s in args.seeds.split(",")]
    if args.prompts:
        with open(args.prompts) as f:
            text = f.read()
        if args.prompts.endswith(".json"):
            listed = json.loads(text)
            prompts, seeds = listed["prompts"], listed.get("seeds", seeds)
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    rows = []  # one per prompt, seed and object
    for prompt in prompts:
        objects = caption_objects(prompt)
        if not objects:
            raise SystemExit(f"the prompt {prompt!r} names no colour the tracker knows ({', '.join(COLORS)})")
        for seed in seeds:
            video = tiny_video(prompt, seed, args.frames)
            for color, motion in objects:
                track = object_track(video, COLORS[color])
                ratios, direction = boundary_ratios(track), direction_matches(track, motion)
                rows.append((prompt, seed, ratios, direction))
                shown = ", ".join("lost" if r is None else f"{r:.1f}" for r in ratios)
                print(f"{prompt!r} seed {seed}, the {color} object: boundary ratios {shown}; direction "
                      f"{'-' if direction is None else ('ok' if direction else 'wrong')}", flush=True)
    print("\n".join(["", "tiny model, no cache:"] + report(rows, args.tolerance)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
