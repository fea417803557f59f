"""The denoising schedule against the official pipeline's recorded sequence of DiT calls
(tests/fixtures/schedule_*.json, made by tests/fixtures/make_fixtures.py) and against float64 formulas."""

import json
import math
import os

import pytest
import torch

from magi1.sampling.schedule import (CLEAN_CHUNK_KVRANGE, CLEAN_T, NOISE2CLEAN_KVRANGE, check_steps,
                                     chunk_kv_range, kv_range_chunks, shifted_time, step_intervals, time_grid,
                                     total_forward_steps, unshifted_position, window_step)

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


def grid_positions(num_steps):
    """float32 u of ``time_grid``'s points (the shortcut spacing at 12 steps)."""
    if num_steps == 12:
        return torch.tensor([q / 4 + d for q in range(4) for d in (0, 1 / 8, 3 / 16)] + [1.0])
    return torch.linspace(0, 1, num_steps + 1)


def ulps(a, b):
    """Distance in float32 units in the last place, elementwise (same-sign finite values)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@pytest.mark.parametrize("num_steps", [4, 8, 12, 16, 24, 32, 48, 64])
def test_shifted_time_is_the_grid_warp_within_two_ulps(num_steps):
    """The training's warp of continuous u gives time_grid's times at the grid points, to float32 rounding
    (its own arithmetic: not bit for bit, which is why both exist)."""
    u = grid_positions(num_steps)
    t = shifted_time(u)
    assert t.dtype == torch.float32
    assert int(ulps(t, time_grid(num_steps)).max()) <= 2
    assert torch.allclose(t.double(), torch.tensor(reference_grid(num_steps), dtype=torch.float64), atol=1e-7)
    assert torch.allclose(unshifted_position(t), u, atol=1e-6)
    assert abs(shifted_time(0.5) - 0.25 / (3 - 2 * 0.25)) < 1e-12  # plain floats too


def test_shifted_time_keeps_the_trained_numbers():
    """Pins the arithmetic the tiny model was trained with: its stage bounds are time_grid(4) bit for bit,
    and at 16 steps it rounds four points differently from time_grid."""
    assert torch.equal(shifted_time(torch.arange(5) / 4), time_grid(4))
    differ = (shifted_time(torch.linspace(0, 1, 17)) != time_grid(16)).nonzero().flatten().tolist()
    assert differ == [5, 10, 11, 13]


def test_kv_range_of_a_chunk_by_its_own_step():
    assert [kv_range_chunks(s, 16) for s in range(17)] == [5] * 4 + [4] * 4 + [3] * 4 + [2] * 4 + [1]
    assert [kv_range_chunks(s, 4) for s in range(5)] == list(NOISE2CLEAN_KVRANGE) + [CLEAN_CHUNK_KVRANGE]
    assert kv_range_chunks(0, 4, noise2clean_kvrange=(9, 8)) == 9 and kv_range_chunks(4, 4, clean_chunk_kvrange=3) == 3
    assert chunk_kv_range(6, 0, 4) == (2, 7) and chunk_kv_range(1, 0, 4) == (0, 2) and chunk_kv_range(3, 4, 4) == (3, 4)
    with pytest.raises(ValueError, match="multiple of the 4 kv-range stages"):
        kv_range_chunks(0, 6)
    with pytest.raises(ValueError, match=r"step must be in \[0, 16\]"):
        kv_range_chunks(17, 16)


@pytest.mark.parametrize("num_steps,window_size,chunk_offset", [(8, 4, 0), (12, 4, 1), (16, 2, 0), (64, 4, 2)])
def test_window_ranges_are_each_chunks_own_kv_range(num_steps, window_size, chunk_offset):
    """Every key range of the window is the chunk's own: the clean refresh sees itself, a noisy chunk the
    release's range of its step's stage, written out here from the constants."""
    setup = dict(chunk_num=7, num_steps=num_steps, window_size=window_size, chunk_offset=chunk_offset)
    for step in range(total_forward_steps(**setup)):
        plan = window_step(step, **setup)
        first = plan.start - int(plan.refresh_clean)
        steps = (num_steps,) * plan.refresh_clean + plan.steps
        for chunk, (own, kv) in enumerate(zip(steps, plan.kv_ranges), start=first):
            width = CLEAN_CHUNK_KVRANGE if own == num_steps else NOISE2CLEAN_KVRANGE[own * 4 // num_steps]
            assert kv == (max(0, chunk + 1 - width), chunk + 1) == chunk_kv_range(chunk, own, num_steps)


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
    with pytest.raises(ValueError, match=r"steps must be a multiple of 4 \(window_size 4 and the 4 key-range stages\); "
                                         "the nearest valid value is 8"):
        window_step(0, chunk_num=4, num_steps=10, window_size=4)
    with pytest.raises(ValueError, match="steps must be a multiple of 12"):
        check_steps(30, 3)
    with pytest.raises(ValueError, match="window_size must be a positive integer"):
        check_steps(16, 0)
    with pytest.raises(ValueError, match=r"step must be in \[0, 28\)"):
        window_step(28, chunk_num=4, num_steps=16, window_size=4)
