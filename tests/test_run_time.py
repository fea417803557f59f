"""``magi1.planning.run_time``: the FLOP count of a run is what the sampler's DiT calls compute (counted here call by
call on the tiny model, from what each call is given), the estimate scales with the work and the device's
rate, and the rate is measured once per device and dtype."""

import pytest
import torch

from magi1 import Guidance, ModelConfig, flops
from run_request import generate
from magi1.planning import run_time
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS
from magi1.planning.run_time import format_clock, format_duration, matmul_throughput
from run_request import estimate_run, run_flops
from magi1.builtin import TINY

PROMPT_TOKENS = 20
FOUR_B = ModelConfig(**OFFICIAL_MODEL_CONFIGS["4.5B"])


@pytest.fixture(scope="module")
def dit():
    return TINY.load_dit()


def counted_run(dit, *, passes, frames, prefix_frames=0, steps=4):
    """``generate`` on the tiny model, every DiT call counted from its inputs: ``(FLOPs, calls, result, the
    windows (first, end) of every step)``."""
    config, forward, seen = dit.config, dit.forward, []

    def counting(x, t, caption, caption_mask, kv_range, **kwargs):
        assert kwargs.get("active") is None  # no cache policy: every token computed
        sequences, _, frames_in, height, width = x.shape
        chunks = t.shape[1]
        queries = frames_in * height * width // config.patch_size**2 // chunks
        for s in range(sequences):
            for j, (start, end) in enumerate(kv_range):
                seen.append(flops(config, query_tokens=queries, key_tokens=int(end - start),
                                  caption_tokens=int(caption_mask[s, j].sum())).total)
        seen.append(None)  # one call
        return forward(x, t, caption, caption_mask, kv_range, **kwargs)

    windows = []
    caption = torch.randn(config.caption_max_length, config.caption_channels)
    mask = torch.arange(config.caption_max_length) < PROMPT_TOKENS
    prefix = torch.randn(16, prefix_frames, 8, 8) if prefix_frames else None
    dit.forward = counting
    try:
        result = generate(dit, caption, mask, frames=frames, height=64, width=64, steps=steps, prefix=prefix,
                          guidance=Guidance(passes=passes), on_step=lambda p: windows.append(p.chunks))
    finally:
        del dit.forward  # the class's forward again
    return sum(f for f in seen if f is not None), seen.count(None), result, windows


@pytest.mark.parametrize("passes, frames, prefix_frames", [(1, 72, 0), (3, 48, 0), (1, 24, 7)])
def test_the_count_is_what_the_dit_calls_compute(dit, passes, frames, prefix_frames):
    """Distilled (one pass and the nearly-clean copy) over a 3-chunk window, base (three passes), and a prefix
    video of 7 latent frames (one clean chunk encoded, one chunk partly prefix, one new)."""
    counted, calls, result, windows = counted_run(dit, passes=passes, frames=frames, prefix_frames=prefix_frames)
    work = run_flops(dit.config, frames=frames, height=64, width=64, steps=4, passes=passes,
                     prefix_frames=prefix_frames, caption_tokens=PROMPT_TOKENS)
    assert work.flops == pytest.approx(counted, rel=1e-12) and work.dit_calls == calls
    assert work.flops == pytest.approx(result.stats.dense_flops, rel=1e-12)  # the sampler's own dense count
    assert work.forward_steps == len(windows) == len(work.step_flops) and sum(work.step_flops) == work.flops
    # a chunk is done after the last step whose window holds it: the next window starts after it
    after = [start - work.chunk_offset for start, _ in windows[1:]] + [work.chunks]
    assert list(work.chunks_done) == after
    assert work.chunk_offset == prefix_frames // 6 and work.chunks == -(-(frames // 4 + prefix_frames) // 6) - (
        prefix_frames // 6)


