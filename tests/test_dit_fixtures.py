"""The DiT against calls of the official MAGI-1 DiT recorded on tiny random weights (tests/fixtures/dit,
made by tests/fixtures/make_fixtures.py): every kind of call the official pipeline makes."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from magi1 import KVCache, build_dit, distill_dt

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "dit")
NAMES = sorted(f[: -len(".json")] for f in os.listdir(FIXTURES)
               if f.endswith(".json") and not f.startswith("quant_"))  # fp8 ones: tests/test_fp8.py
TOLERANCE = 1e-4  # relative, float32


def load_fixture(name):
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        description = json.load(f)
    return description, load_file(os.path.join(FIXTURES, name + ".safetensors"))


def model_of(description, tensors):
    model = build_dit(description["model_config"], dtype=torch.float32)
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    model.load_state_dict(params, strict=True)
    model.distill = description["distill"]
    return model.eval()


def call_arguments(description, tensors, model):
    """Our forward's arguments for the recorded official call, and the cache it reads and writes."""
    kw = description["kwargs"]
    x, t = tensors["in.x"], tensors["in.t"]
    n, chunks = t.shape
    y = tensors["in.y"]
    caption = y.reshape(n, chunks, *y.shape[-2:])
    mask = tensors["in.xattn_mask"].reshape(n, chunks, -1)
    # With N > 1 (unconditional pass, one chunk each) the official code gives every sequence row 0's range.
    kv_range = tensors["in.kv_range"][:chunks]
    ip = description["inference_params"]
    uses_cache = ip is not None and (kw.get("extract_prefix_video_feature") or kw["fwd_extra_1st_chunk"]
                                     or kw.get("slice_point", 0) > 0)
    cache, written = None, 0
    if uses_cache:
        cache = KVCache.for_model(model, ip["max_sequence_length"] * ip["max_batch_size"])
        prefix = description["kv_cache_prefix_tokens"]
        for i in range(model.config.num_layers):
            if prefix:
                kv = tensors[f"in.kv_cache.layer{i}"]
                cache.keys[i][:prefix] = kv[..., : model.config.kv_channels]
                cache.values[i][:prefix] = kv[..., model.config.kv_channels:]
        if ip["update_kv_cache"]:
            written = chunks - (1 if kw.get("distill_nearly_clean_chunk") else 0)
    args = dict(x=x, t=t, caption=caption, caption_mask=mask, kv_range=kv_range,
                slice_point=kw.get("slice_point", 0),
                unconditional=bool(tensors["in.caption_dropout_mask"][0]),
                distill_dt=distill_dt(kw["num_steps"], kw["distill_interval"]) if description["distill"] else None,
                kv_cache=cache, kv_write_chunks=written)
    return args


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_official(name):
    description, tensors = load_fixture(name)
    model = model_of(description, tensors)
    args = call_arguments(description, tensors, model)
    out = model(**args)
    expected = tensors["out.x"]
    assert out.shape == expected.shape
    err = relative_error(out, expected)
    assert err <= TOLERANCE, f"{name}: relative error {err:.2e}"

    written = description["kv_cache_written"]
    if args["kv_write_chunks"]:
        # The rows the official call wrote into its cache: this call's keys (after norm and RoPE) and values.
        start, count = written["start_token"], written["num_tokens"]
        hd = model.config.kv_channels
        for i in range(model.config.num_layers):
            kv = tensors[f"mid.kv_current.layer{i}"][:count]
            cache = args["kv_cache"]
            assert relative_error(cache.keys[i][start:start + count], kv[..., :hd]) <= TOLERANCE
            assert relative_error(cache.values[i][start:start + count], kv[..., hd:]) <= TOLERANCE
    else:
        assert written is None or description["inference_params"] is None or not args["kv_cache"]


@pytest.mark.parametrize("name, change", [
    ("distill24_near_clean", dict(distill_dt=None)),  # the step-size embedding matters
    ("distill45_interval", dict(distill_dt=distill_dt(12, 1))),  # and its 12-step interval rule
    ("base_kv_cond", dict(unconditional=True)),  # the adaLN token matters
    ("base_kv_cond", dict(first_range_for_all=True)),  # each chunk's own key range matters
    ("base_kv_cond_pre", dict(zero_cache=True)),  # the clean chunk read from the cache matters
])
def test_fixtures_detect_a_wrong_call(name, change):
    """The comparison is sharp: each of these deliberate mistakes moves the output far past the tolerance."""
    description, tensors = load_fixture(name)
    model = model_of(description, tensors)
    args = call_arguments(description, tensors, model)
    change = dict(change)
    if change.pop("zero_cache", False):
        for buffer in args["kv_cache"].keys + args["kv_cache"].values:
            buffer.zero_()
    if change.pop("first_range_for_all", False):  # the released cache code's mistake (cache.md 7.1 P1)
        change["kv_range"] = [args["kv_range"][0].tolist()] * len(args["kv_range"])
    args.update(change)
    err = relative_error(model(**args), tensors["out.x"])
    assert err > 100 * TOLERANCE, f"{name} with {sorted(change)}: relative error only {err:.2e}"
