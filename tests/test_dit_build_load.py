"""build_dit against the official state-dict keys, shapes and runtime dtypes; load_dit on every
checkpoint layout, its precision rules and its errors.

The official key lists live in ../shared/research (beside the checkout, for developers and CI); the
tests that read them skip, saying so, where that folder is absent.
"""

import ast
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import magi1
from magi1.weights.fp8 import stored_kind
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS, checkpoint_files, infer_config
from magi1.weights.safetensors_io import check_state_dict

RESEARCH = Path(__file__).resolve().parents[2] / "shared" / "research"
needs_research = pytest.mark.skipif(not RESEARCH.is_dir(), reason="needs ../shared/research (official configs and keys)")
DTYPE = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}
TINY = dict(num_layers=3, hidden_size=64, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
            kv_channels=16, caption_channels=24, caption_max_length=10, in_channels=16, out_channels=16,
            apply_layernorm_1p=True)
FP32_MODULES = ("x_embedder.", "t_embedder.", "y_embedder.", "final_linear.", "rope.", ".q_layernorm.",
                ".k_layernorm.", "_post_norm.", "final_layernorm.")


def official_keys(variant):
    """{key: (shape, runtime dtype)} from the official key list."""
    table = {}
    for line in (RESEARCH / "magi1_keys" / f"keys_{variant}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _, runtime = line.split("\t")
            table[key] = (tuple(int(s) for s in re.findall(r"\d+", shape)), DTYPE[runtime])
    return table


@needs_research
@pytest.mark.parametrize("variant", ["4.5B_base", "4.5B_distill", "24B_base", "24B_distill"])
def test_meta_build_has_the_official_keys_shapes_and_runtime_dtypes(variant):
    config = json.loads((RESEARCH / "magi1_configs" / f"{variant}_config.json").read_text())["model_config"]
    model = magi1.build_dit(config, device="meta")
    ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    official = official_keys(variant)
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert ours == official
    assert all(v.is_meta for v in model.state_dict().values())


@needs_research
@pytest.mark.parametrize("variant, size", [("4.5B_base", "4.5B"), ("24B_distill", "24B")])
def test_official_sizes_are_recognised_from_shapes_alone(variant, size):
    shapes = {k: shape for k, (shape, _) in official_keys(variant).items()}
    config, found = infer_config(shapes)
    assert found == size
    official = json.loads((RESEARCH / "magi1_configs" / f"{variant}_config.json").read_text())["model_config"]
    assert config == magi1.ModelConfig.from_dict(official)
    check_state_dict(magi1.build_dit(config, device="meta"), shapes)


@needs_research
@pytest.mark.parametrize("variant", ["4.5B_distill_quant", "24B_distill_quant"])
def test_official_fp8_checkpoints_have_our_keys_shapes_and_dtypes(variant):
    """The official fp8 layout (every key, shape and stored dtype of the release's key table) is what a
    model built for it holds, and the table alone says it is that kind and that size."""
    table = official_keys(variant)
    shapes = {k: shape for k, (shape, _) in table.items()}
    dtypes = {k: {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}.get(dtype, "BF16")
              for k, (_, dtype) in table.items()}
    assert stored_kind(shapes, dtypes) == "fp8_official"
    config, size = infer_config(shapes)
    assert size == variant.split("_")[0]
    model = magi1.build_dit(config, device="meta", dtype=torch.bfloat16, weights="fp8_official")
    check_state_dict(model, shapes)
    ours = model.state_dict()
    float32_modules = ("x_embedder", "t_embedder", "y_embedder", "final_linear", "rope", "q_layernorm.",
                       "k_layernorm.", "post_norm", "final_layernorm")
    for key, (_, dtype) in table.items():
        if dtype == torch.bfloat16 and any(name in key for name in float32_modules):
            dtype = torch.float32  # the official _high_precision_promoter's float32 modules
        assert ours[key].dtype == dtype, key


def tiny_model(seed=0):
    return magi1.random_dit(TINY, seed=seed)


def save_single(model, path, metadata=None):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)


def save_sharded(model, folder, shards=3):
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(model.state_dict())
    state = model.state_dict()
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def assert_same_weights(loaded, reference):
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].float(), value.float()), key


