"""The GPU suite cannot rot: its smoke run (every section, tiny shapes, CPU) runs here, and the probe
policy it uses to force active fractions does what it says."""

import torch

from bench import gpu_suite
from bench.speed.forced_reuse import ForcedFraction
from magi1 import ReusePolicy, ReuseState


def test_smoke_run_covers_every_section_and_the_goals(tmp_path):
    out = tmp_path / "results.md"
    assert gpu_suite.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    for key, (title, _) in gpu_suite.SECTIONS.items():
        assert f"## {key}. {title}" in text
    assert "Skipped" not in text and "failed" not in text
    assert "## Goals" in text and "sparse speed-up >= 0.9 of the FLOP saving at 50% active" in text
    assert "**extrapolated**" in text  # the 24B number says what it is


def test_only_runs_the_chosen_sections(tmp_path):
    out = tmp_path / "results.md"
    assert gpu_suite.main(["--smoke", "--only", "g", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## g. VAE decode" in text and "## a." not in text


def test_forced_fraction_computes_that_share_after_the_first_step():
    policy = ForcedFraction(0.25, seed=1)
    assert isinstance(policy, ReusePolicy)
    state = policy.new_state(num_steps=3, chunk_shape=(4, 2, 4, 8), patch=(2, 2))
    assert isinstance(state, ReuseState)
    feature = torch.zeros(1)
    first, = state.decide([(0, 0, feature)])
    v0 = torch.randn(4, 2, 4, 8)
    assert first.action == "dense" and state.velocity(first, v0, 0.1) is v0
    second, = state.decide([(0, 1, feature)])
    assert second.action == "sparse" and second.n_active == 4 and second.n_tokens == 16
    v1 = torch.randn(4, 2, 4, 8)
    merged = state.velocity(second, v1, 0.1)
    computed = torch.zeros(16, dtype=torch.bool)
    computed[second.active] = True
    pixels = computed.view(2, 2, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)[None].expand_as(v1)
    assert torch.equal(merged[pixels], v1[pixels]) and torch.equal(merged[~pixels], v0[~pixels])
    state.observe([(0, 2, v1, v1, 1.0)])
    assert 0 not in state.velocities  # the last step forgets the chunk
