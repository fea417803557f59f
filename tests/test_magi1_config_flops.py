"""magi1.ModelConfig against the official configs and key shapes; magi1.network.flops against an independent count.

The official configs and key lists live in ../shared/research (beside the checkout, for developers and CI);
these tests skip, saying so, where that folder is absent.
"""

import json
import re
from pathlib import Path

import pytest
import torch

import magi1

RESEARCH = Path(__file__).resolve().parents[2] / "shared" / "research"
VARIANTS = ["4.5B_base", "4.5B_distill", "4.5B_distill_quant", "24B_base", "24B_distill", "24B_distill_quant"]
needs_research = pytest.mark.skipif(not RESEARCH.is_dir(), reason="needs ../shared/research (official configs and keys)")


def official_config(variant):
    return json.loads((RESEARCH / "magi1_configs" / f"{variant}_config.json").read_text())


def official_shapes(variant):
    """{key: shape} of the official state dict (bf16 variants)."""
    shapes = {}
    for line in (RESEARCH / "magi1_keys" / f"keys_{variant}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            shapes[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return shapes


@needs_research
@pytest.mark.parametrize("variant", VARIANTS)
def test_official_configs_load_with_their_own_keys(variant):
    whole = official_config(variant)
    config = magi1.ModelConfig.from_dict(whole)
    assert config == magi1.ModelConfig.from_dict(whole["model_config"])
    assert config.params_dtype is torch.bfloat16
    for key, value in whole["model_config"].items():
        if key != "params_dtype":
            assert getattr(config, key) == value, key


@needs_research
@pytest.mark.parametrize("variant", ["4.5B_base", "4.5B_distill", "24B_base", "24B_distill"])
def test_derived_sizes_match_the_official_weight_shapes(variant):
    config = magi1.ModelConfig.from_dict(official_config(variant))
    shapes = official_shapes(variant)
    layer = "videodit_blocks.layers.0."
    D, hd = config.hidden_size, config.head_dim
    assert shapes[layer + "mlp.linear_fc1.weight"] == (config.fc1_out, D)
    assert shapes[layer + "mlp.linear_fc2.weight"] == (D, config.ffn_hidden_size)
    assert shapes[layer + "ada_modulate_layer.proj.0.weight"] == (2 * D, config.cond_dim)
    assert shapes[layer + "self_attention.linear_qkv.q.weight"] == (config.num_attention_heads * hd, D)
    assert shapes[layer + "self_attention.linear_qkv.k.weight"] == (config.num_query_groups * hd, D)
    assert shapes[layer + "self_attention.linear_kv_xattn.weight"] == (2 * config.num_query_groups * hd, D)
    assert shapes["x_embedder.weight"] == (D, config.in_channels, config.t_patch_size, config.patch_size, config.patch_size)
    assert config.latent_channels == 16
    assert sum(1 for k in shapes if k.endswith(".mlp.linear_fc1.weight")) == config.num_layers


@needs_research
@pytest.mark.parametrize("variant", ["4.5B_distill", "24B_distill"])
def test_linear_flops_equal_twice_the_weight_sizes_of_the_per_token_layers(variant):
    # Independent count: every per-token GEMM costs 2·out·in per token, read off the official shapes.
    config = magi1.ModelConfig.from_dict(official_config(variant))
    shapes = official_shapes(variant)
    per_token = re.compile(r"\.(linear_qkv\.(q|qx|k|v)|linear_proj|mlp\.linear_fc[12])\.weight$")
    expected = sum(2 * shape[0] * shape[1] for key, shape in shapes.items() if per_token.search(key))
    assert magi1.flops(config, query_tokens=1, key_tokens=0).linear == expected


@needs_research
def test_flops_of_one_720p_chunk_match_the_published_accounting():
    # cache.md §6.3 / magi1.md §7.2: 4.5B at 720x720 (12150 tokens a chunk) costs about 98.8 TFLOP of
    # linear work plus 61.7 TFLOP per chunk of keys; 24B at 720x1280 (21600 tokens) 965 + 550.
    small = magi1.ModelConfig.from_dict(official_config("4.5B_distill"))
    one = magi1.flops(small, query_tokens=12150, key_tokens=12150, caption_tokens=100)
    assert one.linear == pytest.approx(98.8e12, rel=1e-3)
    assert one.attention == pytest.approx(61.7e12, rel=1e-3)
    assert one.cross_attention < 0.01 * one.total and one.other < 0.001 * one.total
    big = magi1.ModelConfig.from_dict(official_config("24B_distill"))
    one = magi1.flops(big, query_tokens=21600, key_tokens=21600)
    assert one.linear == pytest.approx(965e12, rel=1e-3) and one.attention == pytest.approx(550e12, rel=1e-3)


TINY = magi1.ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         num_query_groups=2, kv_channels=16, in_channels=16, out_channels=16)


def test_flops_scale_with_active_tokens_and_key_count():
    dense = magi1.flops(TINY, query_tokens=400, key_tokens=1200, caption_tokens=20)
    sparse = magi1.flops(TINY, query_tokens=100, key_tokens=1200, caption_tokens=20)
    assert sparse.linear == dense.linear / 4 and sparse.attention == dense.attention / 4
    wider = magi1.flops(TINY, query_tokens=400, key_tokens=2400, caption_tokens=20)
    assert wider.attention == 2 * dense.attention and wider.linear == dense.linear
    both = dense + sparse
    assert both.total == pytest.approx(dense.total + sparse.total)
    assert magi1.flops(TINY, query_tokens=0, key_tokens=1200, chunks=0).total == 0


def test_flops_reject_bad_counts():
    with pytest.raises(ValueError, match="query_tokens must be an integer >= 0"):
        magi1.flops(TINY, query_tokens=-1, key_tokens=10)
    with pytest.raises(ValueError, match="key_tokens must be an integer >= 0"):
        magi1.flops(TINY, query_tokens=1, key_tokens=2.5)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(num_layers=0), "model_config.num_layers must be a positive integer"),
        (dict(hidden_size=None), "model_config.hidden_size must be a positive integer"),
        (dict(num_attention_heads=6, num_query_groups=4), "must be a multiple of num_query_groups"),
        (dict(hidden_size=60), "must be multiples of 8"),
        (dict(kv_channels=3), r"num_attention_heads \* kv_channels \(\d+\) must be multiples of 8"),
        (dict(half_channel_vae=True, in_channels=15), "half_channel_vae needs an even in_channels"),
        (dict(x_rescale_factor=0), "x_rescale_factor must be a finite number > 0"),
    ],
)
def test_config_validation(changes, match):
    base = {f: getattr(TINY, f) for f in TINY.__dataclass_fields__}
    with pytest.raises(ValueError, match=match):
        magi1.ModelConfig(**{**base, **changes})


def test_from_dict_errors():
    with pytest.raises(ValueError, match="unknown MAGI-1 model_config keys \\['hidden'\\]"):
        magi1.ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="params_dtype must be one of"):
        magi1.ModelConfig.from_dict({"params_dtype": "torch.int8", "num_layers": 1})
    with pytest.raises(ValueError, match="must be a dict"):
        magi1.ModelConfig.from_dict("4.5B")
