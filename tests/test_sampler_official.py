"""The sampler against whole generations of the official pipeline (tests/fixtures/pipeline, recorded by
tests/fixtures/make_fixtures.py on tiny random weights): the same DiT calls in the same order, and the
same final latent."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from magi1 import build_dit
from magi1.sampler import VideoLayout, generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CONFIGS = ["base", "base_i2v", "distill24", "distill45"]
TOLERANCE = 1e-4  # relative L2, float32


def load(config):
    with open(os.path.join(FIXTURES, "pipeline", f"{config}.json")) as f:
        description = json.load(f)
    tensors = load_file(os.path.join(FIXTURES, "pipeline", f"{config}.safetensors"))
    model = build_dit(description["model_config"], dtype=torch.float32)
    model.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}, strict=True)
    model.distill = description["engine_config"]["distill"]
    return description, tensors, model.eval()


def request(description, tensors):
    """Our generate() arguments for the recorded run: its per-chunk captions, noise and prefix."""
    rc = description["runtime_config"]
    prefix = tensors.get("in.prefix")
    layout = VideoLayout.plan(rc["num_frames"], rc["video_size_h"], rc["video_size_w"],
                              prefix_frames=0 if prefix is None else prefix.shape[1], chunk_width=rc["chunk_width"])
    y, masks = tensors["in.y"], tensors["in.emb_masks"]
    return dict(caption=y[0, layout.chunk_offset:], caption_mask=masks[0, layout.chunk_offset:],
                frames=rc["num_frames"], height=rc["video_size_h"], width=rc["video_size_w"], steps=rc["num_steps"],
                window_size=rc["window_size"], chunk_width=rc["chunk_width"], noise=tensors["in.noise"], prefix=prefix)


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


class CallLog:
    """Records every DiT call the sampler makes, in the terms of the official call list."""

    def __init__(self, model):
        self.calls = []
        original = model.forward

        def forward(x, t, caption, caption_mask, kv_range, **kw):
            n, chunks = t.shape
            ct = x.shape[2] // chunks * (x.shape[3] // 2) * (x.shape[4] // 2)
            # The official list numbers the keys of sequence i from i * chunks (one packed batch).
            self.calls.append(dict(N=n, slice_point=kw["slice_point"], chunks=chunks,
                                   t=[round(v, 4) for v in t.reshape(-1).tolist()],
                                   kv=[[a / ct + i * chunks, b / ct + i * chunks] for i in range(n)
                                       for a, b in kv_range]))
            return original(x, t, caption, caption_mask, kv_range, **kw)

        model.forward = forward


def official_order(calls):
    return [dict(N=c["N"], slice_point=c["slice_point"], chunks=c["chunks"], t=c["t"], kv=c["kv_chunks"])
            for c in calls]


@pytest.mark.parametrize("config", CONFIGS)
def test_final_latent_matches_the_official_pipeline(config):
    description, tensors, model = load(config)
    log = CallLog(model)
    result = generate(model, **request(description, tensors))
    expected = tensors["out.latent"]
    assert result.latent.shape == expected.shape
    error = relative_error(result.latent, expected)
    print(f"{config}: relative error {error:.2e} over {len(log.calls)} DiT calls")
    assert error < TOLERANCE

    # The same sequence of DiT calls: batch, slice point, chunks, times and key ranges.
    with open(os.path.join(FIXTURES, f"schedule_{config}.json")) as f:
        official = official_order(json.load(f)["calls"])
    assert len(log.calls) == len(official)
    for ours, theirs in zip(log.calls, official):
        assert ours == theirs


@pytest.mark.parametrize("config", ["base", "distill24"])
def test_the_comparison_is_sharp(config):
    """Deliberate mistakes in guidance or prefix handling move the latent far beyond the tolerance."""
    description, tensors, model = load(config)
    args = request(description, tensors)
    expected = tensors["out.latent"]
    from magi1.sampler import Guidance

    wrong = Guidance(text_scales=(5.0, 5.0, 5.0, 0.0, 0.0)) if config == "base" else Guidance(near_clean_context_scale=1.0)
    assert relative_error(generate(model, **args, guidance=wrong).latent, expected) > 1e-2
