"""The chunk-continuity measure on rendered videos whose answer is known: a continuous scene has small
boundary jumps and the caption's direction; a video spliced at a chunk boundary has a large jump."""

import dataclasses

import torch

from bench.continuity import boundary_ratios, caption_objects, direction_matches, object_track, report
from train.scenes import COLORS, Scene, render

MOVING = Scene("ball", "red", "moving right", "gray wall", None, 0.2, 0.5, 0.12, 0.25, 0)


def test_a_continuous_scene_continues_and_goes_the_captions_way():
    video = render(MOVING, 72, 64)
    track = object_track(video, COLORS["red"])
    assert torch.isfinite(track).all()
    ratios = boundary_ratios(track)
    assert len(ratios) == 2 and all(r <= 2 for r in ratios), ratios
    assert direction_matches(track, "moving right") is True
    assert direction_matches(track, "moving left") is False
    assert direction_matches(track, "standing still") is None


def test_a_jump_at_a_chunk_boundary_is_seen():
    moved = dataclasses.replace(MOVING, y=0.8)
    video = torch.cat([render(MOVING, 24, 64), render(moved, 72, 64)[:, 24:]], dim=1)
    ratios = boundary_ratios(object_track(video, COLORS["red"]))
    assert ratios[0] > 5 and ratios[1] <= 2, ratios


def test_a_missing_object_is_reported_lost_not_continuous():
    video = render(dataclasses.replace(MOVING, shape=None, color=None, motion=None), 48, 64)
    track = object_track(video, COLORS["red"])
    assert boundary_ratios(track) == [None]
    lines = report([("a red ball", 0, [None], None)], 2.0)
    assert "1 with the object lost" in lines[0] and lines[-1].endswith("0%")


def test_captions_name_colour_and_motion():
    assert caption_objects("a yellow square moving up over a checkerboard") == [("yellow", "moving up")]
    assert caption_objects("a green ball bouncing in front of a gray wall") == [("green", None)]


def test_every_object_of_a_benchmark_caption_is_named():
    caption = ("a yellow triangle moving left slowly then stopping and a purple square standing still then moving "
               "up quickly and an orange ball entering from the top slowly over a checkerboard, the camera pans right")
    assert caption_objects(caption) == [("yellow", "moving left"), ("purple", "moving up"), ("orange", "moving down")]
    assert caption_objects("a white square standing still in a cloudy sky") == [("white", None)]
    assert caption_objects("a red ball moving right in front of a gray wall") == [("red", "moving right")]
