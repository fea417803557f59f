"""Queue-time checks (nodes/queue_checks.py) on every input of every node, each problem on its own input; the
checkpoint dropdown (one entry per sharded checkpoint); what the sampler refuses or names about a prompt.
ComfyUI is replaced by the stand-ins of comfy_stubs; tests/test_comfyui.py checks the same in a real server."""

import asyncio
import json
import math
import types

import pytest
import torch
from safetensors.torch import save_file

from comfy_stubs import pack_namespace
from magi1 import builtin
from magi1.weights.loader import checkpoint_entries, checkpoint_files

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(scope="module")
def pack():
    with pack_namespace() as pack:
        yield pack


def every_node(pack):
    return [getattr(pack, name) for name in dir(pack) if name.startswith("MAGI1")]


def valid_values(node):
    """A value for every declared input that passes: widgets at their default (a dropdown's first choice when
    it has none), sockets linked (None, as ComfyUI passes them at queue time)."""
    values = {}
    for name, (kind, info) in declared(node).items():
        if kind in WIDGETS:
            values[name] = info.get("default", (info.get("options") or [None])[0])
        else:
            values[name] = None
    if node.__name__ == "MAGI1EncodePrefix":
        values.pop("prefix_video")  # exactly one of the two images
    return values


def declared(node):
    types_ = node.INPUT_TYPES()
    return {**types_["required"], **types_.get("optional", {})}


def problems_of(pack, node, values):
    return pack.modules["queue_checks"].input_problems(node, values)


def test_defaults_pass_and_every_widget_is_checked_on_its_own_input(pack):
    checked = 0
    for node in every_node(pack):
        values = valid_values(node)
        assert problems_of(pack, node, values) == {} and node.validate_inputs(**values) is True, node.__name__
        for name, (kind, info) in declared(node).items():
            bad = []
            if kind in ("INT", "FLOAT") and "max" in info:
                bad += [info["max"] + 1, info["min"] - 1]
            if kind == "FLOAT":
                bad += [math.nan, math.inf]
            if kind == "COMBO":
                bad += ["bogus"]
            for value in bad:
                problems = problems_of(pack, node, {**values, name: value})
                assert list(problems) == [name], (node.__name__, name, value, problems)
                assert node.GET_SCHEMA().display_name in problems[name]
                checked += 1
            if kind in ("INT", "FLOAT"):  # ComfyUI reports what it cannot convert, in its own words
                assert problems_of(pack, node, {**values, name: "abc"}) == {}, (node.__name__, name)
    assert checked > 60


def test_messages_name_the_fix(pack):
    sampler, cache, loader = pack.MAGI1Sampler, pack.MAGI1MotionDetailCache, pack.MAGI1DiTLoader
    values = valid_values(sampler)
    assert problems_of(pack, sampler, {**values, "steps": 5}) == {
        "steps": "MAGI-1 Sampler: steps must be a multiple of 4 (the window size); the nearest valid value is 4"} or \
        "nearest valid value is 4" in problems_of(pack, sampler, {**values, "steps": 5})["steps"]
    assert "finite number" in problems_of(pack, sampler, {**values, "guidance": math.nan})["guidance"]
    preset = problems_of(pack, cache, {**valid_values(cache), "preset": "bogus"})["preset"]
    assert "pick one of 'custom', 'slow', 'fast'" in preset  # the node's own choices, not the library's
    dtype = problems_of(pack, loader, {**valid_values(loader), "weight_dtype": "int8"})["weight_dtype"]
    assert "'int8' is not one of the choices: pick one of 'auto', 'bfloat16', 'float32', 'fp8_e4m3fn'" in dtype
    window = problems_of(pack, cache, {**valid_values(cache), "detail_window": 4})
    assert list(window) == ["detail_window"] and "odd" in window["detail_window"]
    # several mistakes: each on its own input
    both = problems_of(pack, sampler, {**values, "steps": 5, "width": 100, "guidance": math.nan})
    assert sorted(both) == ["guidance", "steps", "width"]


def test_one_of_the_prefix_images_and_multi_gpu_cross_checks(pack):
    encode, multi = pack.MAGI1EncodePrefix, pack.MAGI1MultiGPU
    base = {"vae": None, "width": 64, "height": 64}
    assert list(problems_of(pack, encode, base)) == ["start_image"]
    assert list(problems_of(pack, encode, {**base, "start_image": None, "prefix_video": None})) == ["prefix_video"]
    assert problems_of(pack, encode, {**base, "prefix_video": None}) == {}
    assert list(problems_of(pack, multi, {"model": None, "gpus": 4, "cfg_parallel": 3})) == ["gpus"]
    assert list(problems_of(pack, multi, {"model": None, "gpus": 2, "cfg_parallel": 1, "devices": "0,1,2"})) == [
        "devices"]


