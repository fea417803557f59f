"""The refactors' guard: whole generations recorded before the sampler was rebuilt
(``tests/fixtures/make_regression.py``) come out the same today: ``torch.equal`` latents and mask
frames, and the same FLOPs, DiT calls and per-chunk-step records. Each case runs on the CPU thread count
it was recorded with (``regression_cases.RECORDED_THREADS``), whatever OMP_NUM_THREADS says."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from regression_cases import CASES, describe, run_case

# The cases are pinned bit for bit on the torch releases CI runs (2.13) and those it was checked on (2.7);
# torch 2.4, the oldest the pack declares, computes the same videos to within float32 rounding.
BIT_EXACT = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
HERE = os.path.join(os.path.dirname(__file__), "fixtures", "regression")


@pytest.fixture(scope="module")
def recorded():
    with open(os.path.join(HERE, "stats.json")) as f:
        stats = json.load(f)
    return load_file(os.path.join(HERE, "latents.safetensors")), stats


@pytest.mark.parametrize("name", list(CASES))
def test_generation_is_unchanged(recorded, name):
    latents, stats = recorded
    result = run_case(name)
    if BIT_EXACT:
        assert torch.equal(result.latent, latents[name])
    else:  # torch 2.4 (the oldest declared) differs from the recording in the last float32 bits (1.2e-6)
        torch.testing.assert_close(result.latent, latents[name], rtol=0, atol=1e-5)
    if name + ".masks" in latents:
        assert torch.equal(result.stats.masks.frames(), latents[name + ".masks"])
    described, expected = describe(result.stats), dict(stats[name])
    # the KV caches hold the span the schedule reads since 0.9 (magi1.sampling.schedule.kv_span), never more than then
    assert described.pop("kv_cache_bytes") <= expected.pop("kv_cache_bytes")
    assert described == expected
