"""The README's "Memory" table: ``magi1.memory_plan`` for the targets of issue 19 and a few neighbours.

    python -m bench.memory_table            # prints the markdown table (bench/memory_table.md)

Planned, not measured: the plan counts the DiT's weights, KV caches, cache-policy state and the peak of
one window call, then the VAE decode (after the DiT phase); not the CUDA context (about 0.5 GB), the
allocator's fragmentation, or a text encoder left loaded.
"""

from __future__ import annotations

import torch

from magi1 import memory_plan
from magi1.loader import OFFICIAL_MODEL_CONFIGS
from magi1.memory_plan import GB

# (label, size, passes, height, width, frames, options, budget GB)
ROWS = [
    ("4.5B distill, bf16, cache slow", "4.5B", 1, 720, 720, 96, dict(cache="token"), 24),
    ("4.5B distill, bf16, cache off", "4.5B", 1, 720, 720, 96, dict(cache="off"), 24),
    ("4.5B distill, fp8 + kv_offload, cache slow", "4.5B", 1, 720, 720, 96,
     dict(cache="token", weight_dtype="fp8_e4m3fn", kv_offload=True), 12),
    ("4.5B base (3 passes), bf16, cache slow", "4.5B", 3, 720, 720, 96, dict(cache="token"), 24),
    ("4.5B base (3 passes), bf16, cache slow, kv_offload", "4.5B", 3, 720, 720, 96,
     dict(cache="token", kv_offload=True), 24),
    ("24B distill, bf16", "24B", 1, 720, 1280, 96, dict(cache="off"), 48),
    ("24B distill, fp8 + kv_offload", "24B", 1, 720, 1280, 96, dict(cache="off", weight_dtype="fp8_e4m3fn",
                                                                 kv_offload=True), 48),
    ("24B distill, fp8 + kv_offload, cache slow", "24B", 1, 720, 1280, 96,
     dict(cache="token", weight_dtype="fp8_e4m3fn", kv_offload=True), 48),
    ("24B distill, fp8 + kv_offload + 2 resident layers (streaming)", "24B", 1, 720, 1280, 96,
     dict(cache="off", weight_dtype="fp8_e4m3fn", kv_offload=True, resident_layers=2), 24),
    ("24B distill, official fp8 + kv_offload + 2 resident layers", "24B", 1, 720, 1280, 96,
     dict(cache="off", weight_dtype="fp8_official", kv_offload=True, resident_layers=2), 24),
]


def table():
    lines = ["| run (96 frames) | size | weights on GPU | KV on GPU (all KV) | policy | activations | VAE decode | "
             "**total GPU** | target | fits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, size, passes, height, width, frames, options, budget in ROWS:
        plan = memory_plan(OFFICIAL_MODEL_CONFIGS[size], frames, height, width, passes=passes,
                           compute_dtype=torch.bfloat16, **options)
        kv_all = sum(plan.kv_caches.values())
        lines.append(
            f"| {label} | {width}x{height} | {plan.weights_on_gpu / GB:.1f} | {plan.kv_on_gpu / GB:.1f} "
            f"({kv_all / GB:.1f}) | {plan.policy_state / GB:.2f} | {plan.activations / GB:.1f} | "
            f"{plan.vae_decode / GB:.1f} | **{plan.total_gpu / GB:.1f}** | {budget} GB | "
            f"{'yes' if plan.total_gpu <= budget * GB else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