def test_the_estimate_scales_with_the_work_and_the_rate():
    request = dict(frames=96, height=720, width=720, steps=16, device="cpu", throughput=1e12, efficiency=0.5)
    one = estimate_run(FOUR_B, passes=1, **request)
    assert one.seconds == pytest.approx(one.flops / 5e11) and one.efficiency == 0.5 and one.throughput == 1e12
    assert estimate_run(FOUR_B, passes=1, processes=4, **request).seconds == pytest.approx(one.seconds / 4)
    assert estimate_run(FOUR_B, passes=1, **{**request, "throughput": 2e12}).seconds == pytest.approx(one.seconds / 2)
    three = estimate_run(FOUR_B, passes=3, **request)
    assert 2 < three.flops / one.flops < 3  # uncond sees each chunk alone, the one pass has a nearly-clean copy
    bigger = estimate_run(FOUR_B, passes=1, **{**request, "height": 1440, "width": 1440})
    assert bigger.flops / one.flops > 4  # 4x the tokens, and attention grows with their square
    longer = estimate_run(FOUR_B, passes=1, **{**request, "frames": 192})
    assert 2 < longer.flops / one.flops < 2.5  # 8 chunks, not 4: the window slides over them
    assert one.chunks == 4 and one.forward_steps == 4 * (4 + 3) and one.dit_calls == one.forward_steps
    # a 4.5B-distill 4096x4096 run on an H100-class GPU (~700 TFLOP/s bf16 GEMMs): hours
    huge = estimate_run(FOUR_B, passes=1, frames=48, height=4096, width=4096, steps=16, device="cpu", throughput=7e14)
    assert huge.seconds > 3600


def test_descriptions(dit):
    estimate = estimate_run(dit.config, frames=48, height=64, width=64, steps=8, passes=1, throughput=1e9,
                            efficiency=1.0)
    assert estimate.describe() == str(estimate) == f"about {format_duration(estimate.flops / 1e9)} on the CPU"
    assert (format_duration(0.2), format_duration(42), format_duration(185), format_duration(2.43 * 3600),
            format_duration(4 * 86400)) == ("1 s", "42 s", "3 min", "2.4 h", "4.0 days")
    assert (format_clock(4.6), format_clock(725), format_clock(7389)) == ("0:05", "12:05", "2:03:09")


def test_cuda_estimates_name_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    estimate = estimate_run(FOUR_B, frames=48, height=720, width=720, steps=16, passes=1, device="cuda",
                            dtype=torch.bfloat16, throughput=1e15)
    assert estimate.device == "cuda:0" and estimate.dtype == "bfloat16" and estimate.efficiency == 0.5
    assert estimate.describe().endswith(" on cuda:0")
    four = estimate_run(FOUR_B, frames=48, height=720, width=720, steps=16, passes=1, device="cuda",
                        dtype=torch.bfloat16, throughput=1e15, processes=4)
    assert four.describe() == f"about {format_duration(estimate.seconds / 4)} on 4 GPUs like cuda:0"


def test_the_rate_is_measured_once_per_device_and_dtype(dit, monkeypatch):
    measured = []

    def measure(device, dtype):
        measured.append((device, dtype))
        return 1e11

    monkeypatch.setattr(run_time, "_THROUGHPUT", {})
    monkeypatch.setattr(run_time, "_measure_matmul", measure)
    for _ in range(2):
        estimate = estimate_run(dit.config, frames=24, height=64, width=64, steps=8, passes=1)
        assert estimate.throughput == 1e11
    assert matmul_throughput("cpu") == 1e11 and len(measured) == 1
    matmul_throughput(torch.device("cpu"), torch.bfloat16)
    matmul_throughput("cpu", torch.float8_e4m3fn)  # float8 weights compute in bfloat16: the same measurement
    assert measured == [(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.bfloat16)]


def test_the_measurement_times_real_matmuls():
    rate = run_time._measure_matmul(torch.device("cpu"), torch.float32, seconds=0.02)
    assert 1e8 < rate < 1e14  # FLOP/s of any CPU


def test_bad_requests_are_refused(dit):
    config = dit.config
    with pytest.raises(ValueError, match="passes must be one of"):
        run_flops(config, frames=48, height=64, width=64, steps=8, passes=2)
    with pytest.raises(ValueError, match="steps must be a multiple of 4"):
        run_flops(config, frames=48, height=64, width=64, steps=6, passes=1)
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        run_flops(config, frames=48, height=64, width=72, steps=8, passes=1)