def test_single_file_round_trip(tmp_path):
    model = tiny_model()
    save_single(model, tmp_path / "tiny.safetensors")
    loaded = magi1.load_dit(tmp_path / "tiny.safetensors")
    assert loaded.config == dataclasses.replace(model.config, params_dtype=torch.float32)  # the file's dtype
    assert_same_weights(loaded, model)
    assert loaded.variant == "custom_base" and not loaded.distill


@pytest.mark.parametrize("pick", ["index", "first_shard", "last_shard", "folder"])
def test_sharded_checkpoint_from_index_any_shard_or_folder(tmp_path, pick):
    model = tiny_model(1)
    folder = save_sharded(model, tmp_path / "inference_weight.distill")
    path = {"index": folder / "model.safetensors.index.json",
            "first_shard": folder / "model-00001-of-00003.safetensors",
            "last_shard": folder / "model-00003-of-00003.safetensors", "folder": folder}[pick]
    assert len(checkpoint_files(path)) == 3
    loaded = magi1.load_dit(path)
    assert_same_weights(loaded, model)
    assert loaded.distill and loaded.variant == "custom_distill"  # the official distill folder name


def test_a_checkpoint_is_described_by_its_variant_and_why(tmp_path):
    """The reports' model name (``model_description``): a checkpoint keeps its variant and reason, in
    parentheses; only the built-in models (tests/test_tiny.py) are named otherwise."""
    from magi1.weights.loader import model_description

    model = tiny_model()
    save_single(model, tmp_path / "tiny.safetensors")
    folder = save_sharded(model, tmp_path / "inference_weight.distill")
    base = magi1.load_dit(tmp_path / "tiny.safetensors")
    assert base.builtin is None
    assert model_description(base) == (f"custom_base (neither the checkpoint's name '{tmp_path.name}/tiny.safetensors' "
                                       "nor its metadata says distill)")
    chosen = magi1.load_dit(tmp_path / "tiny.safetensors", distill=True)
    assert model_description(chosen) == "custom_distill (as chosen)"
    assert model_description(magi1.load_dit(tmp_path / "tiny.safetensors", weights="fp8_e4m3fn")).startswith(
        "custom_base_fp8 (neither the checkpoint's name")
    assert model_description(magi1.load_dit(folder)) == ("custom_distill (the checkpoint's name "
                                                         "'inference_weight.distill/model-00001-of-00003.safetensors' "
                                                         "says distill)")


def test_missing_shard_is_named(tmp_path):
    folder = save_sharded(tiny_model(), tmp_path / "ckpt")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        magi1.load_dit(folder / "model-00001-of-00003.safetensors")


def test_damaged_shard_or_vae_file_is_named_with_the_fix(tmp_path):
    folder = save_sharded(tiny_model(), tmp_path / "ckpt")
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:5])  # an interrupted download
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors is not a readable .safetensors file.*again"):
        magi1.load_dit(folder)
    vae = tmp_path / "magi1_vae.safetensors"
    vae.write_text("{}")
    with pytest.raises(ValueError, match="magi1_vae.safetensors is not a readable .safetensors file"):
        magi1.load_vae(vae)


def test_precision_rules(tmp_path):
    """The modules the official code promotes stay float32; the rest take the compute dtype."""
    save_single(tiny_model(), tmp_path / "tiny.safetensors")
    loaded = magi1.load_dit(tmp_path / "tiny.safetensors", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for key, value in loaded.state_dict().items():
        expected = torch.float32 if any(m in key for m in FP32_MODULES) and "layernorm_xattn" not in key else torch.bfloat16
        assert value.dtype == expected, key
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bf16_model_runs_and_tracks_float32(tmp_path):
    model = tiny_model(2)
    save_single(model, tmp_path / "tiny.safetensors")
    half = magi1.load_dit(tmp_path / "tiny.safetensors", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(1, 16, 2, 4, 6, generator=g), t=torch.tensor([[0.4]]),
                caption=torch.randn(1, 1, 10, 24, generator=g), caption_mask=torch.ones(1, 1, 10, dtype=torch.bool),
                kv_range=[(0, 12)])
    full, low = model(**args), half(**args)
    assert low.dtype == torch.float32
    err = ((low - full).norm() / full.norm()).item()
    assert 0 < err < 0.05


def test_not_a_dit_lists_missing_and_unexpected_keys(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)},
              str(tmp_path / "vae.safetensors"))
    with pytest.raises(ValueError, match=r"not a MAGI-1 DiT checkpoint: 9 of its defining tensors are missing"):
        magi1.load_dit(tmp_path / "vae.safetensors")


