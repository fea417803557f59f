"""CachePolicy: defaults, validation, immutability, presets and phases."""

import dataclasses
import math

import pytest

from cache_core import MODES, CachePolicy


def test_defaults_reproduce_the_released_motioncache_configuration():
    policy = CachePolicy()
    # released MotionCache MAGI-1 (cache.md §4.1)
    assert (policy.warmup_steps, policy.chunk_wise_steps, policy.tau, policy.motion_floor) == (5, 20, 0.0065, 0.6)
    assert policy.chunk_threshold == 0.0065 and policy.motion_power == 1.0 and policy.proxy == "denoised"
    # MotionDetailCache defaults
    assert (policy.detail_alpha, policy.detail_window_size, policy.detail_lambda) == (0.5, 3, 0.5)
    assert policy.weight_combine_mode == "max" and policy.mode == "motion_detail"
    # fixes to the released code, on by default
    assert policy.final_full_steps >= 1 and policy.rescale_reused_velocity
    # no reuse cap and no deferral unless asked for
    assert policy.max_reuse is None and policy.min_active_ratio == 0.0


def test_policy_is_frozen_and_hashable():
    policy = CachePolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.tau = 0.1
    assert hash(policy) == hash(CachePolicy()) and policy == CachePolicy()
    assert policy.replace(tau=0.01).tau == 0.01 and policy.tau == 0.0065


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(mode="fast"), r"mode must be one of \('off', 'teacache', 'flowcache', 'motion', 'motion_detail', 'hybrid'\)"),
        (dict(tau=-0.1), "tau must be a finite number >= 0"),
        (dict(tau=math.inf), "tau must be a finite number"),
        (dict(tau="0.1"), "tau must be a finite number"),
        (dict(chunk_tau=-1.0), "chunk_tau must be a finite number >= 0"),
        (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
        (dict(warmup_steps=2.5), "warmup_steps must be an integer"),
        (dict(warmup_steps=True), "warmup_steps must be an integer"),
        (dict(chunk_wise_steps=-3), "chunk_wise_steps must be an integer >= 0"),
        (dict(final_full_steps=-1), "final_full_steps must be an integer >= 0"),
        (dict(motion_floor=1.2), "motion_floor must be a finite number in \\[0, 1\\]"),
        (dict(motion_floor=-0.2), "motion_floor must be a finite number in \\[0, 1\\]"),
        (dict(motion_power=0.0), "motion_power must be a finite number > 0"),
        (dict(detail_alpha=2.0), "detail_alpha must be a finite number in \\[0, 1\\]"),
        (dict(detail_window_size=4), "detail_window_size must be an odd positive integer"),
        (dict(detail_window_size=0), "detail_window_size must be an odd positive integer"),
        (dict(detail_window_size=3.0), "detail_window_size must be an odd positive integer"),
        (dict(detail_lambda=-0.5), "detail_lambda must be a finite number in \\[0, 1\\]"),
        (dict(weight_combine_mode="sum"), r"weight_combine_mode must be one of \('max', 'product', 'blend'\)"),
        (dict(proxy="velocity"), r"proxy must be one of \('latent', 'denoised'\)"),
        (dict(max_reuse=0), r"max_reuse must be a positive integer \(use None for no cap\)"),
        (dict(max_reuse=1.5), "max_reuse must be a positive integer"),
        (dict(min_active_ratio=1.5), "min_active_ratio must be a finite number in \\[0, 1\\]"),
        (dict(rescale_reused_velocity=1), "rescale_reused_velocity must be True or False"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        CachePolicy(**changes)
    with pytest.raises(ValueError, match=match):  # replace() validates too
        CachePolicy().replace(**changes)


def test_presets_are_named_constructors_with_overrides():
    slow, fast = CachePolicy.slow(), CachePolicy.fast()
    assert isinstance(slow, CachePolicy) and isinstance(fast, CachePolicy)
    assert fast.tau > slow.tau  # fast reuses more
    assert CachePolicy.slow(mode="motion").mode == "motion"
    assert CachePolicy.preset("slow") == slow and CachePolicy.preset("fast") == fast
    assert CachePolicy.preset("off").mode == "off" and CachePolicy.preset("default") == CachePolicy()
    with pytest.raises(ValueError, match="preset must be one of"):
        CachePolicy.preset("turbo")
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        CachePolicy.fast(tau=-1.0)


@pytest.mark.parametrize("mode", MODES)
def test_phase_table(mode):
    policy = CachePolicy(mode=mode, warmup_steps=2, chunk_wise_steps=3, final_full_steps=2)
    phases = [policy.phase(k, 10) for k in range(10)]
    expected = {
        "off": ["off"] * 10,
        "teacache": ["warmup"] * 2 + ["window"] * 6 + ["final"] * 2,
        "flowcache": ["warmup"] * 2 + ["chunk"] * 6 + ["final"] * 2,
        "motion": ["warmup"] * 2 + ["chunk"] * 3 + ["token"] * 3 + ["final"] * 2,
        "motion_detail": ["warmup"] * 2 + ["chunk"] * 3 + ["token"] * 3 + ["final"] * 2,
        "hybrid": ["warmup"] * 2 + ["chunk"] * 3 + ["hybrid"] * 3 + ["final"] * 2,
    }[mode]
    assert phases == expected
    assert policy.enabled == (mode != "off")
    assert policy.uses_token_weights == (mode in ("motion", "motion_detail", "hybrid"))
    assert policy.uses_detail_weights == (mode in ("motion_detail", "hybrid"))


def test_a_schedule_that_never_reaches_the_token_phase_is_named():
    released = CachePolicy(mode="motion_detail")  # 5 warm-up + 20 chunk-level steps, as released
    assert released.unreached_token_phase(16) == ("token phase never reached at 16 steps: warm-up 5 + chunk-level 20 "
                                                   "+ final 2; lower them or use more steps")
    assert released.unreached_token_phase(64) is None
    assert CachePolicy.slow().unreached_token_phase(16) is None
    assert CachePolicy(mode="flowcache").unreached_token_phase(16) is None  # chunk-level by design
