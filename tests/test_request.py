"""magi1.VideoRequest: one generation described once. Its rules (frames, chunks, the report's line), its
written format (round trip through JSON, the policy included; other versions refused), and the worker
reading it."""

import dataclasses
import json
import random

import pytest
import torch

from cache_core import CachePolicy
from magi1 import ChunkCaptions, Guidance, VideoRequest, release_guidance
from magi1.distributed.workers import INPUT_NAMES, write_job
from magi1.sampling.layout import VideoLayout, frames_made, frames_to_generate
from magi1.sampling.request import REQUEST_FORMAT, TENSOR_FIELDS
from programs.worker import read_request


def random_request(seed):
    """A request with every field drawn at random (tensors, guidance, policy)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    chunks = rng.randint(1, 4)
    policy = rng.choice([None, CachePolicy.slow(), CachePolicy.fast(max_reuse=3),
                         CachePolicy(mode="flowcache", tau=rng.random(), chunk_tau=0.2, velocity_extrapolation=0.5)])
    prefix = torch.randn(16, rng.choice([1, 3, 7]), 4, 6, generator=g) if rng.random() < 0.5 else None
    negative = torch.randn(chunks, 12, 24, generator=g) if rng.random() < 0.5 else None
    return VideoRequest(
        frames=rng.randint(1, 400), width=16 * rng.randint(1, 8), height=16 * rng.randint(1, 8),
        steps=4 * rng.randint(1, 16), seed=rng.randrange(2**64), caption=torch.randn(chunks, 12, 24, generator=g),
        caption_mask=torch.rand(chunks, 12, generator=g) < 0.5, negative_caption=negative,
        negative_mask=None if negative is None else torch.ones(chunks, 12, dtype=torch.bool), prefix=prefix,
        guidance=rng.choice([Guidance(), release_guidance(rng.uniform(0, 30)), Guidance(passes=3)]), policy=policy,
        kv_offload=rng.random() < 0.5, token_block=rng.choice([None, 4096, 8192]), record_masks=rng.random() < 0.5)


def same(a, b):
    for f in dataclasses.fields(VideoRequest):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert x is not None and y is not None and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


@pytest.mark.parametrize("seed", range(8))
def test_the_written_format_round_trips_through_json(seed):
    request = random_request(seed)
    data = json.loads(json.dumps(request.to_dict()))  # plain JSON: what job.json holds
    assert data["format"] == REQUEST_FORMAT and not set(data) & set(TENSOR_FIELDS)
    back = VideoRequest.from_dict(data, request.tensors(), policy_from_dict=CachePolicy.from_dict)
    same(back, request)
    assert back.to_dict() == request.to_dict()


def test_compact_captions_travel_as_one_row_per_chunk():
    table, masks = torch.randn(2, 12, 24), torch.rand(2, 12) < 0.5
    rows = ChunkCaptions(table, masks, (0, 1, 1, 1))
    tensors = VideoRequest(frames=96, width=64, height=64, caption=rows).tensors()
    assert torch.equal(tensors["caption"], table[[0, 1, 1, 1]]) and torch.equal(tensors["caption_mask"],
                                                                                masks[[0, 1, 1, 1]])
    assert set(TENSOR_FIELDS) == set(INPUT_NAMES)  # what a worker job's inputs file may hold


def test_other_versions_and_unknown_fields_are_refused_clearly():
    request = VideoRequest(frames=48, width=64, height=64, policy=CachePolicy.slow())
    data = request.to_dict()
    with pytest.raises(ValueError, match=r"format 2, and this version of the pack reads format 1: .*restart ComfyUI"):
        VideoRequest.from_dict(dict(data, format=2), policy_from_dict=CachePolicy.from_dict)
    with pytest.raises(ValueError, match=r"format None"):
        VideoRequest.from_dict({k: v for k, v in data.items() if k != "format"})
    with pytest.raises(ValueError, match=r"does not know: \['sharpness'\]"):
        VideoRequest.from_dict(dict(data, sharpness=2), policy_from_dict=CachePolicy.from_dict)
    with pytest.raises(ValueError, match="pass policy_from_dict"):
        VideoRequest.from_dict(data)
    with pytest.raises(ValueError, match=r"cache_core does not know: \['tau2'\]"):
        VideoRequest.from_dict(dict(data, policy=dict(data["policy"], tau2=0.1)), policy_from_dict=CachePolicy.from_dict)
    with pytest.raises(ValueError, match="unknown request tensors"):
        VideoRequest.from_dict(dict(data, policy=None), {"latent": torch.zeros(1)})


def test_a_worker_refuses_a_job_of_another_version(tmp_path):
    request = VideoRequest(frames=24, width=64, height=64, caption=torch.randn(1, 12, 24),
                           caption_mask=torch.ones(1, 12, dtype=torch.bool), policy=CachePolicy.slow())
    write_job(str(tmp_path), {"model": {"builtin": "tiny"}, "request": request.to_dict(), "cfg_parallel": 1},
              request.tensors())
    job, read = read_request(str(tmp_path))
    same(read, request)
    write_job(str(tmp_path), {"model": {"builtin": "tiny"}, "request": dict(request.to_dict(), format=99),
                              "cfg_parallel": 1}, request.tensors())
    with pytest.raises(ValueError, match="format 99"):
        read_request(str(tmp_path))


@pytest.mark.parametrize("frames", [1, 4, 25, 48, 95, 96, 97, 240])
@pytest.mark.parametrize("prefix_frames", [0, 1, 4, 6, 13])
def test_frames_and_chunks_follow_the_frames_rule(frames, prefix_frames):
    request = VideoRequest(frames=frames, width=64, height=48, prefix_frames=prefix_frames)
    assert request.frames_to_generate == frames_to_generate(frames, prefix_frames)
    layout = VideoLayout.plan(request.frames_to_generate, 48, 64, prefix_frames=prefix_frames)
    assert request.layout() == layout and request.chunks == layout.chunk_num - layout.chunk_offset
    made = layout.latent_frames - layout.output_start
    line = request.frames_report(made)
    assert line.startswith(f"{frames} asked, {frames_made(made)} made ({request.chunks} chunk")
    assert ("the start image the first frame" in line) == (prefix_frames == 1)
    assert (f"after the prefix's {4 * prefix_frames} frames" in line) == (prefix_frames > 1)


def test_a_prefix_sets_its_frames_and_bad_fields_are_refused():
    assert VideoRequest(frames=24, width=64, height=64, prefix=torch.zeros(16, 3, 8, 8)).prefix_frames == 3
    with pytest.raises(ValueError, match="prefix_frames is 2 but the prefix holds 3"):
        VideoRequest(frames=24, width=64, height=64, prefix=torch.zeros(16, 3, 8, 8), prefix_frames=2)
    with pytest.raises(ValueError, match="seed must be"):
        VideoRequest(frames=24, width=64, height=64, seed=-1)
    with pytest.raises(TypeError, match="policy must be a cache_core.CachePolicy"):
        VideoRequest(frames=24, width=64, height=64, policy="slow")
    with pytest.raises(TypeError, match="guidance must be a magi1.Guidance"):
        VideoRequest(frames=24, width=64, height=64, guidance=7.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        VideoRequest(frames=24, width=64, height=64).frames = 48


def test_reuse_names_what_the_policy_keeps():
    request = VideoRequest(frames=24, width=64, height=64)
    assert [request.with_changes(policy=p).reuse for p in (None, CachePolicy(mode="off"), CachePolicy(mode="teacache"),
                                                           CachePolicy(mode="flowcache"), CachePolicy.slow())] == \
        ["off", "off", "chunk", "chunk", "token"]


def test_release_guidance_is_the_release_at_another_text_scale():
    assert release_guidance() == Guidance() and release_guidance(None) == Guidance()
    assert release_guidance(5.0).text_scales == (5.0, 5.0, 5.0, 0.0, 0.0)
    assert release_guidance(7.5) == Guidance()


def test_generate_takes_a_request():
    from magi1 import builtin, generate

    dit = builtin.TINY.load_dit()
    with pytest.raises(TypeError, match="generate takes a magi1.VideoRequest, got Tensor"):
        generate(dit, torch.zeros(1, 800, 64))