def test_non_strings_and_bad_schedules_in_prompts(pack):
    node = pack.MAGI1TextEncode
    assert problems_of(pack, node, {"clip": None, "prompt": ["a", "list"]}) == {}  # ComfyUI reports it
    problems = problems_of(pack, node, {"clip": None, "prompt": "0: a red ball\n1:a blue square"})
    assert list(problems) == ["prompt"] and "write '1: a blue square'" in problems["prompt"]
    problems = problems_of(pack, node, {"clip": None, "prompt": "0: a\n" + "7" * 5000 + ": b"})
    assert "beyond any video" in problems["prompt"] and "4300" not in problems["prompt"]


def test_comfyuis_report_is_narrowed_to_the_inputs_concerned(pack):
    """What ComfyUI 0.3.64 reports for a failed validate_inputs (one error per input read, each with every
    message) becomes one error per problem, on its own input; other errors and other nodes stay as they were."""
    checks = pack.modules["queue_checks"]
    sampler = pack.MAGI1Sampler
    inputs = {**valid_values(sampler), "steps": 5, "model": ["1", 0], "positive": ["2", 0]}
    message = sampler.validate_inputs(**{k: (None if isinstance(v, list) else v) for k, v in inputs.items()})
    comfy_errors = [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
                     "details": f"{name} - {message}", "extra_info": {"input_name": name}} for name in inputs]
    other = {"type": "value_smaller_than_min", "details": "seed", "extra_info": {"input_name": "seed"}}
    narrowed = checks.narrowed_errors(sampler, inputs, comfy_errors + [other])
    assert other in narrowed
    custom = [e for e in narrowed if e["type"] == "custom_validation_failed"]
    assert [e["extra_info"]["input_name"] for e in custom] == ["steps"]
    assert "multiple of 4" in custom[0]["details"]

    async def validate_inputs(prompt_id, prompt, item, validated):  # ComfyUI's, as far as the wrapper sees it
        result = (False, list(comfy_errors), item) if prompt[item]["class_type"] == "MAGI1Sampler" else (
            False, [dict(other)], item)
        validated[item] = result
        return result

    execution = types.SimpleNamespace(validate_inputs=validate_inputs)
    assert checks.attribute_to_inputs(execution, every_node(pack))
    assert not checks.attribute_to_inputs(execution, every_node(pack))  # once only
    prompt = {"6": {"class_type": "MAGI1Sampler", "inputs": inputs}, "7": {"class_type": "KSampler", "inputs": {}}}
    validated = {}
    result = asyncio.run(execution.validate_inputs("id", prompt, "6", validated))
    assert result is validated["6"] and [e["extra_info"]["input_name"] for e in result[1]] == ["steps"]
    assert asyncio.run(execution.validate_inputs("id", prompt, "7", validated))[1] == [other]  # not ours: as is
    prompt["6"]["inputs"] = "damaged"  # the wrapper never breaks ComfyUI's validation
    assert asyncio.run(execution.validate_inputs("id", prompt, "6", {}))[1] == comfy_errors


# ------------------------------------------------------------------------------- the checkpoint dropdown
def save_shards(folder, names, index=True):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, name in enumerate(names):
        save_file({f"w{i}": torch.zeros(1)}, str(folder / name))
        weight_map[f"w{i}"] = name
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def listed(root):
    """The folder as ComfyUI lists it: files with model extensions, '/'-separated, relative."""
    return sorted(str(p.relative_to(root)).replace("\\", "/") for p in root.rglob("*")
                  if p.suffix in (".safetensors", ".ckpt"))


