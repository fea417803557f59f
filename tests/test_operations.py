"""Operations injection: every Linear, LayerNorm and Conv3d of the DiT comes from the ``operations``
namespace, and every parameter lives in a module that ComfyUI's partial loading handles as a unit."""

import json
import os

import pytest
import torch
from torch import nn

from magi1 import build_dit, random_dit
from magi1.network.dit import NullCaption, RotaryEmbedding, ZeroCenteredLayerNorm
from magi1.network.ops import CastOps, QuantizedFp8Linear

HERE = os.path.dirname(os.path.abspath(__file__))
SELF_MOVING = (ZeroCenteredLayerNorm, RotaryEmbedding, NullCaption, QuantizedFp8Linear)  # move their params in forward


def tiny_config(name="base"):
    with open(os.path.join(HERE, "fixtures", f"dit_tiny_{name}.json")) as f:
        return json.load(f)["model_config"]


class Counting:
    """An operations namespace that records what it builds."""

    built = []

    class Linear(CastOps.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Counting.built.append(self)

    class LayerNorm(CastOps.LayerNorm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Counting.built.append(self)

    class Conv3d(CastOps.Conv3d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Counting.built.append(self)


@pytest.mark.parametrize("weights", [None, "fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official"])
def test_every_layer_comes_from_the_operations(weights):
    Counting.built = []
    model = build_dit(tiny_config("distill45_quant" if weights == "fp8_official" else "base"), device="meta",
                      operations=Counting, weights=weights)
    standard = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv3d))]
    assert standard and {id(m) for m in standard} == {id(m) for m in Counting.built}


@pytest.mark.parametrize("weights", [None, "fp8_e4m3fn_scaled", "fp8_official"])
def test_every_parameter_lives_in_a_leaf_that_moves_as_a_unit(weights):
    model = build_dit(tiny_config("distill45_quant" if weights == "fp8_official" else "base"), device="meta",
                      weights=weights)
    assert not list(model.buffers())  # nothing ComfyUI's partial loading would leave behind unseen
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        below = [n for n, _ in module.named_parameters() if "." in n]
        assert not below, f"{name or 'the model'} holds parameters and has children that hold {below[:3]}"
        assert isinstance(module, (CastOps.Linear, CastOps.LayerNorm, CastOps.Conv3d) + SELF_MOVING), name


def test_self_moving_modules_compute_where_their_input_is():
    """A module left on the offload device still computes on the input's device ("meta" here stands in
    for the GPU: on CPU-only machines there is no second real device)."""
    model = random_dit(tiny_config("base"), seed=0)
    x = torch.randn(3, 64, device="meta")
    norm = model.videodit_blocks.layers[0].self_attn_post_norm
    assert norm(x).device.type == "meta" and norm.weight.device.type == "cpu"
    cos, _ = model.rope(0, 1, 2, 2, torch.device("meta"))
    assert cos.device.type == "meta"
    assert model.y_embedder.null_caption.row(-2, x).device.type == "meta"
    linear = model.videodit_blocks.layers[0].self_attention.linear_qkv.q
    assert linear(x).device.type == "meta" and linear.weight.device.type == "cpu"


def test_checkpoint_keys_unchanged():
    model = build_dit(tiny_config("base"), device="meta")
    keys = set(model.state_dict())
    assert "y_embedder.null_caption_embedding" in keys and "y_embedder.null_caption.weight" not in keys
    assert model.y_embedder.null_caption_embedding is model.y_embedder.null_caption.weight
