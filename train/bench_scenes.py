"""Procedural videos for the benchmark model: scenes shaped like the videos people make, with room for
token-level reuse.

A large detailed background (bricks, tiles, a checkerboard, stripes, grass, a cloudy sky) fills the
frame, seen by a static camera or one that pans. One to three small objects (each under ~10% of the
frame) move at their own speeds: steadily, or stopping, or starting late, or entering from outside the
frame; a fast object may leave it. Each object has its own colour, so that it can be found in a video
by its colour (``bench/quality/continuity.py``). Videos are ``[3, frames, size, size]`` in [-1, 1], rendered
from a seed; the caption names every object, its motion and speed, the background and the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .scenes import COLORS, _sprite_distance

FPS = 24
SHAPES = ("ball", "square", "triangle")
OBJECT_COLORS = ("red", "blue", "yellow", "purple", "orange", "white")  # far from every background's colours
BACKGROUNDS = ("brick wall", "tiled floor", "checkerboard", "striped wall", "grassy field", "cloudy sky")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slowly": 0.1, "quickly": 0.28}  # frame widths per second
BEHAVIOURS = ("moving", "stopping", "starting", "entering", "still")
PANS = ("left", "right")
PAN_SPEED = 0.08  # frame widths per second
CLIP_SECONDS = 3.0  # the longest clip trained on (three chunks of 24 frames)


@dataclass(frozen=True)
class MovingObject:
    shape: str
    color: str
    behaviour: str  # one of BEHAVIOURS
    direction: Optional[str]  # a DIRECTIONS key (None: still)
    speed: str  # a SPEEDS key
    x: float  # position at time 0, in frame units (may be outside the frame for "entering")
    y: float
    radius: float  # in frame units
    switch: float  # "stopping": seconds until it stops; "starting": seconds until it starts

    @property
    def words(self):
        article = "an" if self.color[0] in "aeiou" else "a"
        name = f"{article} {self.color} {self.shape}"
        if self.behaviour == "still":
            return f"{name} standing still"
        if self.behaviour == "stopping":
            return f"{name} moving {self.direction} {self.speed} then stopping"
        if self.behaviour == "starting":
            return f"{name} standing still then moving {self.direction} {self.speed}"
        if self.behaviour == "entering":
            side = {"right": "left", "left": "right", "down": "top", "up": "bottom"}[self.direction]
            return f"{name} entering from the {side} {self.speed}"
        return f"{name} moving {self.direction} {self.speed}"

    def centre(self, time):
        """Centre ``(x, y)`` at ``time`` seconds (a tensor), in frame units."""
        dx, dy = DIRECTIONS.get(self.direction, (0.0, 0.0))
        moving = time
        if self.behaviour == "still":
            moving = torch.zeros_like(time)
        elif self.behaviour == "stopping":
            moving = time.clamp(max=self.switch)
        elif self.behaviour == "starting":
            moving = (time - self.switch).clamp(min=0)
        distance = SPEEDS[self.speed] * moving
        return self.x + dx * distance, self.y + dy * distance


@dataclass(frozen=True)
class BenchScene:
    objects: Tuple[MovingObject, ...]
    background: str
    pan: Optional[str]
    palette: int  # background variant
    phase: float  # texture offset

    @property
    def caption(self):
        where = "in a cloudy sky" if self.background == "cloudy sky" else f"over a {self.background}"
        text = " and ".join(o.words for o in self.objects) + f" {where}"
        return text + (f", the camera pans {self.pan}" if self.pan else "")


def caption_vocabulary():
    """Every word the captions use."""
    text = " ".join([*COLORS, *SHAPES, *BACKGROUNDS, *SPEEDS, *DIRECTIONS, "top bottom",
                     "a an and over in the camera pans standing still moving then stopping entering from"])
    return sorted(set(text.replace(",", " ").split()))


def random_scene(generator, *, avoid=()):
    """A random scene; captions in ``avoid`` (the held-out set) are drawn again."""
    while True:
        scene = _draw(generator)
        if scene.caption not in avoid:
            return scene


def _draw(generator):
    def pick(options):
        return options[int(torch.randint(len(options), (), generator=generator))]

    def uniform(low, high):
        return low + (high - low) * float(torch.rand((), generator=generator))

    count = 1 + int(torch.multinomial(torch.tensor([0.4, 0.4, 0.2]), 1, generator=generator))
    colors = torch.randperm(len(OBJECT_COLORS), generator=generator)[:count].tolist()
    objects = []
    for color in colors:
        behaviour = pick(BEHAVIOURS)
        direction = None if behaviour == "still" else pick(tuple(DIRECTIONS))
        speed = pick(tuple(SPEEDS))
        radius = uniform(0.07, 0.11)
        x, y = uniform(0.15, 0.85), uniform(0.15, 0.85)
        if behaviour == "entering":  # just outside the frame, on the side it comes from
            dx, dy = DIRECTIONS[direction]
            x = x if dx == 0 else (0.5 - dx * (0.5 + radius))
            y = y if dy == 0 else (0.5 - dy * (0.5 + radius))
        objects.append(MovingObject(pick(SHAPES), OBJECT_COLORS[color], behaviour, direction, speed, x, y, radius,
                                    uniform(0.5, 2.0)))
    return BenchScene(tuple(objects), pick(BACKGROUNDS), pick((None, None) + PANS), int(torch.randint(3, (),
                      generator=generator)), uniform(0.0, 10.0))


def _background(scene, xs, ys):
    """RGB ``[3, ...]`` of the background at coordinates in frame units (detailed everywhere but the sky's
    open areas)."""
    p, phase = scene.palette, scene.phase
    if scene.background == "brick wall":
        row = torch.floor(ys * 6)  # bricks a sixth of the frame high, mortar a few pixels wide at 128
        offset = (row % 2) * 0.5
        mortar = ((ys * 6 - row) < 0.15) | (((xs * 3 + offset) % 1) < 0.08)
        tone = 0.08 * torch.sin(row * 12.9 + torch.floor(xs * 3 + offset) * 7.3 + phase)
        brick = torch.stack([0.62 + tone, 0.27 + tone / 2, 0.2 + tone / 3]) * (1 - 0.15 * p / 2)
        return torch.where(mortar, torch.full_like(brick, 0.78), brick)
    if scene.background == "tiled floor":
        edge = ((xs * 6) % 1 < 0.12) | ((ys * 6) % 1 < 0.12)
        tile = 0.55 + 0.2 * ((torch.floor(xs * 6) * 3 + torch.floor(ys * 6) * 5 + p) % 3) / 2
        color = torch.stack([tile, tile * 0.95, tile * 0.85])
        return torch.where(edge, torch.full_like(color, 0.3), color)
    if scene.background == "checkerboard":
        a, b = [((0.95, 0.95, 0.9), (0.15, 0.15, 0.2)), ((0.9, 0.8, 0.6), (0.35, 0.2, 0.1)),
                ((0.8, 0.9, 1.0), (0.1, 0.2, 0.45))][p]
        mix = (torch.floor(xs * 8) + torch.floor(ys * 8)) % 2
    elif scene.background == "striped wall":
        a, b = [((0.3, 0.5, 0.35), (0.9, 0.9, 0.85)), ((0.35, 0.45, 0.8), (0.85, 0.9, 0.95)),
                ((0.35, 0.35, 0.35), (0.85, 0.85, 0.8))][p]
        mix = torch.floor((xs + ys) * 6) % 2
    elif scene.background == "grassy field":
        a, b = (0.1, 0.4, 0.1), (0.45, 0.75, 0.25)
        mix = 0.5 + 0.25 * torch.sin(xs * 37 + torch.sin(ys * 23 + phase) * 2) * torch.sin(ys * 41 + phase) \
            + 0.25 * torch.sin(xs * 83 + ys * 11 + phase)
    else:  # cloudy sky: open blue with a few soft clouds
        a, b = (0.4, 0.6, 0.92), (0.97, 0.97, 0.98)
        cloud = torch.sin(xs * 5 + phase) * torch.sin(ys * 4 + phase * 0.7) + 0.5 * torch.sin(xs * 11 + ys * 7 + phase)
        mix = ((cloud - 0.45) * 2.5).clamp(0, 1)
    a, b = torch.tensor(a).view(3, *([1] * xs.dim())), torch.tensor(b).view(3, *([1] * xs.dim()))
    mix = mix.clamp(0, 1)
    return a * (1 - mix) + b * mix


def render(scene, frames, size=128, with_coverage=False):
    """The scene as video ``[3, frames, size, size]`` in [-1, 1]; with ``with_coverage`` also how much the
    objects cover each pixel ``[frames, size, size]`` in 0..1."""
    time = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1) / FPS
    pixel = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    ys, xs = pixel.view(1, size, 1), pixel.view(1, 1, size)
    pan = {"left": -1.0, "right": 1.0, None: 0.0}[scene.pan] * PAN_SPEED * time  # the camera moves: all slides
    grid = (frames, size, size)
    video = _background(scene, (xs + pan).expand(grid), ys.expand(grid))
    coverage = torch.zeros(grid)
    for obj in scene.objects:
        cx, cy = obj.centre(time)
        cx = cx - pan  # objects live in the world; the camera's pan moves them in the frame
        radius = torch.full_like(time, obj.radius)
        alpha = (_sprite_distance(obj, xs, ys, cx, cy, radius, torch.zeros_like(time)) * size + 0.5).clamp(0, 1)
        shade = 1.0 - 0.2 * ((xs - cx) + (ys - cy)) / obj.radius  # a little shading: texture of its own
        color = torch.tensor(COLORS[obj.color]).view(3, 1, 1, 1)
        video = video * (1 - alpha) + (color * shade.clamp(0.7, 1.25)).clamp(0, 1) * alpha
        coverage = torch.maximum(coverage, alpha)
    video = video * 2 - 1
    return (video, coverage) if with_coverage else video


def scene_batch(seed, count, frames, size=128, with_coverage=False, avoid=()):
    """``count`` scenes from ``seed``: videos ``[count, 3, frames, size, size]``, captions, and (with
    ``with_coverage``) object coverage ``[count, frames, size, size]``."""
    generator = torch.Generator().manual_seed(seed)
    scenes = [random_scene(generator, avoid=avoid) for _ in range(count)]
    rendered = [render(s, frames, size, with_coverage=True) for s in scenes]
    videos = torch.stack([v for v, _ in rendered])
    captions = [s.caption for s in scenes]
    if with_coverage:
        return videos, captions, torch.stack([c for _, c in rendered])
    return videos, captions


def max_object_area(scene):
    """The largest share of the frame one object covers (a square's corners make it the largest)."""
    return max((2 * 0.85 * o.radius) ** 2 if o.shape == "square" else math.pi * o.radius ** 2 for o in scene.objects)