def test_wrong_keys_are_counted_and_listed(tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model().state_dict().items()}
    del state["videodit_blocks.layers.1.mlp_post_norm.bias"]
    del state["rope.bands"]
    state["videodit_blocks.layers.1.extra.weight"] = torch.zeros(2)
    state["y_embedder.y_proj_adaln.0.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError) as info:
        magi1.load_dit(tmp_path / "broken.safetensors")
    text = str(info.value)
    assert "2 missing keys" in text and "rope.bands" in text and "layers.1.mlp_post_norm.bias" in text
    assert "1 unexpected keys" in text and "layers.1.extra.weight" in text
    assert "y_embedder.y_proj_adaln.0.bias (7,) (expected (16,))" in text


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.ckpt"])
def test_pickle_files_are_refused_without_being_opened(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors checkpoints"):
        magi1.load_dit(path)


def test_metadata_config_and_distill_flag(tmp_path):
    config = dict(TINY, x_rescale_factor=0.5)
    model = magi1.random_dit(config, seed=3)
    save_single(model, tmp_path / "tiny.safetensors",
                metadata={"magi1_model_config": json.dumps(config), "magi1_distill": "true"})
    loaded = magi1.load_dit(tmp_path / "tiny.safetensors")
    assert loaded.config.x_rescale_factor == 0.5 and loaded.distill


def test_official_configs_are_the_ones_in_the_loader():
    for size, values in OFFICIAL_MODEL_CONFIGS.items():
        config = magi1.ModelConfig(**values)
        assert config.num_layers == {"4.5B": 34, "24B": 48}[size]


def test_loader_never_unpickles():
    root = Path(magi1.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and \
                    isinstance(node.value, ast.Name) and node.value.id in ("torch", "pickle"):
                raise AssertionError(f"{path.name}:{node.lineno} unpickles")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "pickle" not in names, f"{path.name} imports pickle"


def test_damaged_index_and_special_tokens_name_the_file_and_the_fix(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00001')  # cut short
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not valid JSON .*download the index"):
        magi1.load_dit(index)
    truncated = tmp_path / "special_tokens.npz"
    from magi1 import builtin

    source = builtin.TINY.special_tokens_file
    truncated.write_bytes(open(source, "rb").read()[:200])
    with pytest.raises(ValueError, match=r"special_tokens.npz is not a readable .npz file .*download"):
        magi1.SpecialTokens.load(truncated)


def test_symlinked_shards_load(tmp_path):
    """Hugging Face caches link each file to a blob elsewhere: the index's names are what is checked."""
    blobs, folder = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(blobs / "abc"),
              metadata={"magi1_model_config": json.dumps(TINY)})
    os.symlink(blobs / "abc", folder / "model-00001-of-00001.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x_embedder.weight": "model-00001-of-00001.safetensors"}}))
    assert magi1.load_dit(index).config.hidden_size == TINY["hidden_size"]


@pytest.mark.parametrize("shard", ["../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", "..",
                                   "sub\\..\\x.safetensors"])
def test_index_shards_must_sit_beside_the_index(tmp_path, shard):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x_embedder.weight": shard}}))
    with pytest.raises(ValueError, match="names a shard outside its folder"):
        magi1.load_dit(index)


@pytest.mark.parametrize("layout, expected", [
    ("4.5B_base/inference_weight/model-00001-of-00001.safetensors", False),
    ("distill_runs/4.5B_base/inference_weight/model-00001-of-00001.safetensors", False),  # a parent says distill
    ("4.5B_distill/inference_weight.distill/model-00001-of-00001.safetensors", True),
    ("distill_things/my_base.safetensors", True),  # its own folder says so (the report says why; variant overrides)
    ("models/my_distill.safetensors", True),
    ("diffusion_models/model_4.5B_distill.safetensors", True),  # the file's own name
    ("4.5B_distill/model.safetensors", True),  # its own folder
])
def test_distill_is_read_from_the_checkpoints_own_name(tmp_path, layout, expected):
    path = tmp_path / layout
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(path),
              metadata={"magi1_model_config": json.dumps(TINY)})
    loaded = magi1.load_dit(path)
    assert loaded.distill == expected, loaded.variant_reason
    assert loaded.variant_reason.startswith("neither") != expected
