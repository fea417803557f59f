"""The benchmark's quality metrics against slow float64 loops on fresh random inputs."""

import math

import pytest

import torch

from bench.quality.metrics import psnr, ssim, temporal_psnr


def slow_ssim(video, reference, size=11, sigma=1.5):
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    half = (size - 1) / 2
    weights = [[math.exp(-((i - half) ** 2 + (j - half) ** 2) / (2 * sigma ** 2)) for j in range(size)]
               for i in range(size)]
    total = sum(map(sum, weights))
    values = []
    channels, frames, height, width = video.shape
    for c in range(channels):
        for f in range(frames):
            a, b = video[c, f].tolist(), reference[c, f].tolist()
            for top in range(height - size + 1):
                for left in range(width - size + 1):
                    mx = my = xx = yy = xy = 0.0
                    for i in range(size):
                        for j in range(size):
                            w = weights[i][j] / total
                            p, q = a[top + i][left + j], b[top + i][left + j]
                            mx, my, xx, yy, xy = mx + w * p, my + w * q, xx + w * p * p, yy + w * q * q, xy + w * p * q
                    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
                    values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return sum(values) / len(values)


def test_ssim_matches_the_definition():
    generator = torch.Generator().manual_seed(11)
    reference = torch.rand(3, 2, 14, 13, generator=generator, dtype=torch.float64) * 2 - 1
    video = (reference + 0.3 * torch.randn(reference.shape, generator=generator, dtype=torch.float64)).clamp(-1, 1)
    assert abs(ssim(video, reference) - slow_ssim(video, reference)) < 1e-10
    assert ssim(reference, reference) == 1.0


def test_psnr():
    generator = torch.Generator().manual_seed(12)
    reference = torch.rand(3, 4, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(reference.shape, generator=generator)
    video = reference + noise
    mse = sum(float(n) ** 2 for n in noise.double().flatten()) / noise.numel()
    assert abs(psnr(video, reference) - 10 * math.log10(4 / mse)) < 1e-9
    assert psnr(reference, reference) == math.inf


def test_temporal_psnr_compares_frame_to_frame_changes():
    generator = torch.Generator().manual_seed(13)
    reference = torch.rand(3, 5, 6, 7, generator=generator, dtype=torch.float64) * 2 - 1
    video = reference + 0.1 * torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    errors = [float(video[c, f + 1, i, j] - video[c, f, i, j] - reference[c, f + 1, i, j] + reference[c, f, i, j])
              for c in range(3) for f in range(4) for i in range(6) for j in range(7)]
    mse = sum(e * e for e in errors) / len(errors)
    assert abs(temporal_psnr(video, reference) - 10 * math.log10(4 / mse)) < 1e-9
    # a constant offset on every frame leaves the changes, and so the temporal PSNR, untouched
    assert temporal_psnr(reference + 0.5, reference) == math.inf


def test_equal_quality_reads_a_results_table_and_interpolates_the_largest_ratio_above_the_bar():
    from bench.quality.equal_quality import ratio_at_quality, read_rows, report

    table = "\n".join([
        "| policy | τ | token-steps computed | FLOP ratio | wall speed-up | speed-up / FLOP ratio | PSNR dB | x |",
        "|---|---|---|---|---|---|---|---|",
        "| off | 0 | 100% | 1.00x | 1.00x | 1.00 | 99.0 | 0.0 |",
        "| a | 0.1 | 80% | 1.20x | 1.10x | 0.92 | 40.0 | 0.1 |",
        "| a | 0.2 | 60% | 1.60x | 1.50x | 0.94 | 30.0 | 0.1 |",
        "| a | 0.4 | 40% | 2.40x | 2.00x | 0.83 | 31.0 | 0.1 |",  # noisy: above 30 again further on
        "| b | 0.1 | 90% | 1.10x | 1.05x | 0.95 | 20.0 | 0.1 |",
    ])
    rows = read_rows(table)
    assert rows[0] == ("a", 1.2, 1.1, 40.0) and len(rows) == 4
    assert ratio_at_quality([(1.2, 40.0), (1.6, 30.0), (2.4, 31.0)], 35.0) == pytest.approx(1.4)  # halfway 1.2-1.6
    assert ratio_at_quality([(1.2, 40.0), (1.6, 30.0), (2.4, 31.0)], 30.0) == pytest.approx(2.4)
    # off (1x, 99 dB) starts every sweep: 1.1x at 20 dB crosses 35 dB at 1 + 0.1 * 64/79
    assert ratio_at_quality([(1.1, 20.0)], 35.0) == pytest.approx(1.0 + 0.1 * 64 / 79)
    text = report(rows, [35.0])
    assert "| a | 1.40x / 1.30x |" in text and text.count("\n") == 3
