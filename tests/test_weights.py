"""cache_core weight functions against an independent float64 reference written with plain loops."""

import math

import pytest
import torch

from cache_core import combine_weights, detail_weights, motion_weights

RTOL, NOISE = 1e-5, 1e-6  # the documented "constant frame" tolerances of cache_core.token_weights


# ----------------------------------------------------------------------------------------------------
# Slow float64 reference: every quantity spelled out element by element.


def _floor_map(pooled, noise, floor, power=1.0):
    """Per-frame min–max → power → [floor, 1]; a frame whose spread is round-off or noise is all 1."""
    out = []
    for frame in pooled:
        values = [v for row in frame for v in row]
        lo, hi = min(values), max(values)
        if hi - lo <= RTOL * max(abs(hi), abs(lo)) + noise:
            out.append([[1.0 for _ in row] for row in frame])
        else:
            out.append([[floor + (1 - floor) * ((v - lo) / (hi - lo)) ** power for v in row] for row in frame])
    return out


def _pool(values, patch):
    ph, pw = patch
    H, W = len(values), len(values[0])
    pooled = []
    for a in range(H // ph):
        row = []
        for b in range(W // pw):
            total = 0.0
            for i in range(a * ph, (a + 1) * ph):
                for j in range(b * pw, (b + 1) * pw):
                    total += values[i][j]
            row.append(total / (ph * pw))
        pooled.append(row)
    return pooled


def ref_motion(latent, prev_frame, patch, floor, power):
    x = latent.double().tolist()
    prev = None if prev_frame is None else prev_frame.double().tolist()
    C, T, H, W = latent.shape
    frames = []
    for f in range(T):
        if f == 0 and prev is None:
            frames.append(None)
            continue
        before_frame = prev if f == 0 else [x[c][f - 1] for c in range(C)]
        scale = max(abs(v) for frame in ([x[c][f] for c in range(C)], before_frame) for ch in frame for row in ch for v in row)
        diff = [[0.0] * W for _ in range(H)]
        for i in range(H):
            for j in range(W):
                total = 0.0
                for c in range(C):
                    before = prev[c][i][j] if f == 0 else x[c][f - 1][i][j]
                    total += abs(x[c][f][i][j] - before)
                diff[i][j] = total / C
        frames.append((_pool(diff, patch), NOISE * scale))
    out = []
    for frame in frames:
        if frame is None:
            out.append([[1.0] * (W // patch[1]) for _ in range(H // patch[0])])
        else:
            out.extend(_floor_map([frame[0]], frame[1], floor, power))
    return torch.tensor(out, dtype=torch.float64)


def _reflect(i, n):
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def ref_detail(latent, window, patch, floor):
    x = latent.double().tolist()
    C, T, H, W = latent.shape
    r = window // 2
    out = []
    for f in range(T):
        mag = [[sum(abs(x[c][f][i][j]) for c in range(C)) / C for j in range(W)] for i in range(H)]
        var = [[0.0] * W for _ in range(H)]
        for i in range(H):
            for j in range(W):
                vals = [mag[_reflect(i + di, H)][_reflect(j + dj, W)] for di in range(-r, r + 1) for dj in range(-r, r + 1)]
                mean = sum(vals) / len(vals)
                var[i][j] = sum((v - mean) ** 2 for v in vals) / len(vals)
        noise = (NOISE * max(v for row in mag for v in row)) ** 2
        out.extend(_floor_map([_pool(var, patch)], noise, floor))
    return torch.tensor(out, dtype=torch.float64)


def assert_close(actual, expected):
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------

SHAPES = [  # (C, T, H, W), patch
    ((1, 1, 2, 2), (2, 2)),
    ((3, 1, 4, 6), (2, 2)),
    ((4, 3, 6, 10), (2, 2)),
    ((16, 2, 10, 14), (2, 2)),
    ((2, 3, 9, 15), (3, 3)),
    ((5, 2, 7, 5), (1, 1)),
    ((3, 4, 9, 4), (3, 2)),
]


@pytest.mark.parametrize("shape,patch", SHAPES)
@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("floor,power", [(0.6, 1.0), (0.0, 2.0), (0.3, 0.5), (1.0, 1.0)])
def test_motion_weights_match_reference(shape, patch, with_prev, floor, power):
    g = torch.Generator().manual_seed(hash((shape, patch, with_prev, floor, power)) % 2**31)
    latent = torch.randn(shape, generator=g) * 2.0 + 0.5
    prev = torch.randn(shape[0], shape[2], shape[3], generator=g) if with_prev else None
    actual = motion_weights(latent, prev, patch=patch, floor=floor, power=power)
    assert_close(actual, ref_motion(latent, prev, patch, floor, power))


@pytest.mark.parametrize(
    "shape,patch,window",
    # windows larger than the frame are a validation case, tested below
    [(s, p, w) for s, p in SHAPES for w in (1, 3, 5) if w <= min(s[2], s[3])],
)
@pytest.mark.parametrize("floor", [0.5, 0.0, 1.0])
def test_detail_weights_match_reference(shape, patch, window, floor):
    g = torch.Generator().manual_seed(hash((shape, patch, window, floor)) % 2**31)
    latent = torch.randn(shape, generator=g) * 1.5 - 0.25
    actual = detail_weights(latent, window=window, patch=patch, floor=floor)
    assert_close(actual, ref_detail(latent, window, patch, floor))


def test_weights_of_constant_frames_are_one():
    g = torch.Generator().manual_seed(7)
    latent = torch.randn(4, 4, 6, 8, generator=g)
    latent[:, 1] = latent[:, 0]  # no change at all
    latent[:, 2] = latent[:, 1] + 0.37  # the same change everywhere (up to float32 rounding)
    motion = motion_weights(latent, patch=(2, 2), floor=0.6)
    assert torch.equal(motion[:3], torch.ones(3, 3, 4))  # frame 0 (no prev_frame) and the two constant frames
    assert motion[3].min() == pytest.approx(0.6) and motion[3].max() == pytest.approx(1.0)
    assert_close(motion, ref_motion(latent, None, (2, 2), 0.6, 1.0))

    flat = torch.randn(4, 3, 6, 8, generator=g)
    flat[:, 1] = 0.8  # constant magnitude: no texture anywhere
    flat[:, 2, :, :] = torch.randn(4, 1, 1, generator=g)  # varies over channels only
    detail = detail_weights(flat, window=3, floor=0.5)
    assert torch.equal(detail[1:], torch.ones(2, 3, 4))
    assert detail[0].min() == pytest.approx(0.5) and detail[0].max() == pytest.approx(1.0)


def test_prev_frame_drives_frame_zero_only():
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(4, 3, 4, 4, generator=g)
    without = motion_weights(latent)
    with_prev = motion_weights(latent, torch.randn(4, 4, 4, generator=g))
    assert torch.equal(without[0], torch.ones(2, 2))
    assert not torch.equal(with_prev[0], without[0])
    assert torch.equal(with_prev[1:], without[1:])


def test_weights_compute_in_float32_from_half_inputs():
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(4, 2, 6, 6, generator=g).to(torch.bfloat16)
    assert_close(motion_weights(latent), ref_motion(latent, None, (2, 2), 0.6, 1.0))
    assert_close(detail_weights(latent), ref_detail(latent, 3, (2, 2), 0.5))


@pytest.mark.parametrize("mode", ["max", "product", "blend"])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_combine_weights_match_reference(mode, lam):
    g = torch.Generator().manual_seed(11)
    wm, wd = torch.rand(3, 5, 7, generator=g), torch.rand(3, 5, 7, generator=g)
    expected = torch.empty(3, 5, 7, dtype=torch.float64)
    for idx in range(wm.numel()):
        m, d = float(wm.view(-1)[idx]), float(wd.view(-1)[idx])
        expected.view(-1)[idx] = {"max": max(m, d), "product": m * d, "blend": (1 - lam) * m + lam * d}[mode]
    assert_close(combine_weights(wm, wd, mode=mode, lam=lam), expected)


# ----------------------------------------------------------------------------------------------------
# Validation: every bad input raises ValueError naming the parameter.

X = torch.zeros(2, 2, 4, 4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: motion_weights(torch.zeros(2, 4, 4)), "latent must be .*\\[C, T, H, W\\]"),
        (lambda: motion_weights(torch.zeros(2, 2, 4, 4, dtype=torch.int64)), "latent must be a floating-point"),
        (lambda: motion_weights([[1.0]]), "latent must be"),
        (lambda: motion_weights(torch.zeros(0, 2, 4, 4)), "at least one channel and one frame"),
        (lambda: motion_weights(torch.zeros(2, 2, 5, 4)), "multiples of patch=\\(2, 2\\).*nearest valid sizes are 6x4"),
        (lambda: motion_weights(X, patch=(2, 0)), "patch must be a pair of positive integers"),
        (lambda: motion_weights(X, patch=2), "patch must be a pair"),
        (lambda: motion_weights(X, floor=1.5), "floor must be a finite number in \\[0, 1\\]"),
        (lambda: motion_weights(X, floor=-0.1), "floor must be"),
        (lambda: motion_weights(X, power=0), "power must be a finite number > 0"),
        (lambda: motion_weights(X, power=math.nan), "power must be"),
        (lambda: motion_weights(X, torch.zeros(2, 4)), "prev_frame must be a tensor of shape \\[C, H, W\\]"),
        (lambda: motion_weights(X, torch.zeros(3, 4, 4)), "prev_frame shape .* does not match"),
        (lambda: motion_weights(X, torch.full((2, 4, 4), math.inf)), "prev_frame contains NaN or Inf"),
        (lambda: motion_weights(torch.full((2, 2, 4, 4), math.nan)), "latent contains NaN or Inf"),
        (lambda: detail_weights(X, window=2), "window must be an odd positive integer"),
        (lambda: detail_weights(X, window=0), "window must be an odd positive integer"),
        (lambda: detail_weights(X, window=5), "window=5 is larger than the latent frame \\(4x4\\); use at most 4"),
        (lambda: detail_weights(X, window=3.0), "window must be an odd positive integer"),
        (lambda: detail_weights(X, floor=2), "floor must be"),
        (lambda: detail_weights(X.clone().index_fill_(0, torch.tensor([1]), math.inf)), "latent contains NaN or Inf"),
        (lambda: combine_weights(torch.ones(2, 2), torch.ones(2, 3)), "w_motion shape .* and w_detail shape .* must match"),
        (lambda: combine_weights(torch.ones(2, 2), torch.ones(2, 2), mode="sum"), "mode must be one of \\('max', 'product', 'blend'\\)"),
        (lambda: combine_weights(torch.ones(2, 2), torch.ones(2, 2), lam=1.5), "lam must be a finite number in \\[0, 1\\]"),
        (lambda: combine_weights(torch.ones(2, 2), None), "w_detail must be a floating-point tensor"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()
