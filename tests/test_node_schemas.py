"""The node schemas without ComfyUI (CI has none): ids unique and prefixed, defaults inside their ranges
and options, every input and output documented. ComfyUI's modules are replaced by small recorders of
what the nodes declare; tests/test_comfyui.py checks the same nodes against the real API."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _Declared:
    """One declared input or output: its socket type and keyword arguments."""

    def __init__(self, kind, id=None, **options):
        self.kind, self.id, self.options = kind, id, options


def _socket(name):
    return types.SimpleNamespace(Input=lambda id, **kw: _Declared(name, id, **kw),
                                 Output=lambda **kw: _Declared(name, **kw))


def _fake_comfy():
    """Stand-ins for the ComfyUI modules the nodes import, recording schemas."""
    io = types.ModuleType("comfy_api.latest.io")
    for name in ("Model", "Combo", "Float", "Int", "String", "Boolean", "Clip", "Conditioning", "Image", "Latent"):
        setattr(io, name, _socket(name))
    io.Custom = _socket
    io.Schema = lambda **kw: types.SimpleNamespace(**kw)
    io.NodeOutput = lambda *values: types.SimpleNamespace(result=values)

    class ComfyNode:
        @classmethod
        def GET_SCHEMA(cls):
            return cls.define_schema()

    io.ComfyNode = ComfyNode
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ComfyExtension = type("ComfyExtension", (), {})
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: ["magi/model.safetensors.index.json", "magi/model-00001.safetensors",
                                                    "other.ckpt"]
    comfy = types.ModuleType("comfy")
    modules = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "comfy_api.latest.io": io,
               "folder_paths": folder_paths, "comfy": comfy}
    for sub in ("model_management", "model_patcher", "utils"):
        modules[f"comfy.{sub}"] = types.ModuleType(f"comfy.{sub}")
        setattr(comfy, sub, modules[f"comfy.{sub}"])
    return modules


@pytest.fixture(scope="module")
def nodes(request):
    saved = {name: sys.modules.get(name) for name in _fake_comfy()}
    sys.modules.update(_fake_comfy())
    spec = importlib.util.spec_from_file_location("magipack_schemas", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["magipack_schemas"] = pack
    try:
        spec.loader.exec_module(pack)
        from magipack_schemas.nodes import NODES  # noqa: E402  (the pack registered under a test name)
        yield NODES
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [n for n in sys.modules if n.startswith("magipack_schemas")]:
            del sys.modules[name]


def test_ids_are_unique_prefixed_and_categorised(nodes):
    schemas = [node.GET_SCHEMA() for node in nodes]
    ids = [schema.node_id for schema in schemas]
    assert len(ids) == len(set(ids)) == 6
    for schema in schemas:
        assert schema.node_id.startswith("MAGI1") and schema.category == "MAGI-1"
        assert schema.display_name.startswith("MAGI-1 ") and schema.description


def test_inputs_and_outputs_are_documented_and_defaults_valid(nodes):
    for node in nodes:
        schema = node.GET_SCHEMA()
        names = [inp.id for inp in schema.inputs]
        assert len(names) == len(set(names)), schema.node_id
        for inp in schema.inputs:
            where = f"{schema.node_id}.{inp.id}"
            assert len(inp.options.get("tooltip", "")) > 20, where
            default = inp.options.get("default")
            if "options" in inp.options and default is not None:
                assert default in inp.options["options"], where
            if default is not None and "min" in inp.options:
                assert inp.options["min"] <= default <= inp.options["max"], where
                step = inp.options.get("step")
                if inp.kind == "Int" and step:
                    assert (default - inp.options["min"]) % step == 0, where
        for out in schema.outputs:
            assert out.options.get("tooltip"), schema.node_id
        # execute takes exactly the declared inputs
        code = node.execute.__func__.__code__
        assert list(code.co_varnames[1:code.co_argcount]) == names, schema.node_id


def test_loaders_list_only_safetensors(nodes):
    loader = next(node for node in nodes if node.__name__ == "MAGI1DiTLoader").GET_SCHEMA()
    checkpoint = next(inp for inp in loader.inputs if inp.id == "checkpoint")
    assert checkpoint.options["options"] == ["magi/model-00001.safetensors", "magi/model.safetensors.index.json"]


def test_sampler_defaults_are_a_valid_request(nodes):
    from magi1.sampler import VideoLayout

    sampler = next(node for node in nodes if node.__name__ == "MAGI1Sampler").GET_SCHEMA()
    defaults = {inp.id: inp.options.get("default") for inp in sampler.inputs}
    layout = VideoLayout.plan(defaults["frames"], defaults["height"], defaults["width"])
    assert layout.chunk_num == 4  # 96 frames at 720x720: four chunks of 24 frames
    optional = {inp.id for inp in sampler.inputs if inp.options.get("optional")}
    assert optional == {"negative", "vae", "start_image", "prefix_video", "prefix_latent", "record_masks",
                        "kv_offload"}
