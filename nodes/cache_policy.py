"""MAGI1MotionDetailCache: attach a CachePolicy to a MODEL clone (configuration only, no state)."""

import logging

from comfy_api.latest import io

from ..cache_core import COMBINE_MODES, MODES, PRESET_SCHEDULE, PROXIES, CachePolicy
from .queue_checks import CheckedNode

# Where the policy travels inside the patched MODEL; the MAGI-1 sampler reads it from here.
POLICY_KEY = "magi1_cache_policy"
PRESETS = ("custom", "slow", "fast")
# A fresh node selects the slow preset, and its widgets show that preset's values (so switching to custom
# keeps the same policy).
_DEFAULT = CachePolicy.slow()


def preset_summary(name):
    """A preset's values and schedule, for the tooltip."""
    p = CachePolicy.preset(name)
    return (f"{name}: mode {p.mode}, tau {p.tau:g}, chunk_tau {p.chunk_tau:g}, warm-up {p.warmup_steps} + "
            f"chunk-level {p.chunk_wise_steps} steps, then per token, final {p.final_full_steps} full, "
            f"max_reuse {p.max_reuse}")


class MAGI1MotionDetailCache(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1MotionDetailCache",
            display_name="MAGI-1 MotionDetailCache",
            category="MAGI-1",
            description=(
                "Speeds up MAGI-1 sampling by reusing the velocity of static, plain tokens and recomputing "
                "moving and detailed ones. Returns a copy of the model; the input model is not changed."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MAGI-1 model to attach the cache policy to."),
                io.Combo.Input("mode", options=list(MODES), default=_DEFAULT.mode, tooltip=(
                    "off: compute everything. teacache: one reuse decision for the whole window. flowcache: "
                    "reuse whole chunks. motion: per-token reuse weighted by motion. motion_detail: per-token "
                    "reuse weighted by motion and texture (keeps detailed regions sharper). hybrid (default): whole "
                    "chunks reused while they change little; when one changes enough, only its moving and detailed "
                    "tokens are computed.")),
                io.Combo.Input("preset", options=list(PRESETS), default="slow", tooltip=(
                    "custom: use the values below. slow / fast: quality-first / speed-first values for tau, "
                    "chunk_tau, warmup_steps, chunk_wise_steps, final_full_steps and max_reuse, calibrated on the "
                    "built-in benchmark model at 16 steps (the other values below still apply). "
                    + "; ".join(preset_summary(name) for name in PRESETS[1:]) + ".")),
                io.Float.Input("tau", default=_DEFAULT.tau, min=0.0, max=1.0, step=0.0005, round=0.00001, tooltip=(
                    "Reuse threshold. Higher = more reuse, faster, lower fidelity; 0 = compute every token.")),
                io.Int.Input("warmup_steps", default=_DEFAULT.warmup_steps, min=0, max=1000, tooltip=(
                    "First steps of every chunk always computed. More = safer layout, less speed-up.")),
                io.Int.Input("chunk_wise_steps", default=_DEFAULT.chunk_wise_steps, min=0, max=1000, tooltip=(
                    "Steps after warm-up where whole chunks are reused or recomputed, before per-token "
                    "decisions start. Chunk-level reuse is cheaper to decide but coarser.")),
                io.Int.Input("final_full_steps", default=_DEFAULT.final_full_steps, min=0, max=1000, tooltip=(
                    "Last steps of every chunk always computed, so every chunk ends on fresh values. "
                    "More = cleaner final frames, less speed-up.")),
                io.Float.Input("motion_floor", default=_DEFAULT.motion_floor, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Lowest motion weight. Lower = static tokens are reused much longer than moving ones.")),
                io.Float.Input("detail_alpha", default=_DEFAULT.detail_alpha, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Lowest detail weight (motion_detail). Lower = plain regions are reused longer than "
                    "textured ones.")),
                io.Int.Input("detail_window", default=_DEFAULT.detail_window_size, min=1, max=15, step=2, tooltip=(
                    "Odd window (in latent pixels) over which texture is measured. Larger = smoother, "
                    "coarser detail map.")),
                io.Float.Input("detail_lambda", default=_DEFAULT.detail_lambda, min=0.0, max=1.0, step=0.05, tooltip=(
                    "Share of detail in the 'blend' combine mode (0 = motion only, 1 = detail only).")),
                io.Combo.Input("combine_mode", options=list(COMBINE_MODES), default=_DEFAULT.weight_combine_mode,
                               tooltip=(
                    "How motion and detail weights merge. max: a token is as important as its stronger cue "
                    "(safest). product: only tokens both moving and detailed stay fresh (most reuse). blend: "
                    "weighted mean (see detail_lambda).")),
                io.Combo.Input("proxy", options=list(PROXIES), default=_DEFAULT.proxy, tooltip=(
                    "Signal the weights are measured on. latent: the noisy latent (as released). denoised: "
                    "the model's current clean estimate (less dominated by noise early on).")),
                io.Int.Input("max_reuse", default=_DEFAULT.max_reuse or 0, min=0, max=1000, tooltip=(
                    "Most consecutive steps a chunk or token may be reused before it is refreshed; 0 = no cap. "
                    "Lower = fewer stale regions, less speed-up.")),
            ] + _reuse_inputs(),
            outputs=[io.Model.Output(tooltip="A copy of the model carrying the cache policy.")],
        )

    @classmethod
    def input_rules(cls, values):
        # The policy's own checks (e.g. an odd detail window), once every value is known, on the input
        # whose field the message names.
        if any(values.get(name) is None for name in POLICY_INPUTS):
            return {}
        try:
            policy_of(**{name: values[name] for name in POLICY_INPUTS},
                      **{name: values[name] for name in OPTIONAL_POLICY_INPUTS if name in values})
        except ValueError as error:
            field = str(error).split(" ", 1)[0]
            return {INPUT_OF_FIELD.get(field, field if field in values else "mode"): str(error)}
        return {}

    @classmethod
    def execute(cls, model, mode, preset, tau, warmup_steps, chunk_wise_steps, final_full_steps, motion_floor,
                detail_alpha, detail_window, detail_lambda, combine_mode, proxy, max_reuse,
                velocity_extrapolation=None, chunk_tau=None) -> io.NodeOutput:
        policy = policy_of(mode, preset, tau, warmup_steps, chunk_wise_steps, final_full_steps, motion_floor,
                           detail_alpha, detail_window, detail_lambda, combine_mode, proxy, max_reuse,
                           velocity_extrapolation, chunk_tau)
        patched = model.clone()
        options = patched.model_options.setdefault("transformer_options", {})
        if POLICY_KEY in options:
            logging.warning("MAGI1MotionDetailCache: the model already carries a cache policy; replacing it.")
        options[POLICY_KEY] = policy
        return io.NodeOutput(patched)


