"""bench.quality.grid: the dense-grid measurement. Its regions, its reading between measured points (never
across a gap), its paired differences, and a resumable run on the tiny model."""

import json
import math
import statistics

import pytest
import torch

from bench.quality import grid


def test_motion_regions_find_a_moving_square_and_leave_the_background():
    g = torch.Generator().manual_seed(0)
    video = torch.full((3, 12, 32, 32), -0.5) + 0.01 * torch.randn(3, 12, 32, 32, generator=g)  # faint flicker
    for f in range(12):
        video[:, f, 8:16, 2 * f:2 * f + 8] = 0.8  # a square moving right, 2 pixels a frame
    moving, static = grid.motion_regions(video)
    assert moving.shape == static.shape == (12, 32, 32) and not (moving & static).any()
    assert 0.45 <= static.float().mean() <= 0.55
    assert not moving[:, :8].any() and not moving[:, 16:].any()  # only the rows the square runs along
    assert moving[:, 8:16].flatten(1).any(dim=1).all()  # and in every frame
    for f in range(1, 11):  # around the square: where it was and where it goes, not the far background
        columns = moving[f, 8:16].any(dim=0).nonzero().flatten()
        assert columns.min() >= 2 * f - 4 and columns.max() < 2 * f + 12


def test_region_psnr_is_the_psnr_of_the_masked_pixels():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 4, 8, 8, generator=g), torch.rand(3, 4, 8, 8, generator=g)
    mask = torch.rand(4, 8, 8, generator=g) > 0.5
    picked = mask.expand(3, -1, -1, -1)
    mse = float((a[picked].double() - b[picked].double()).pow(2).mean())
    assert grid.region_psnr(a, b, mask) == pytest.approx(10 * math.log10(4.0 / mse))
    assert grid.region_psnr(a, b, torch.zeros_like(mask)) is None and grid.region_psnr(a, a, mask) == 99.0


def rows(*points):
    """Grid rows of per-video PSNRs: ``(tau, ratio, {video: value})``."""
    return [(tau, ratio, {v: {"psnr": value} for v, value in values.items()}) for tau, ratio, values in points]


def test_values_are_read_between_close_points_only():
    measured = rows((0.1, 1.4, {0: 40.0, 1: 30.0}), (0.2, 1.6, {0: 30.0, 1: 20.0}), (0.4, 2.2, {0: 20.0, 1: 10.0}))
    assert grid.at_ratio(measured, 1.5) == pytest.approx({0: 35.0, 1: 25.0})
    assert grid.at_ratio(measured, 1.41) == {0: 40.0, 1: 30.0}  # within 0.02 of a point: that point
    assert grid.at_ratio(measured, 1.9) is None  # 1.6 and 2.2 are 0.6x apart: not measured
    assert grid.at_ratio(measured, 1.2) is None and grid.at_ratio(measured, 2.5) is None  # outside


def test_paired_differences_and_their_interval():
    a = {v: 30.0 + v for v in range(10)}
    b = {v: 29.0 + v + (0.5 if v % 2 else -0.5) for v in range(10)}
    mean, half, n = grid.paired(a, b)
    diffs = [a[v] - b[v] for v in range(10)]
    assert n == 10 and mean == pytest.approx(statistics.mean(diffs))
    assert half == pytest.approx(1.96 * statistics.stdev(diffs) / math.sqrt(10))
    assert grid.paired({0: 1.0}, {0: 2.0}) is None


def test_a_run_measures_every_video_once_and_resumes(tmp_path):
    setup = {"model": "tiny", "frames": 24, "steps": 4, "prompts": ["a red ball moving right over a checkerboard"],
             "seeds": [0, 1], "default": "flowcache",
             "policies": [{"policy": "flowcache", "taus": [0.05, 0.3]}, {"policy": "teacache", "taus": [0.2]}]}
    out = tmp_path / "grid.jsonl"
    grid.run(setup, str(out), log=lambda *_: None)
    records = grid.read_records(str(out))
    assert len(records) == 2 * (1 + 3)  # per seed: the reference and three points
    assert {(r["policy"], r["tau"], r["seed"]) for r in records} >= {("flowcache", 0.3, 1), ("off", 0.0, 0)}
    off = [r for r in records if r["policy"] == "off"]
    assert all(r["psnr"] == 99.0 and r["flops"] == r["dense_flops"] for r in off)
    assert all(r["flops"] < r["dense_flops"] for r in records if r["policy"] == "flowcache" and r["tau"] == 0.3)
    grid.run(setup, str(out), log=lambda *_: None)  # nothing left to do
    assert len(grid.read_records(str(out))) == len(records)
    text = grid.report(setup, records, "grid")
    assert "| flowcache | 0.3 | 2 |" in text and "first-chunk PSNR" in text and "not measured" in text
    json.dumps(records)  # plain JSON lines


def test_speedup_at_quality_reads_the_crossing_only_inside_a_close_pair():
    def videos(*values):
        return {(v, 0): {"psnr": value} for v, value in enumerate(values)}

    close = [(0.1, 1.4, videos(40, 40)), (0.2, 1.6, videos(30, 30)), (0.3, 2.5, videos(20, 20))]
    assert grid.speedup_at_quality(close, 35.0) == pytest.approx(1.5)  # 40 dB at 1.4x, 30 at 1.6x
    assert grid.speedup_at_quality(close, 25.0) == (1.6, 2.5)  # the crossing lies in a 0.9x gap
    assert grid.speedup_at_quality(close, 45.0) is None
    assert grid.speedup_at_quality(close, 15.0) == 2.5
