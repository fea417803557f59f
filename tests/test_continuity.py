"""The chunk-continuity measure on rendered videos whose answer is known: a continuous scene has small
boundary jumps and the caption's direction; a video spliced at a chunk boundary has a large jump."""

import dataclasses

import pytest
import torch

from bench.quality.continuity import boundary_ratios, caption_objects, direction_matches, object_track, report
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
    assert "1 with the object lost" in lines[0] and not any("videos whose" in line for line in lines)


def test_a_video_is_continuous_when_every_object_it_tracks_is():
    rows = [("a", 0, [1.0, None], True), ("a", 0, [1.5, 0.5], None),  # one object leaves the frame: still continuous
            ("b", 0, [0.5, 3.0], False), ("a", 1, [None, None], None)]  # a jump; a video tracking nothing is left out
    lines = report(rows, 2.0)
    assert "4 objects in 3 videos, 8 chunk boundaries (3 with the object lost" in lines[0]
    assert "videos whose every tracked boundary is <= 2: 1/2 (50%)" in lines
    # per prompt: "a" has 1.0, 1.5, 0.5 (median 1.0), "b" 0.5, 3.0 (median 1.75); both typical boundaries are <= 2
    assert "prompts whose median boundary ratio is <= 2: 2/2 (100%)" in lines
    assert "prompts whose median boundary ratio is <= 1.2: 1/2 (50%)" in report(rows, 1.2)
    assert lines[-1] == "motion direction matches the caption: 1/2 (50%)"


def test_captions_name_colour_and_motion():
    assert caption_objects("a yellow square moving up over a checkerboard") == [("yellow", "moving up")]
    assert caption_objects("a green ball bouncing in front of a gray wall") == [("green", None)]


def test_every_object_of_a_benchmark_caption_is_named():
    caption = ("a yellow triangle moving left slowly then stopping and a purple square standing still then moving "
               "up quickly and an orange ball entering from the top slowly over a checkerboard, the camera pans right")
    assert caption_objects(caption) == [("yellow", "moving left"), ("purple", "moving up"), ("orange", "moving down")]
    assert caption_objects("a white square standing still in a cloudy sky") == [("white", None)]
    assert caption_objects("a red ball moving right in front of a gray wall") == [("red", "moving right")]


def test_a_staircase_track_is_measured_per_latent_frame():
    """The VAE decodes each latent frame into four nearly equal frames: an object moving 2 px a latent
    frame moves in 2 px steps every fourth frame. Continuous per latent frame; the per-frame median (0)
    would call every boundary a jump."""
    latent_positions = torch.arange(18, dtype=torch.float32) * 2.0  # 3 chunks of 6 latent frames
    track = torch.stack([latent_positions.repeat_interleave(4), torch.full((72,), 30.0)], dim=1)
    assert boundary_ratios(track) == [1.0, 1.0]
    assert all(r == 4.0 for r in boundary_ratios(track, group=1))  # 2 px over the 0.5 px floor
    spliced = track.clone()
    spliced[24:, 0] += 12.0
    assert boundary_ratios(spliced) == [7.0, 1.0]


def test_a_camera_pan_is_taken_out_of_the_direction():
    """A benchmark object that moves up slowly, stops, and is carried sideways by a pan: in the frame it
    moves more across than along; in the world (the pan taken out) it goes up."""
    from bench.quality.continuity import caption_pan, measure
    from train import bench_scenes

    thing = bench_scenes.MovingObject("ball", "red", "stopping", "up", "slowly", 0.5, 0.6, 0.08, 0.6)
    scene = bench_scenes.BenchScene((thing,), "brick wall", "right", 0, 0.0)
    assert caption_pan(scene.caption) == 1 and caption_pan("a red ball standing still in a cloudy sky") == 0
    video = bench_scenes.render(scene, 72, 128)
    (color, latent, frame, direction), = measure(video, scene.caption, bench_scenes.PAN_SPEED)
    assert color == "red" and direction is True and all(r <= 2 for r in latent), latent
    track = object_track(video, COLORS["red"])
    assert direction_matches(track, "moving up") is False  # without the pan taken out


def test_the_command_measures_a_model_and_real_scenes(tmp_path):
    from bench.quality import continuity

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball moving right over a checkerboard\n")
    out = tmp_path / "report.txt"
    assert continuity.main(["--model", "tiny", "--prompts", str(prompts), "--seeds", "0", "--frames", "48",
                            "--reference", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# python -m bench.quality.continuity --model tiny (1 prompts, seeds 0, 48 frames, no cache)")
    assert "'a red ball moving right over a checkerboard' seed 0, the red object: boundary ratios " in text
    for title in ("tiny model, no cache", "2 real scenes as rendered", "the same scenes through the VAE"):
        assert f"{title}, per latent frame:" in text and f"{title}, per decoded frame" in text
    reconstruction = float(text.split("the VAE's reconstruction of these scenes: PSNR median ")[1].split(" dB")[0])
    assert 15 < reconstruction < 60
    prompts.write_text("a striped wall, the camera pans left\n")
    with pytest.raises(SystemExit, match="names no colour"):
        continuity.main(["--prompts", str(prompts)])