POLICY_INPUTS = ("mode", "preset", "tau", "warmup_steps", "chunk_wise_steps", "final_full_steps", "motion_floor",
                 "detail_alpha", "detail_window", "detail_lambda", "combine_mode", "proxy", "max_reuse")
OPTIONAL_POLICY_INPUTS = ("velocity_extrapolation", "chunk_tau")
INPUT_OF_FIELD = {"detail_window_size": "detail_window", "weight_combine_mode": "combine_mode"}  # policy -> node


def policy_of(mode, preset, tau, warmup_steps, chunk_wise_steps, final_full_steps, motion_floor, detail_alpha,
              detail_window, detail_lambda, combine_mode, proxy, max_reuse, velocity_extrapolation=None,
              chunk_tau=None):
    """The CachePolicy of the node's values."""
    # A workflow saved before the last two inputs existed leaves them out: custom then keeps its old
    # behaviour (no extrapolation, chunk_tau = tau), and a preset uses its own values.
    values = dict(
        mode=mode, tau=tau, warmup_steps=warmup_steps, chunk_wise_steps=chunk_wise_steps,
        final_full_steps=final_full_steps, motion_floor=motion_floor, detail_alpha=detail_alpha,
        detail_window_size=detail_window, detail_lambda=detail_lambda, weight_combine_mode=combine_mode,
        proxy=proxy, max_reuse=max_reuse or None, chunk_tau=chunk_tau or None,
    )
    if velocity_extrapolation is not None:
        values["velocity_extrapolation"] = velocity_extrapolation
    if preset == "custom":
        return CachePolicy(**values)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    for name in ("tau", "chunk_tau", *PRESET_SCHEDULE):
        values.pop(name)
    return CachePolicy.preset(preset, **values)


def _reuse_inputs():
    """The inputs added in 0.4 (optional, after the others: workflows saved before them still load)."""
    return [
        io.Float.Input("velocity_extrapolation", default=_DEFAULT.velocity_extrapolation, min=0.0, max=1.0,
                       step=0.05, optional=True, tooltip=(
            "How a reused region moves on. 0: with its last computed velocity (as released). 1: with the "
            "trend of its last two computed velocities, at most one of their intervals ahead (sharper at "
            "the same speed-up).")),
        io.Float.Input("chunk_tau", default=_DEFAULT.chunk_tau, min=0.0, max=1.0, step=0.0005, round=0.00001,
                       optional=True, tooltip=(
            "Custom only: threshold of the chunk-level decisions (teacache, flowcache, the chunk-wise steps, "
            "hybrid's whole-chunk reuse); 0 = the same as tau. The presets use 1.5 x tau.")),
    ]
