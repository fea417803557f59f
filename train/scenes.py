"""Procedural training videos for the tiny MAGI-1 model (``train/tiny.py``), with captions from a small grammar.

Every scene has what the caches exploit: a static background that is either plain (a wall, the sky) or
detailed (a checkerboard, stripes, grass), optionally panned by the camera, and usually one sprite that
moves, bounces, spins, grows or shrinks, or stands still. Videos are ``[3, frames, size, size]`` in
[-1, 1], rendered from a seed, so a seed always gives the same video and caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from magi1.builtin.text_encoder import SPECIALS, words

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1),
    "white": (0.97, 0.97, 0.97), "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05),
    "black": (0.05, 0.05, 0.05),
}
SHAPES = ("ball", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "spinning", "growing",
           "shrinking", "standing still")
BACKGROUNDS = ("checkerboard", "striped wall", "grassy field", "gray wall", "blue sky")
PANS = ("left", "right")
FPS = 24
# Where a sprite may start (x range, y range, in frame sizes): anywhere, except that a moving sprite starts
# on the side it moves away from, so that it stays in view for a couple of seconds.
START = {"moving left": ((0.55, 0.8), (0.25, 0.75)), "moving right": ((0.2, 0.45), (0.25, 0.75)),
         "moving up": ((0.25, 0.75), (0.55, 0.8)), "moving down": ((0.25, 0.75), (0.2, 0.45)),
         "bouncing": ((0.25, 0.75), (0.7, 0.8))}
ANYWHERE = ((0.25, 0.75), (0.25, 0.75))


def grammar_vocabulary():
    """The tiny text encoder's vocabulary: its special tokens, then every word the captions use (sorted)."""
    text = " ".join([*COLORS, *SHAPES, *MOTIONS, *BACKGROUNDS, *PANS, "a an over in front of the camera pans"])
    return list(SPECIALS) + sorted(set(words(text)))


@dataclass(frozen=True)
class Scene:
    shape: Optional[str]  # None: no sprite (a pan over the background)
    color: Optional[str]
    motion: Optional[str]
    background: str
    pan: Optional[str]  # camera pan direction, or None for a static camera
    x: float  # sprite start, in units of the frame size (0..1)
    y: float
    size: float  # sprite radius, in units of the frame size
    speed: float  # frames sizes per second
    palette: int  # background variant (which colours of the texture)

    @property
    def caption(self):
        where = "over a" if self.background in ("checkerboard", "striped wall", "grassy field") else "in front of a"
        if self.background == "blue sky":
            where = "in the"
        if self.shape is None:
            text = f"a {self.background}"
        else:
            article = "an" if self.color[0] in "aeiou" else "a"
            text = f"{article} {self.color} {self.shape} {self.motion} {where} {self.background}"
        if self.pan is not None:
            text += f", the camera pans {self.pan}"
        return text


def random_scene(generator: torch.Generator) -> Scene:
    def pick(options):
        return options[int(torch.randint(len(options), (), generator=generator))]

    def uniform(low, high):
        return low + (high - low) * float(torch.rand((), generator=generator))

    background = pick(BACKGROUNDS)
    pan = pick(PANS) if float(torch.rand((), generator=generator)) < 0.25 else None
    if pan is not None and float(torch.rand((), generator=generator)) < 0.3:
        return Scene(None, None, None, background, pan, 0.5, 0.5, 0.0, uniform(0.15, 0.3), pick(range(3)))
    shape, motion = pick(SHAPES), pick(MOTIONS)
    color = pick([c for c in COLORS if not (background == "blue sky" and c == "blue")])
    # The position is random: the DiT has only relative (RoPE) positions, so it places a sprite where the
    # noise suggests, the same way anywhere. Sprites span about two tokens (32 px) so that they are seen.
    (x_low, x_high), (y_low, y_high) = START.get(motion, ANYWHERE)
    x, y = uniform(x_low, x_high), uniform(y_low, y_high)
    size = {"growing": uniform(0.1, 0.13), "shrinking": uniform(0.26, 0.3)}.get(motion, uniform(0.18, 0.23))
    return Scene(shape, color, motion, background, pan, x, y, size, uniform(0.2, 0.3), pick(range(3)))


