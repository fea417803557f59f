"""Float8 weights: the official ``*_distill_quant`` layers against the official code (recorded by
tests/fixtures/make_fp8_fixture.py, whose ``bmm_fp8`` is an exact float32 emulation of the kernel's
documented semantics), and float8 storage of any checkpoint against the same model in float32."""

import contextlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import magi1
import magi1.network.dit as dit
from magi1 import build_dit, load_dit, random_dit
from magi1.weights.fp8 import nbytes_by_dtype, stored_kind
from magi1.network.ops import FP8, QuantizedFp8Linear
from test_dit_fixtures import FIXTURES, call_arguments, load_fixture, relative_error

QUANT = sorted(f[: -len(".json")] for f in os.listdir(FIXTURES) if f.startswith("quant_") and f.endswith(".json"))
HERE = os.path.dirname(os.path.abspath(__file__))


def same(a, b):
    """torch.equal, also for float8 tensors on torch 2.4 (whose CPU torch.equal has no float8 kernel)."""
    if a.dtype != b.dtype:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def official_fp8_model(description, tensors):
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    model = build_dit(description["model_config"], dtype=torch.float32, weights="fp8_official")
    model.load_state_dict(params, strict=True)
    model.distill = description["distill"]
    return model.eval()


@contextlib.contextmanager
def harness_dtypes_in_quantised_layers(model):
    """The float32 harness runs its quantised layers partly in bfloat16 (their q/qx/k/v modules return
    bfloat16 whatever the model's dtype, so q/k after RoPE, the KV cache of those layers and both
    attention outputs are bfloat16). Follow that path in ours, so that the comparison isolates the use of
    the scales; in a bfloat16 model (the real one) both are bfloat16 anyway."""
    state = {"on": False}

    def rounded(x):
        return x.to(torch.bfloat16).to(x.dtype) if state["on"] else x

    originals = dit.apply_rotary, dit.attend, dit.attend_segments, dit.ZeroCenteredLayerNorm.forward
    dit.apply_rotary = lambda x, cos, sin: rounded(originals[0](x, cos, sin))
    dit.attend = lambda q, k, v, backend: rounded(originals[1](q, k, v, backend))
    dit.attend_segments = lambda *a: rounded(originals[2](*a))
    xattn_norms = {id(layer.self_attention.q_layernorm_xattn) for layer in model.videodit_blocks.layers}
    dit.ZeroCenteredLayerNorm.forward = lambda self, x: (rounded if id(self) in xattn_norms else (lambda y: y))(
        originals[3](self, x))
    hooks = []
    for layer in model.videodit_blocks.layers:
        if isinstance(layer.self_attention.linear_qkv.q, QuantizedFp8Linear):
            hooks.append(layer.self_attention.register_forward_pre_hook(lambda *_: state.update(on=True)))
            hooks.append(layer.self_attention.register_forward_hook(lambda *_: state.update(on=False)))
    try:
        yield
    finally:
        dit.apply_rotary, dit.attend, dit.attend_segments, dit.ZeroCenteredLayerNorm.forward = originals
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("name", QUANT)
def test_official_fp8_layers_match_the_official_code(name):
    description, tensors = load_fixture(name)
    model = official_fp8_model(description, tensors)
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantizedFp8Linear)]
    assert len(quantised) == 7 * (model.config.num_layers - 2)
    args = call_arguments(description, tensors, model)
    with harness_dtypes_in_quantised_layers(model):
        out = model(**args)
    err = relative_error(out, tensors["out.x"])
    fp8_vs_dequant = relative_error(tensors["out.x"], tensors["out.x_dequant"])
    print(f"{name}: against the official fp8 recording {err:.1e}; fp8 against dequantised {fp8_vs_dequant:.1e}")
    assert err < 1e-4, err
    if args["kv_write_chunks"]:  # every layer's keys/values, the quantised layers' included
        hd = model.config.kv_channels
        for i in range(model.config.num_layers):
            written = tensors[f"mid.kv_current.layer{i}"]
            first = description["kv_cache_prefix_tokens"]
            ours = args["kv_cache"].keys[i][first:first + written.shape[0]]
            assert relative_error(ours, written[: ours.shape[0], ..., :hd].float()) < 1e-4, i


