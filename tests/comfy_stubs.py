"""Stand-ins for the ComfyUI modules the pack's nodes import (CI has no ComfyUI): they record what the
nodes declare, so that schemas can be checked without ComfyUI. tests/test_comfyui.py checks the same
nodes against the real API."""

import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_KINDS = ("Combo", "Float", "Int", "String", "Boolean")  # the other declared kinds are sockets


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


@contextmanager
def pack_nodes():
    """The pack's NODES, imported under a test name with the stand-ins in place (restored afterwards)."""
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
