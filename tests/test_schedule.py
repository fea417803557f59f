"""The denoising schedule against the official pipeline's recorded sequence of DiT calls
(tests/fixtures/schedule_*.json, made by tests/fixtures/make_fixtures.py) and against float64 formulas."""

import json
import math
import os

import pytest
import torch

from magi1.schedule import CLEAN_T, step_intervals, time_grid, total_forward_steps, window_step

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def reference_grid(num_steps, shift=3.0):
    """float64: t = s / (shift - (shift - 1) s) with s = u^2, u on the (shortcut) grid."""
    if num_steps == 12:
        u = [q / 4 + d for q in range(4) for d in (0, 1 / 8, 3 / 16)] + [1.0]
    else:
        u = [i / num_steps for i in range(num_steps + 1)]
    return [x * x / (shift - (shift - 1) * x * x) for x in u]


@pytest.mark.parametrize("num_steps", [8, 12, 16, 64])
def test_time_grid_matches_the_formula(num_steps):
    grid = time_grid(num_steps)
    assert grid.dtype == torch.float32 and len(grid) == num_steps + 1
    assert torch.allclose(grid.double(), torch.tensor(reference_grid(num_steps), dtype=torch.float64), atol=1e-7)
    assert grid[0] == 0 and abs(float(grid[-1]) - 1) < 1e-6


def test_stage_boundaries_of_64_steps_are_the_guidance_breakpoints():
    grid = time_grid(64)
    assert [round(float(grid[s]), 4) for s in (16, 32, 48)] == [0.0217, 0.1, 0.3]


def test_step_intervals():
    assert step_intervals(12) == [2, 1, 1] * 4
    assert step_intervals(12, "16,16,8") == [1, 1, 2] * 4
    assert step_intervals(64) == [1] * 64


def load(config):
    with open(os.path.join(FIXTURES, f"schedule_{config}.json")) as f:
        calls = json.load(f)["calls"]
    with open(os.path.join(FIXTURES, f"dit_tiny_{config}.json")) as f:
        tiny = json.load(f)
    rc = tiny["runtime_config"]
    prefix = tiny["harness"]["prefix_frames"]
    width = rc["chunk_width"]
    chunk_num = math.ceil((rc["num_frames"] // 4 + prefix) / width)
    return calls, dict(chunk_num=chunk_num, num_steps=rc["num_steps"], window_size=rc["window_size"],
                       chunk_offset=prefix // width)


@pytest.mark.parametrize("config", ["base", "base_i2v", "distill24", "distill45"])
def test_every_official_call_is_planned(config):
    calls, setup = load(config)
    grid = time_grid(setup["num_steps"])
    first_calls = {}
    for c in calls:  # per step, the first denoising call (a prefix-video extraction may come before it)
        if not c["prefix"] and c["N"] == 1:
            first_calls.setdefault(c["step"], c)
    first_calls = list(first_calls.values())
    assert [c["step"] for c in first_calls] == list(range(len(first_calls)))
    assert len(first_calls) == total_forward_steps(**setup)
    for c in first_calls:
        plan = window_step(c["step"], **setup)
        times = ([CLEAN_T] if plan.refresh_clean else []) + [float(grid[s]) for s in plan.steps]
        near_clean = times[int(plan.refresh_clean)] > 0.3
        duplicate = near_clean and len(c["t"]) == len(times) + 1  # one-pass models append the nearly-clean copy
        assert c["slice_point"] == plan.slice_point, c
        assert c["fwd_extra"] == plan.refresh_clean, c
        assert c["near_clean"] == near_clean, c
        assert c["chunks"] == len(times) + duplicate, c
        assert c["t"][: len(times)] == [round(t, 4) for t in times], c
        assert [tuple(r) for r in c["kv_chunks"][: len(times)]] == [tuple(map(float, r)) for r in plan.kv_ranges], c


def test_steady_state_window():
    plan = window_step(4 * 16 + 5, chunk_num=8, num_steps=64, window_size=4)
    assert (plan.start, plan.end, plan.steps, plan.refresh_clean) == (1, 5, (53, 37, 21, 5), False)
    assert plan.kv_ranges == ((0, 2), (0, 3), (0, 4), (0, 5))  # every chunk reaches back to clean chunk 0
    first = window_step(4 * 16, chunk_num=8, num_steps=64, window_size=4)
    assert first.refresh_clean and first.slice_point == 0 and first.kv_ranges[0] == (0, 1)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="multiple of window_size"):
        window_step(0, chunk_num=4, num_steps=10, window_size=4)
    with pytest.raises(ValueError, match=r"step must be in \[0, 28\)"):
        window_step(28, chunk_num=4, num_steps=16, window_size=4)
