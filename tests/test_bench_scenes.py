"""The benchmark model's scenes: reproducible, within the issue's bounds (small objects, one to three,
their own colours), moving as their captions say, and never the held-out captions."""

import json
import os

import torch

from bench.quality.continuity import object_track
from train import bench_scenes
from train.bench_scenes import BenchScene, MovingObject, render, scene_batch

HELDOUT = os.path.join(os.path.dirname(bench_scenes.__file__), "bench_heldout.json")


def test_scenes_are_reproducible_and_within_bounds():
    videos, captions = scene_batch(3, 4, 24, 64)
    again, same = scene_batch(3, 4, 24, 64)
    assert torch.equal(videos, again) and captions == same
    assert videos.shape == (4, 3, 24, 64, 64) and videos.min() >= -1 and videos.max() <= 1
    vocabulary = set(bench_scenes.caption_vocabulary())
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        scene = bench_scenes.random_scene(generator)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.color for o in scene.objects}) == len(scene.objects)  # found by colour, one each
        assert bench_scenes.max_object_area(scene) < 0.1
        assert set(scene.caption.replace(",", " ").split()) <= vocabulary


def test_objects_move_as_captioned():
    still = MovingObject("ball", "blue", "still", None, "slowly", 0.3, 0.6, 0.09, 1.0)
    right = MovingObject("square", "red", "stopping", "right", "quickly", 0.2, 0.3, 0.09, 1.0)
    entering = MovingObject("ball", "yellow", "entering", "left", "quickly", 1.1, 0.7, 0.09, 1.0)
    scene = BenchScene((still, right, entering), "brick wall", None, 0, 0.0)
    assert scene.caption == ("a blue ball standing still and a red square moving right quickly then stopping and a "
                             "yellow ball entering from the right quickly over a brick wall")
    video = render(scene, 72, 64)
    blue = object_track(video, bench_scenes.COLORS["blue"])
    red = object_track(video, bench_scenes.COLORS["red"])
    yellow = object_track(video, bench_scenes.COLORS["yellow"])
    assert (blue[40] - blue[0]).abs().max() < 0.5  # still (until the yellow ball passes in front of it)
    assert red[23, 0] > red[0, 0] + 10 and (red[-1] - red[30]).abs().max() < 0.5  # moves right, then stops
    assert not torch.isfinite(yellow[0]).all() and torch.isfinite(yellow[-1]).all()  # comes in from outside


def test_the_held_out_captions_are_never_drawn_for_training():
    with open(HELDOUT) as f:
        heldout = json.load(f)
    prompts = heldout["prompts"]
    assert len(prompts) == len(set(prompts)) >= 20 and heldout["seeds"]
    first = bench_scenes.random_scene(torch.Generator().manual_seed(5)).caption
    assert bench_scenes.random_scene(torch.Generator().manual_seed(5), avoid={first}).caption != first
    _, captions = scene_batch(11, 64, 1, 16, avoid=set(prompts))
    assert not set(captions) & set(prompts)


def test_the_benchmark_recipe_trains_a_few_steps(tmp_path):
    import dataclasses

    import magi1
    from train import benchmark_model as bench, tiny

    assert bench.BENCHMARK_MODEL.size == 128 and set(bench_scenes.caption_vocabulary()) <= set(bench.vocabulary())
    small = magi1.VAEConfig(**{**tiny.VAE_CONFIG.__dict__, "video_size": 32})
    recipe = dataclasses.replace(bench.BENCHMARK_MODEL, size=32, vae_config=small)
    model, captions = tiny.train_dit(magi1.random_vae(small, seed=0), seed=1, steps=3, batch=2, scenes=2,
                                     log=lambda line: None, recipe=recipe)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    tiny.save_dit(tmp_path, model, captions)
    encoder = magi1.builtin.text_encoder.load_text_encoder(tmp_path / "text_encoder.safetensors")
    states, mask = encoder.encode(json.load(open(HELDOUT))["prompts"][0])
    assert int(mask.sum()) > 10 and encoder.config.max_tokens == 40  # a long caption fits, word by word
