"""Float8 weights: their error against the same model in float32, and the memory they save.

    python -m bench.quality.fp8_error        # prints the report (bench/results/fp8_error.txt)

1. Float8 storage of any checkpoint (``fp8_e4m3fn``, ``fp8_e4m3fn_scaled``) on the tiny fixture configs
   (random weights of the official scale, 3 seeds): relative L2 error of one DiT forward against float32.
2. The official fp8 layers on the recorded official calls (tests/fixtures/dit/quant_*): our output
   against the recording (float32 compute; the harness's bfloat16 path in the quantised layers followed,
   as in tests/test_fp8.py, and not), our fp8 model computing in bfloat16 against it, and the recording
   against the same official model with the float8 layers dequantised (the quantisation error itself).
3. The bytes of the real models' weights per kind (``magi1.planning.memory_plan``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import torch

from magi1 import ModelConfig, build_dit, random_dit
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS
from magi1.planning.memory_plan import GB, weight_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tests_module(name):
    """A module of tests/ (the fixture readers and the harness dtype path are defined there once)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tests", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # test_fp8 imports test_dit_fixtures by this name
    spec.loader.exec_module(module)
    return module


_fixtures, _fp8_tests = _tests_module("test_dit_fixtures"), _tests_module("test_fp8")
call_arguments, load_fixture, relative_error = _fixtures.call_arguments, _fixtures.load_fixture, _fixtures.relative_error
QUANT, forward, official_fp8_model = _fp8_tests.QUANT, _fp8_tests.forward, _fp8_tests.official_fp8_model
harness_dtypes_in_quantised_layers = _fp8_tests.harness_dtypes_in_quantised_layers

KINDS = ("fp8_e4m3fn", "fp8_e4m3fn_scaled")


def storage_errors():
    lines = ["1. Float8 storage against float32, one DiT forward, relative L2 (3 seeds: mean, max)", "",
             "| tiny config | " + " | ".join(KINDS) + " |", "|---|---|---|"]
    for name in ("base", "base_i2v", "distill24", "distill45"):
        with open(os.path.join(ROOT, "tests", "fixtures", f"dit_tiny_{name}.json")) as f:
            config = json.load(f)["model_config"]
        cells = []
        for kind in KINDS:
            errors = [relative_error(forward(random_dit(config, seed=s, weights=kind), s),
                                     forward(random_dit(config, seed=s), s)) for s in range(3)]
            cells.append(f"{sum(errors) / 3:.3f}, {max(errors):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # The real widths: weights ~ N(0, 1/3072) put many values below float8's normal range (2^-6), where
    # only the scaled kind keeps their precision.
    config = dict(OFFICIAL_MODEL_CONFIGS["4.5B"], num_layers=2, caption_channels=64, caption_max_length=16)
    cells = [f"{relative_error(forward(random_dit(config, weights=kind)), forward(random_dit(config))):.3f}"
             for kind in KINDS]
    lines.append("| 4.5B widths, 2 layers, seed 0 | " + " | ".join(cells) + " |")
    return lines


def official_errors():
    lines = ["2. Official fp8 layers on the recorded official calls, relative L2", "",
             "| call | ours vs recording (harness path) | ours vs recording (float32 path) | ours in bf16 vs "
             "recording | recording vs dequantised float32 |", "|---|---|---|---|---|"]
    for name in QUANT:
        description, tensors = load_fixture(name)
        model = official_fp8_model(description, tensors)
        with harness_dtypes_in_quantised_layers(model):
            harness = model(**call_arguments(description, tensors, model))
        plain = model(**call_arguments(description, tensors, model))
        params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
        bf16 = build_dit(description["model_config"], dtype=torch.bfloat16, weights="fp8_official")
        bf16.load_state_dict(params, strict=True)
        bf16.distill = description["distill"]
        low = bf16(**call_arguments(description, tensors, bf16))
        recording = tensors["out.x"]
        lines.append(f"| {name} | {relative_error(harness, recording):.1e} | {relative_error(plain, recording):.1e} | "
                     f"{relative_error(low, recording):.1e} | {relative_error(recording, tensors['out.x_dequant']):.1e} |")
    return lines


def memory():
    lines = ["3. Weight bytes of the real models (GB = 1e9)", "", "| model | bfloat16 | fp8_e4m3fn | "
             "fp8_e4m3fn_scaled | fp8_official | saved by fp8_e4m3fn |", "|---|---|---|---|---|---|"]
    for size, config in OFFICIAL_MODEL_CONFIGS.items():
        config = ModelConfig(**config)
        totals = {kind: sum(weight_bytes(config, kind).values()) for kind in
                  ("bfloat16", "fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official")}
        lines.append(f"| {size} | " + " | ".join(f"{v / GB:.2f}" for v in totals.values())
                     + f" | {(totals['bfloat16'] - totals['fp8_e4m3fn']) / GB:.2f} |")
    return lines


if __name__ == "__main__":
    with torch.no_grad():
        print("\n".join(storage_errors() + [""] + official_errors() + [""] + memory()))