def _background(scene: Scene, xs, ys):
    """RGB ``[3, ...]`` of the background at pixel coordinates (units of the frame size)."""
    variants = {
        "checkerboard": [((0.95, 0.95, 0.9), (0.15, 0.15, 0.2)), ((0.9, 0.8, 0.6), (0.35, 0.2, 0.1)),
                         ((0.8, 0.9, 1.0), (0.1, 0.2, 0.45))],
        "striped wall": [((0.85, 0.3, 0.3), (0.95, 0.9, 0.85)), ((0.3, 0.5, 0.85), (0.9, 0.9, 0.95)),
                         ((0.35, 0.35, 0.35), (0.85, 0.85, 0.8))],
        "gray wall": [((0.55, 0.55, 0.55),) * 2, ((0.45, 0.45, 0.48),) * 2, ((0.62, 0.6, 0.58),) * 2],
    }
    if scene.background == "checkerboard":
        a, b = variants["checkerboard"][scene.palette]
        mix = ((torch.floor(xs * 8) + torch.floor(ys * 8)) % 2)
    elif scene.background == "striped wall":
        a, b = variants["striped wall"][scene.palette]
        mix = (torch.floor((xs + ys) * 6) % 2)
    elif scene.background == "gray wall":
        a, b = variants["gray wall"][scene.palette]
        mix = torch.zeros_like(xs)
    elif scene.background == "blue sky":
        a, b = (0.45, 0.65, 0.95), (0.75, 0.87, 1.0)
        mix = ys.clamp(0, 1)
    else:  # grassy field: a fixed multi-scale pattern, green shades
        a, b = (0.1, 0.4, 0.1), (0.45, 0.75, 0.25)
        phase = scene.palette * 1.7
        mix = 0.5 + 0.25 * torch.sin(xs * 37 + torch.sin(ys * 23 + phase) * 2) * torch.sin(ys * 41 + phase) \
            + 0.25 * torch.sin(xs * 83 + ys * 11 + phase)
        mix = mix.clamp(0, 1)
    a, b = torch.tensor(a).view(3, *([1] * xs.dim())), torch.tensor(b).view(3, *([1] * xs.dim()))
    return a * (1 - mix) + b * mix


def _sprite_distance(scene: Scene, xs, ys, cx, cy, radius, angle):
    """Signed distance (units of the frame size, positive inside) to the sprite's edge."""
    dx, dy = xs - cx, ys - cy
    cos, sin = torch.cos(angle), torch.sin(angle)
    rx, ry = dx * cos + dy * sin, -dx * sin + dy * cos
    if scene.shape == "ball":
        sdf = radius - torch.sqrt(dx ** 2 + dy ** 2)
    elif scene.shape == "square":
        sdf = radius * 0.85 - torch.maximum(rx.abs(), ry.abs())
    else:  # triangle pointing up (image rows grow downwards): three half-planes
        k, ry = math.sqrt(3.0), -ry
        sdf = torch.minimum(torch.minimum(radius * 0.5 + ry, radius * 0.5 - (ry - k * rx) / 2),
                            radius * 0.5 - (ry + k * rx) / 2)
    return sdf


def render(scene: Scene, frames: int, size: int = 64, with_coverage=False):
    """The scene as video ``[3, frames, size, size]`` in [-1, 1]; with ``with_coverage`` also the sprite's
    coverage ``[frames, size, size]`` in 0..1 (what training weighs more)."""
    time = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1) / FPS
    pixel = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    ys, xs = pixel.view(1, size, 1), pixel.view(1, 1, size)
    shift = {"left": -1.0, "right": 1.0, None: 0.0}[scene.pan] * scene.speed * time  # camera moves -> scene slides
    grid = (frames, size, size)
    video = _background(scene, (xs + shift).expand(grid), ys.expand(grid))
    alpha = torch.zeros(frames, size, size)
    if scene.shape is not None:
        cx = torch.full_like(time, scene.x)
        cy = torch.full_like(time, scene.y)
        radius = torch.full_like(time, scene.size)
        angle = torch.zeros_like(time)
        if scene.motion == "moving left":
            cx = cx - scene.speed * time
        elif scene.motion == "moving right":
            cx = cx + scene.speed * time
        elif scene.motion == "moving up":
            cy = cy - scene.speed * time
        elif scene.motion == "moving down":
            cy = cy + scene.speed * time
        elif scene.motion == "bouncing":
            cy = cy - 0.45 * torch.abs(torch.sin(math.pi * time / 1.2))
        elif scene.motion == "spinning":
            angle = angle + 2.5 * time
        elif scene.motion == "growing":
            radius = radius * (1 + 0.6 * time)
        elif scene.motion == "shrinking":
            radius = radius / (1 + 0.6 * time)
        alpha = (_sprite_distance(scene, xs, ys, cx, cy, radius, angle) * size + 0.5).clamp(0, 1)
        color = torch.tensor(COLORS[scene.color]).view(3, 1, 1, 1)
        # a little shading so that the sprite has texture of its own
        shade = 1.0 - 0.25 * ((xs - cx) + (ys - cy)) / radius.clamp(min=1e-3)
        video = video * (1 - alpha) + (color * shade.clamp(0.6, 1.3)).clamp(0, 1) * alpha
    video = video * 2 - 1
    return (video, alpha) if with_coverage else video


def scene_batch(seed: int, count: int, frames: int, size: int = 64, with_coverage=False):
    """``count`` scenes from ``seed``: videos ``[count, 3, frames, size, size]`` and their captions (and
    with ``with_coverage`` the sprites' coverage ``[count, frames, size, size]``)."""
    generator = torch.Generator().manual_seed(int(seed))
    scenes = [random_scene(generator) for _ in range(count)]
    rendered = [render(s, frames, size, with_coverage=True) for s in scenes]
    videos, captions = torch.stack([r[0] for r in rendered]), [s.caption for s in scenes]
    if with_coverage:
        return videos, captions, torch.stack([r[1] for r in rendered])
    return videos, captions
