"""The sampler against whole generations of the official pipeline (tests/fixtures/pipeline, recorded by
tests/fixtures/make_fixtures.py on tiny random weights): the same DiT calls in the same order, and the
same final latent."""

import json
import os

import pytest

from magi1 import Guidance
from run_request import generate
from pipeline_fixtures import CONFIGS, FIXTURES, load, relative_error, request

TOLERANCE = 1e-4  # relative L2, float32


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
    wrong = Guidance(text_scales=(5.0, 5.0, 5.0, 0.0, 0.0)) if config == "base" else Guidance(near_clean_context_scale=1.0)
    assert relative_error(generate(model, **args, guidance=wrong).latent, expected) > 1e-2
