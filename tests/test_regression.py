"""The refactors' guard: whole generations recorded before the sampler was rebuilt
(``tests/fixtures/make_regression.py``) come out the same today: ``torch.equal`` latents and mask
frames, and the same FLOPs, DiT calls and per-chunk-step records."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from regression_cases import CASES, describe, run_case

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
    assert torch.equal(result.latent, latents[name])
    if name + ".masks" in latents:
        assert torch.equal(result.stats.masks.frames(), latents[name + ".masks"])
    assert describe(result.stats) == stats[name]