def test_a_wrong_scale_is_caught():
    """The comparison can fail: the per-tensor layers read only input_scale[0] back; multiplying by the
    whole vector instead (a plausible misreading) is far off."""
    description, tensors = load_fixture(QUANT[0])
    model = official_fp8_model(description, tensors)
    layer = model.videodit_blocks.layers[1].mlp.linear_fc1
    with torch.no_grad():
        layer.input_scale.mul_(1 + torch.linspace(0, 1, layer.input_scale.numel()))
    with harness_dtypes_in_quantised_layers(model):
        out = model(**call_arguments(description, tensors, model))
    assert relative_error(out, tensors["out.x"]) > 1e-2


def test_official_fp8_checkpoint_loads_as_such(tmp_path):
    description, tensors = load_fixture(QUANT[0])
    params = {k[len("param."):]: v.contiguous() for k, v in tensors.items() if k.startswith("param.")}
    save_file(params, str(tmp_path / "model.safetensors"),
              metadata={"magi1_model_config": json.dumps(description["model_config"])})
    loaded = load_dit(tmp_path / "model.safetensors")
    assert loaded.weights == "fp8_official" and loaded.distill  # the official fp8 checkpoints are distilled
    reference = official_fp8_model(description, tensors)
    for key, value in reference.state_dict().items():
        assert same(loaded.state_dict()[key], value), key


def tiny_config(name):
    with open(os.path.join(HERE, "fixtures", f"dit_tiny_{name}.json")) as f:
        return json.load(f)["model_config"]


def forward(model, seed=0):
    torch.manual_seed(seed)
    c = model.config
    x = torch.randn(1, c.latent_channels, 8, 8, 8)
    caption = torch.randn(1, 2, 16, c.caption_channels)
    mask = torch.ones(1, 2, 16, dtype=torch.bool)
    return model(x, torch.tensor([[0.3, 0.6]]), caption, mask, [[0, 64], [0, 128]])


