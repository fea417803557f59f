"""CachePolicy: every knob of the caching schedule, immutable and validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .checks import check_choice, check_int, check_number
from .state import CacheState
from .token_weights import COMBINE_MODES, check_window

MODES = ("off", "teacache", "flowcache", "motion", "motion_detail", "hybrid")
PROXIES = ("latent", "denoised")
# The schedule the presets were calibrated with (suits distilled runs of 8-16 steps a chunk).
PRESET_SCHEDULE = dict(warmup_steps=2, chunk_wise_steps=2, final_full_steps=1, max_reuse=4)
# The rest of the presets' policy: the mode the cache node selects by default, reused velocities
# extrapolated from the last two computes, and the chunk threshold as a multiple of τ (hybrid: a chunk
# whose change passes it computes only its tokens due, the high-weight ones first). Chosen by the
# ablations on the benchmark model's calibration set (bench/results/ablation1_every_variant*, bench/results/calibration_bench.md).
PRESET_MODE = "hybrid"
PRESET_OPTIONS = dict(velocity_extrapolation=1.0)
PRESET_CHUNK_RATIO = 1.5


@dataclass(frozen=True)
class CachePolicy:
    """How a sampling run decides which tokens of each chunk to recompute at every step.

    Defaults reproduce the released MotionCache MAGI-1 configuration (warm-up 5, chunk-wise phase 20,
    τ 0.0065, motion floor 0.6) with the MotionDetailCache defaults, plus the fixes to the released
    code: guaranteed final full steps and velocity reuse rescaled by the current step size. One default
    departs from the release: the weights are measured on the denoised estimate (``proxy``), which the
    benchmark (``bench/results/policies_tiny.md``) found as good or better than the noisy latent at every FLOP saving.

    Phases of one chunk, from its own step counter k (0-based) out of ``num_steps``:

    * ``k < warmup_steps``: always computed;
    * ``k < warmup_steps + chunk_wise_steps``: the whole chunk is reused or recomputed (FlowCache);
    * later: per-token masks (``motion`` / ``motion_detail``), or in ``hybrid`` both rules at once: the
      whole chunk is reused while its accumulated change stays under ``chunk_tau``, else the tokens whose
      motion+detail accumulator reached τ are computed;
    * ``k >= num_steps - final_full_steps``: always computed.

    ``flowcache`` stays chunk-wise after warm-up; ``teacache`` makes one decision for the whole window.
    """

    mode: str = "motion_detail"
    # Token-wise threshold τ: a token is recomputed once its accumulated weighted change reaches τ.
    tau: float = 0.0065
    # Chunk-level threshold (chunk-wise phase, flowcache, teacache); None means the same as tau.
    chunk_tau: Optional[float] = None
    warmup_steps: int = 5
    chunk_wise_steps: int = 20
    final_full_steps: int = 2
    motion_floor: float = 0.6
    motion_power: float = 1.0
    detail_alpha: float = 0.5  # floor of the detail weights
    detail_window_size: int = 3
    detail_lambda: float = 0.5  # detail share of the "blend" combine mode
    weight_combine_mode: str = "max"
    # Weights from the noisy latent x_t (as released) or from the denoised estimate x_t + (1 - t)·v.
    proxy: str = "denoised"
    # Most consecutive steps one chunk or token may be reused before it is forced fresh; None = no cap.
    max_reuse: Optional[int] = None
    # A sparse update touching fewer than this fraction of a chunk's tokens is deferred (tokens keep
    # accumulating) unless a token is forced by max_reuse.
    min_active_ratio: float = 0.0
    # Reused tokens advance with cached velocity × current step size; False reproduces the released
    # code, which re-applies the old displacement (cached velocity × the step size it was computed at).
    rescale_reused_velocity: bool = True
    # How a reused token's velocity is made from its computed ones: 0 holds the last (as released), 1
    # extrapolates linearly in time from the last two, values between damp the extrapolation.
    velocity_extrapolation: float = 0.0
    # The extrapolation's order: 1 from the last two computed velocities, 2 from the last three (a quadratic
    # in time, still never more than one span ahead).
    extrapolation_order: int = 1
    # Token threshold over a chunk's steps: τ·(1 + tau_ramp·(2k/(n − 1) − 1)) at step k of n, so 0 keeps
    # τ, and a positive ramp reuses less early (while the layout forms) and more late, τ on average.
    tau_ramp: float = 0.0
    # Also compute the spatial neighbours (3x3, same frame) of every token due: moving edges stay fresh.
    refresh_neighbours: bool = False
    # Most tokens of a chunk computed in one token-wise step, as a fraction (those with the largest
    # accumulators first; tokens forced by max_reuse always count); None = no budget.
    max_active_ratio: Optional[float] = None

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_number("tau", self.tau, low=0.0)
        if self.chunk_tau is not None:
            check_number("chunk_tau", self.chunk_tau, low=0.0)
        for name in ("warmup_steps", "chunk_wise_steps", "final_full_steps"):
            check_int(name, getattr(self, name), low=0)
        check_number("motion_floor", self.motion_floor, low=0.0, high=1.0)
        check_number("motion_power", self.motion_power, low=0.0, low_open=True)
        check_number("detail_alpha", self.detail_alpha, low=0.0, high=1.0)
        check_window("detail_window_size", self.detail_window_size, math.inf, math.inf)
        check_number("detail_lambda", self.detail_lambda, low=0.0, high=1.0)
        check_choice("weight_combine_mode", self.weight_combine_mode, COMBINE_MODES)
        check_choice("proxy", self.proxy, PROXIES)
        if self.max_reuse is not None:
            check_int("max_reuse", self.max_reuse, low=1, hint=" (use None for no cap)")
        check_number("min_active_ratio", self.min_active_ratio, low=0.0, high=1.0)
        if not isinstance(self.rescale_reused_velocity, bool):
            raise ValueError(f"rescale_reused_velocity must be True or False, got {self.rescale_reused_velocity!r}")
        check_number("velocity_extrapolation", self.velocity_extrapolation, low=0.0, high=1.0)
        check_choice("extrapolation_order", self.extrapolation_order, (1, 2))
        check_number("tau_ramp", self.tau_ramp, low=0.0, high=1.0)
        if not isinstance(self.refresh_neighbours, bool):
            raise ValueError(f"refresh_neighbours must be True or False, got {self.refresh_neighbours!r}")
        if self.max_active_ratio is not None:
            check_number("max_active_ratio", self.max_active_ratio, low=0.0, high=1.0, low_open=True)
        if self.velocity_extrapolation > 0 and not self.rescale_reused_velocity:
            raise ValueError("velocity_extrapolation needs rescale_reused_velocity=True (the released displacement "
                             "re-use has no time to extrapolate to); set one of them back")

    @property
    def enabled(self):
        return self.mode != "off"

    @property
    def chunk_threshold(self):
        return self.tau if self.chunk_tau is None else self.chunk_tau

    @property
    def uses_token_weights(self):
        return self.mode in ("motion", "motion_detail", "hybrid")

    @property
    def uses_detail_weights(self):
        return self.mode in ("motion_detail", "hybrid")

    def token_threshold(self, step, num_steps):
        """τ at a chunk's step ``step`` of ``num_steps`` (``tau_ramp``)."""
        if not self.tau_ramp or num_steps < 2:
            return self.tau
        return self.tau * (1.0 + self.tau_ramp * (2.0 * step / (num_steps - 1) - 1.0))

    def new_state(self, *, num_steps, chunk_shape, patch=(2, 2)):
        """Fresh per-run memory for this policy (create one per sampling run, drop it afterwards)."""
        return CacheState(self, num_steps=num_steps, chunk_shape=chunk_shape, patch=patch)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """Every field by name, as plain JSON values (``from_dict`` reads it back): a worker job's format."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """The policy ``to_dict`` wrote, validated again; a field this version does not know is refused by name
        (a job written by another version of the pack), and a missing one takes its default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"the cache policy has fields this version of cache_core does not know: {unknown}: the "
                             "job was written by another version of the pack; update both sides to the same version")
        return cls(**data)

    def phase(self, step, num_steps):
        """Which phase a chunk is in at its own step ``step`` of ``num_steps``.

        One of "off", "warmup", "final", "window" (teacache), "chunk", "token" or "hybrid".
        """
        if self.mode == "off":
            return "off"
        if step < self.warmup_steps:
            return "warmup"
        if step >= num_steps - self.final_full_steps:
            return "final"
        if self.mode == "teacache":
            return "window"
        if self.mode == "flowcache" or step < self.warmup_steps + self.chunk_wise_steps:
            return "chunk"
        return "hybrid" if self.mode == "hybrid" else "token"

    def unreached_token_phase(self, num_steps):
        """A warning when a token-level policy never reaches its token phase at ``num_steps`` steps (every
        step of a chunk is warm-up, chunk-level or final), else None."""
        if self.mode not in ("motion", "motion_detail", "hybrid"):
            return None
        if any(self.phase(step, num_steps) in ("token", "hybrid") for step in range(num_steps)):
            return None
        return (f"token phase never reached at {num_steps} steps: warm-up {self.warmup_steps} + chunk-level "
                f"{self.chunk_wise_steps} + final {self.final_full_steps}; lower them or use more steps")

    # Presets, calibrated by ``python -m bench.quality.policies --model bench --prompts bench/setups/calibration.json
    # --calibrate`` on the benchmark model's calibration set at 16 steps (bench/results/calibration_bench.md). τ depends on the model and the step count:
    # on another model, check the cache report and adjust.
    SLOW_TAU = 0.1
    FAST_TAU = 0.2

    @classmethod
    def preset_family(cls, tau, **overrides):
        """The presets' policy at any τ: ``PRESET_MODE`` with ``PRESET_SCHEDULE``, ``PRESET_OPTIONS`` and
        ``chunk_tau = PRESET_CHUNK_RATIO · τ`` (unless ``overrides`` set them)."""
        fields = {"mode": PRESET_MODE, **PRESET_SCHEDULE, **PRESET_OPTIONS, "tau": tau, **overrides}
        fields.setdefault("chunk_tau", round(PRESET_CHUNK_RATIO * fields["tau"], 9))  # 0.15, not 0.15000000000000002
        return cls(**fields)

    @classmethod
    def slow(cls, **overrides):
        """Quality first: the largest FLOP saving at >= 35 dB PSNR against no cache on the calibration set
        (1.69x fewer FLOPs there, 35.4 dB)."""
        return cls.preset_family(**{"tau": cls.SLOW_TAU, **overrides})

    @classmethod
    def fast(cls, **overrides):
        """Speed first: about twice slow's FLOP saving (2.42x fewer FLOPs there, 30.5 dB)."""
        return cls.preset_family(**{"tau": cls.FAST_TAU, **overrides})

    @classmethod
    def preset(cls, name, **overrides):
        """The named preset: "off", "slow", "fast", or "default" (the released configuration)."""
        if name == "off":
            return cls(**{"mode": "off", **overrides})
        if name == "slow":
            return cls.slow(**overrides)
        if name == "fast":
            return cls.fast(**overrides)
        if name == "default":
            return cls(**overrides)
        raise ValueError(f"preset must be one of ('off', 'default', 'slow', 'fast'), got {name!r}")