def test_one_entry_per_sharded_checkpoint(tmp_path):
    official = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_shards(tmp_path / "4.5B_distill" / "inference_weight.distill", official)
    save_shards(tmp_path / "24B_base" / "inference_weight", ["a.safetensors", "b.safetensors"])
    save_shards(tmp_path / "noindex", [f"m-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)], index=False)
    save_shards(tmp_path, ["single.safetensors"], index=False)
    (tmp_path / "damaged").mkdir()
    save_shards(tmp_path / "damaged", ["x.safetensors"], index=False)
    (tmp_path / "damaged" / "model.safetensors.index.json").write_text("{not json")
    entries, set_of = checkpoint_entries(listed(tmp_path), lambda name: str((tmp_path / name).parent))
    assert entries == ["24B_base/inference_weight/model.safetensors.index.json",
                       "4.5B_distill/inference_weight.distill/model.safetensors.index.json",
                       "damaged/x.safetensors", "noindex/m-00001-of-00003.safetensors", "single.safetensors"]
    assert set_of["4.5B_distill/inference_weight.distill/model-00002-of-00002.safetensors"] == entries[1]
    assert set_of["noindex/m-00003-of-00003.safetensors"] == "noindex/m-00001-of-00003.safetensors"
    assert "single.safetensors" not in set_of
    assert len(checkpoint_files(tmp_path / "noindex" / "m-00002-of-00003.safetensors")) == 3  # the whole set loads
    (tmp_path / "noindex" / "m-00003-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"one of 3 shards, but \['m-00003-of-00003.safetensors'\] are not"):
        checkpoint_files(tmp_path / "noindex" / "m-00001-of-00003.safetensors")


def test_the_loader_lists_the_index_and_still_takes_a_shard(pack, tmp_path, monkeypatch):
    folder_paths = pack.modules["loaders"].folder_paths
    save_shards(tmp_path / "4.5B_distill" / "inference_weight.distill",
                ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda folder: listed(tmp_path))
    monkeypatch.setitem(folder_paths.folders, "diffusion_models", [str(tmp_path)])
    loader = pack.MAGI1DiTLoader
    options = loader.INPUT_TYPES()["required"]["checkpoint"][1]["options"]
    index = "4.5B_distill/inference_weight.distill/model.safetensors.index.json"
    assert options[2:] == [index]
    values = valid_values(loader)
    for saved in (index, "4.5B_distill/inference_weight.distill/model-00002-of-00002.safetensors"):
        assert loader.validate_inputs(**{**values, "checkpoint": saved}) is True  # old saved values keep loading
    assert "pick one of" in loader.validate_inputs(**{**values, "checkpoint": "4.5B_distill/missing.safetensors"})


# --------------------------------------------------------------------------------- prompts the sampler reads
def tiny_prompt(pack, model_name="tiny", prompt=builtin.TINY.example_prompt):
    return pack.MAGI1TinyTextEncode.execute(prompt=prompt, model=model_name).result[0]


@pytest.fixture(scope="module")
def tiny_model(pack):
    return pack.MAGI1DiTLoader.execute(checkpoint="MAGI-1 tiny demo (built-in)", variant="auto", weight_dtype="auto",
                                       attention="auto").result[0]


def sample(pack, model, positive, **changes):
    request = dict(model=model, positive=positive, width=64, height=64, frames=24, steps=4, seed=0, guidance=5.0)
    return pack.MAGI1Sampler.execute(**{**request, **changes})


def test_the_sampler_refuses_a_prompt_for_another_model_naming_both(pack, tiny_model):
    with pytest.raises(ValueError, match=r"positive was encoded by the built-in bench model's text encoder, but the "
                                         r"DiT is the built-in tiny model: set MAGI-1 Tiny Text Encode's model to tiny"):
        sample(pack, tiny_model, tiny_prompt(pack, "bench"))
    t5 = [[torch.zeros(1, 4, 64), {"attention_mask": torch.ones(1, 4, dtype=torch.bool), "magi1_text_encoder": "t5xxl"}]]
    with pytest.raises(ValueError, match="encoded by T5-XXL, but the DiT is the built-in tiny model"):
        sample(pack, tiny_model, t5)
    check_encoder = pack.modules["sampler"].check_encoder
    with pytest.raises(ValueError, match="tiny model's text encoder, but the DiT is this checkpoint, which reads "
                                         "T5-XXL prompts: encode it with MAGI-1 Text Encode and T5-XXL"):
        check_encoder(tiny_prompt(pack), "positive", None, 4096)
    check_encoder(t5, "positive", None, 4096)
    check_encoder(tiny_prompt(pack), "positive", None, 64)  # a checkpoint of another width: by width alone


def test_the_sampler_refuses_what_it_would_drop_and_names_what_it_ignores(pack, tiny_model):
    first, second = tiny_prompt(pack), tiny_prompt(pack, prompt="a blue square moving left over a striped wall")
    with pytest.raises(ValueError, match="positive holds 2 prompts .*ConditioningCombine.*prompt schedule"):
        sample(pack, tiny_model, first + second)  # what ConditioningCombine makes
    ranged = [[first[0][0], {**first[0][1], "start_percent": 0.0, "end_percent": 0.5}]]
    with pytest.raises(ValueError, match="timestep range .*ConditioningSetTimestepRange"):
        sample(pack, tiny_model, ranged)
    with pytest.raises(ValueError, match="negative carries a timestep range"):
        sample(pack, tiny_model, first, negative=ranged)
    whole = [[first[0][0], {**first[0][1], "start_percent": 0.0, "end_percent": 1.0, "strength": 0.5}]]
    report = sample(pack, tiny_model, whole).result[1]
    assert "the prompt carries options the sampler does not apply (set by other conditioning nodes): ['strength']" \
        in report
    digits = tiny_prompt(pack, prompt="a red ball 3 times over a checkerboard 🙂")
    report = sample(pack, tiny_model, digits).result[1]
    assert "does not know ['3', 'times', '🙂']" in report


def test_nan_guidance_is_refused_at_execution_too(pack, tiny_model):
    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):
        sample(pack, tiny_model, tiny_prompt(pack), guidance=float("nan"))


def test_a_file_given_to_the_wrong_loader_is_named():
    import magi1

    with pytest.raises(ValueError, match=r"not a MAGI-1 DiT checkpoint: this file is a MAGI-1 VAE: load it as the VAE"):
        magi1.load_dit(builtin.TINY.vae_file)
    with pytest.raises(ValueError, match=r"not a MAGI-1 VAE checkpoint: this file is a MAGI-1 DiT: load it as the DiT"):
        magi1.load_vae(builtin.TINY.dit_file)


def test_every_node_reads_all_its_inputs_so_comfyui_defers_to_these_checks(pack):
    """ComfyUI skips its own range and dropdown checks for the inputs a node's validate_inputs reads, and for
    all of them when it takes **kwargs (execution.py: validate_has_kwargs). So a ComfyUI that checks dropdown
    values itself still takes what these checks accept (a shard saved before 0.8 in the DiT loader)."""
    import inspect

    for node in every_node(pack):
        spec = inspect.getfullargspec(node.validate_inputs)
        assert spec.varkw is not None and spec.args == ["cls"], node.__name__


def test_windows_names_and_missing_files(pack, tmp_path, monkeypatch):
    """ComfyUI on Windows lists names with backslashes: the same one entry per checkpoint, the workflows' '/'
    names still accepted; a file the folder does not hold is refused saying where it comes from and goes."""
    folder = tmp_path / "4.5B_distill" / "inference_weight.distill"
    save_shards(folder, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    names = [name.replace("/", "\\") for name in listed(tmp_path)]
    entries, set_of = checkpoint_entries(names, lambda name: str(folder))
    assert entries == ["4.5B_distill\\inference_weight.distill\\model.safetensors.index.json"]
    assert set(set_of) == set(names)  # both shards hidden behind the index
    folder_paths = pack.modules["loaders"].folder_paths
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda kind: names if kind == "diffusion_models" else [])
    monkeypatch.setitem(folder_paths.folders, "diffusion_models", [str(tmp_path)])
    monkeypatch.setattr(folder_paths, "get_full_path", lambda kind, name: str(tmp_path / name.replace("\\", "/")))
    loader, values = pack.MAGI1DiTLoader, valid_values(pack.MAGI1DiTLoader)
    official = "4.5B_distill/inference_weight.distill/model.safetensors.index.json"  # as the workflows name it
    assert loader.validate_inputs(**{**values, "checkpoint": official}) is True
    missing = problems_of(pack, loader, {**values, "checkpoint": "24B_base/inference_weight/model.safetensors.index.json"})
    assert "It is not in ComfyUI/models/diffusion_models: the MAGI-1 DiT: download its folder" in missing["checkpoint"]
    nested = problems_of(pack, loader, {**values, "checkpoint": "MAGI-1/ckpt/magi/" + official})  # a folder higher
    assert "the folder lists it as '4.5B_distill\\\\inference_weight.distill\\\\model.safetensors.index.json'" in \
        nested["checkpoint"]
    vae = problems_of(pack, pack.MAGI1VAELoader, {"vae_name": "magi1_vae.safetensors", "weight_dtype": "auto"})
    assert "download ckpt/vae/diffusion_pytorch_model.safetensors" in vae["vae_name"]
    assert "download" not in problems_of(pack, loader, {**values, "weight_dtype": "int8"})["weight_dtype"]


def test_concatenated_states_are_refused_before_loading(pack, tiny_model):
    first = tiny_prompt(pack)
    joined = [[torch.cat([first[0][0], first[0][0]], dim=1), dict(first[0][1])]]  # what ConditioningConcat makes
    with pytest.raises(ValueError, match="positive holds 64 text states but an attention mask of 32 .*ConditioningConcat"):
        sample(pack, tiny_model, joined)
