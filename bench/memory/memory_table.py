"""The "Memory" tables of docs/memory.md (the card table also in the README): ``magi1.planning.memory_plan`` for the
targets of issue 19 and a few neighbours, and the options that fit each card.

    python -m bench.memory.memory_table            # prints the markdown table (bench/results/memory_table.md)

Planned, not measured: the plan counts the DiT's weights, KV caches, cache-policy state and the peak of
one window call, then the VAE decode (after the DiT phase); not the CUDA context (about 0.5 GB), the
allocator's fragmentation, or a text encoder left loaded.
"""

from __future__ import annotations


import torch

from cache_core import CachePolicy
from magi1 import VideoRequest, memory_plan
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS
from magi1.planning.memory_plan import GB, replan

# (label, size, passes, height, width, frames, options, budget GB)
ROWS = [
    ("4.5B distill, bf16, cache slow", "4.5B", 1, 720, 720, 96, dict(reuse="token"), 24),
    ("4.5B distill, bf16, cache off", "4.5B", 1, 720, 720, 96, dict(reuse="off"), 24),
    ("4.5B distill, fp8 + kv_offload, cache slow", "4.5B", 1, 720, 720, 96,
     dict(reuse="token", weight_dtype="fp8_e4m3fn", kv_offload=True), 12),
    ("4.5B base (3 passes), bf16, cache slow", "4.5B", 3, 720, 720, 96, dict(reuse="token"), 24),
    ("4.5B base (3 passes), bf16, cache slow, kv_offload", "4.5B", 3, 720, 720, 96,
     dict(reuse="token", kv_offload=True), 24),
    ("24B distill, bf16", "24B", 1, 720, 1280, 96, dict(reuse="off"), 48),
    ("24B distill, fp8 + kv_offload", "24B", 1, 720, 1280, 96, dict(reuse="off", weight_dtype="fp8_e4m3fn",
                                                                 kv_offload=True), 48),
    ("24B distill, fp8 + kv_offload, cache slow", "24B", 1, 720, 1280, 96,
     dict(reuse="token", weight_dtype="fp8_e4m3fn", kv_offload=True), 48),
    ("24B distill, fp8 + kv_offload + 2 resident layers (streaming)", "24B", 1, 720, 1280, 96,
     dict(reuse="off", weight_dtype="fp8_e4m3fn", kv_offload=True, resident_layers=2), 24),
    ("24B distill, official fp8 + kv_offload + 2 resident layers", "24B", 1, 720, 1280, 96,
     dict(reuse="off", weight_dtype="fp8_official", kv_offload=True, resident_layers=2), 24),
]


def planned(size, frames, height, width, *, reuse="off", kv_offload=False, **options):
    """The plan of an official model's run whose cache is the slow preset (``reuse="token"``) or off."""
    policy = CachePolicy.slow() if reuse == "token" else None
    request = VideoRequest(frames=frames, height=height, width=width, policy=policy, kv_offload=kv_offload)
    return memory_plan(OFFICIAL_MODEL_CONFIGS[size], request, **options)


def table():
    lines = ["| run (96 frames) | size | weights on GPU | KV on GPU (all KV) | policy | activations | VAE decode | "
             "**total GPU** | target | fits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, size, passes, height, width, frames, options, budget in ROWS:
        plan = planned(size, frames, height, width, passes=passes, compute_dtype=torch.bfloat16, **options)
        kv_all = sum(plan.kv_caches.values())
        lines.append(
            f"| {label} | {width}x{height} | {plan.weights_on_gpu / GB:.1f} | {plan.kv_on_gpu / GB:.1f} "
            f"({kv_all / GB:.1f}) | {plan.policy_state / GB:.2f} | {plan.activations / GB:.1f} | "
            f"{plan.vae_decode / GB:.1f} | **{plan.total_gpu / GB:.1f}** | {budget} GB | "
            f"{'yes' if plan.total_gpu <= budget * GB else 'no'} |")
    return "\n".join(lines)


# "How long a video can I make on my card?": since 0.9 the plan does not grow with the video, so a setup that
# fits makes any length (the sampler node takes up to 4096 frames, 171 s; the CLI and magi1.generate more).
CARDS = (12, 16, 24, 48)  # GB
MODELS = [("4.5B distill", "4.5B", 1, 720, 720), ("4.5B base", "4.5B", 3, 720, 720),
          ("24B distill", "24B", 1, 720, 1280), ("24B base", "24B", 3, 720, 1280)]
CONTEXT = 0.75  # GB a card loses to the CUDA context and the allocator's slack, kept free here
FRAMES = (480, 2400)  # 20 s and 100 s: the plan is the same


def card_table():
    """Per model and card: the options that make a 100 s video fit (the memory check's ladder, cache slow), and
    the plan at 4 s and 100 s side by side."""
    lines = ["| model (cache slow) | card | fits with | planned at 20 s / 100 s | longest video |",
             "|---|---|---|---|---|"]
    for label, size, passes, height, width in MODELS:
        for card in CARDS:
            budget = (card - CONTEXT) * GB
            plans = {frames: planned(size, frames, height, width, passes=passes, reuse="token") for frames in FRAMES}
            changes = plans[FRAMES[-1]].savings(budget)
            names = [saving.name for saving in changes]
            fitted = {frames: _applied(plan, changes) for frames, plan in plans.items()}
            fits = fitted[FRAMES[-1]].fits(budget) and not any(n.startswith("fewer frames") for n in names)
            options = ", ".join(names) or "as is"
            lines.append(f"| {label} {width}x{height} | {card} GB | {options if fits else 'does not fit'} | "
                         f"{fitted[FRAMES[0]].total_gpu / GB:.1f} / {fitted[FRAMES[-1]].total_gpu / GB:.1f} GB | "
                         f"{'any length' if fits else '-'} |")
    return "\n".join(lines)


def _applied(plan, changes):
    """``plan`` with the memory check's changes (``Saving``s) applied."""
    merged = {}
    for saving in changes:
        merged.update(saving.changes)
    return replan(plan, **merged)


if __name__ == "__main__":
    print(table())
    print()
    print(card_table())