@pytest.mark.parametrize("config", ["base", "distill24"])
@pytest.mark.parametrize("kind", ["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_fp8_storage_of_any_checkpoint(config, kind, tmp_path):
    """Weights stored in float8 and computed in the input's dtype: close to float32, a quarter of the
    layers' bytes; a checkpoint saved in float8 loads back as such without being told."""
    full = random_dit(tiny_config(config), seed=1)
    small = random_dit(tiny_config(config), seed=1, weights=kind)
    err = relative_error(forward(small), forward(full))
    by_dtype, reference = nbytes_by_dtype(small), nbytes_by_dtype(full)
    print(f"{config} {kind}: relative L2 error {err:.3f}; bytes {by_dtype} against {reference}")
    assert 1e-4 < err < 0.15
    linear_bytes = sum(m.weight.numel() for m in small.videodit_blocks.modules() if getattr(m, "weight", None)
                       is not None and m.weight.dtype == FP8)
    assert by_dtype["float8_e4m3fn"] == linear_bytes and linear_bytes > 0
    assert sum(by_dtype.values()) < sum(reference.values()) - 3 * linear_bytes + 4 * 10 ** 3

    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    save_file(state, str(tmp_path / "fp8.safetensors"),
              metadata={"magi1_model_config": json.dumps(tiny_config(config))})
    assert stored_kind({k: () for k in state}, {k: str(v.dtype).replace("torch.float8_e4m3fn", "F8_E4M3")
                                                 for k, v in state.items()}) == kind
    loaded = load_dit(tmp_path / "fp8.safetensors")
    assert loaded.weights == kind
    assert relative_error(forward(loaded), forward(small)) < 1e-5  # same values (BLAS may round differently)


def test_high_precision_checkpoint_stored_in_fp8_at_load(tmp_path):
    full = random_dit(tiny_config("base"), seed=2)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "m.safetensors"),
              metadata={"magi1_model_config": json.dumps(tiny_config("base"))})
    for kind in ("fp8_e4m3fn", "fp8_e4m3fn_scaled"):
        loaded = load_dit(tmp_path / "m.safetensors", weights=kind)
        made = random_dit(tiny_config("base"), seed=2, weights=kind)
        assert all(same(v, made.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert load_dit(tmp_path / "m.safetensors").weights is None


def test_plain_and_fp8_models_agree_on_what_is_fp8():
    model = build_dit(tiny_config("base"), device="meta", weights="fp8_e4m3fn")
    fp8_names = sorted(n for n, p in model.named_parameters() if p.dtype == FP8)
    layer = "videodit_blocks.layers.0."
    assert [n[len(layer):] for n in fp8_names if n.startswith(layer)] == sorted(
        ["ada_modulate_layer.proj.0.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
         "self_attention.linear_kv_xattn.weight", "self_attention.linear_proj.weight",
         "self_attention.linear_qkv.k.weight", "self_attention.linear_qkv.q.weight",
         "self_attention.linear_qkv.qx.weight", "self_attention.linear_qkv.v.weight"])
    assert all(n.startswith("videodit_blocks.layers.") for n in fp8_names)
    assert model.dtype == torch.float32 and magi1.KVCache.for_model(model, 4, device="meta").dtype == torch.float32


def test_float8_layouts_are_told_apart():
    layer = "videodit_blocks.layers.1.mlp.linear_fc2."
    official = {layer + "weight": "F8_E4M3", layer + "weight_scale": "F32", layer + "smooth_scale": "F32"}
    assert stored_kind(official, official) == "fp8_official"
    scaled = {layer + "weight": "F8_E4M3", layer + "scale_weight": "F32", "scaled_fp8": "F8_E4M3"}
    assert stored_kind(scaled, scaled) == "fp8_e4m3fn_scaled"
    plain = {layer + "weight": "F8_E4M3", "x_embedder.weight": "F32"}
    assert stored_kind(plain, plain) == "fp8_e4m3fn"
    assert stored_kind({"x_embedder.weight": "BF16"}, {"x_embedder.weight": "BF16"}) is None
    other = {layer + "weight": "F8_E4M3", layer + "weight_scale": "F32"}  # e.g. ComfyUI's newer quantised files
    with pytest.raises(ValueError, match="pick weight_dtype fp8_e4m3fn_scaled"):
        stored_kind(other, other)


def test_random_official_layout_is_close_to_its_float32_model():
    """random_dit in the official fp8 layout (for GPU benchmarks): unit input scales make the layers'
    dequantised weights those of the float32 model, so the outputs differ by float8 rounding only."""
    config = tiny_config("distill45_quant")
    official = random_dit(config, seed=4, weights="fp8_official")
    assert sum(isinstance(m, QuantizedFp8Linear) for m in official.modules()) == 7 * (official.config.num_layers - 2)
    err = relative_error(forward(official), forward(random_dit(config, seed=4)))
    assert 1e-3 < err < 0.15, err


def test_input_quantised_in_blocks_as_a_whole(monkeypatch):
    """The official layers quantise their input and multiply in row blocks (bounded float32 copies)."""
    import magi1.network.ops as ops

    layer = random_dit(tiny_config("distill45_quant"), seed=3, weights="fp8_official").videodit_blocks.layers[1]
    fc2 = layer.mlp.linear_fc2
    x = torch.randn(5, 7, fc2.in_features) * 3
    whole, quantised = fc2(x), fc2.quantize_input(x)
    monkeypatch.setattr(ops, "QUANT_BLOCK_BYTES", 4 * fc2.in_features * 3)  # 3 rows per block
    assert torch.equal(fc2.quantize_input(x).float(), quantised.float())
    # the products in row blocks too (same values; a GEMM of other sizes may round its sums differently)
    assert relative_error(fc2(x), whole) < 1e-6


def test_comfyui_style_scaled_file_variants_load(tmp_path):
    """A scaled-fp8 file as ComfyUI's tools write it: the marker tensor, [1]-shaped scales, input scales."""
    small = random_dit(tiny_config("base"), seed=5, weights="fp8_e4m3fn_scaled")
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    for key in [k for k in state if k.endswith(".scale_weight")]:
        state[key] = state[key].reshape(1)
        state[key[: -len("scale_weight")] + "scale_input"] = torch.ones(())
    state["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(state, str(tmp_path / "comfy.safetensors"),
              metadata={"magi1_model_config": json.dumps(tiny_config("base"))})
    loaded = load_dit(tmp_path / "comfy.safetensors")
    assert loaded.weights == "fp8_e4m3fn_scaled"
    assert all(same(v, small.state_dict()[k]) for k, v in loaded.state_dict().items())
