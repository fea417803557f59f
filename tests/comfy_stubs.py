"""Stand-ins for the ComfyUI modules the pack's nodes import (CI has no ComfyUI): they record what the
nodes declare, so that schemas can be checked without ComfyUI, and do just enough on the CPU (model
folders, a ModelPatcher holder, resizing) for the nodes to run in unit tests. tests/test_comfyui.py checks
the same nodes against the real API. workflows/build_workflows.py reads the schemas through them too."""

import enum
import importlib
import importlib.util
import itertools
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch

from magi1.network.ops import CastOps

ROOT = Path(__file__).resolve().parents[1]
WIDGET_KINDS = ("Combo", "Float", "Int", "String", "Boolean")  # the other declared kinds are sockets
# ComfyUI's type names of the io classes the nodes use (io.Custom("X") is type X).
IO_TYPES = {"Model": "MODEL", "Combo": "COMBO", "Float": "FLOAT", "Int": "INT", "String": "STRING",
            "Boolean": "BOOLEAN", "Clip": "CLIP", "Conditioning": "CONDITIONING", "Image": "IMAGE", "Latent": "LATENT"}


class _Declared:
    """One declared input or output: its kind, ComfyUI type name, id and keyword arguments."""

    def __init__(self, kind, id=None, **options):
        self.kind, self.id, self.options = kind, id, options
        self.io_type = IO_TYPES.get(kind, kind)


def _socket(name):
    return types.SimpleNamespace(Input=lambda id, **kw: _Declared(name, id, **kw),
                                 Output=lambda **kw: _Declared(name, **kw))


class ModelPatcher:
    """What the nodes use of comfy.model_patcher.ModelPatcher: the model, its devices and options."""

    def __init__(self, model, load_device, offload_device):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.model_options = {"transformer_options": {}}

    def clone(self):
        clone = ModelPatcher(self.model, self.load_device, self.offload_device)
        clone.model_options = {"transformer_options": dict(self.model_options["transformer_options"])}
        return clone


class ProgressBar:
    def __init__(self, total):
        self.total, self.current = total, 0

    def update_absolute(self, value, total=None, preview=None):
        self.current, self.total, self.preview = value, total or self.total, preview


class LatentPreviewMethod(enum.Enum):  # comfy.cli_args.LatentPreviewMethod
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


def _common_upscale(samples, width, height, method, crop):
    """comfy.utils.common_upscale for the bicubic, uncropped case the nodes use."""
    assert (method, crop) == ("bicubic", "disabled")
    return torch.nn.functional.interpolate(samples, size=(height, width), mode="bicubic")


def _fake_comfy():
    """Stand-ins for the ComfyUI modules the nodes import, recording schemas."""
    io = types.ModuleType("comfy_api.latest.io")
    for name in IO_TYPES:
        setattr(io, name, _socket(name))
    io.Custom = _socket
    io.Schema = lambda **kw: types.SimpleNamespace(**kw)
    io.NodeOutput = lambda *values, ui=None: types.SimpleNamespace(result=values, ui=ui)
    io.FolderType = enum.Enum("FolderType", {"input": "input", "output": "output", "temp": "temp"})

    class ComfyNode:
        @classmethod
        def GET_SCHEMA(cls):
            return cls.define_schema()

        @classmethod
        def INPUT_TYPES(cls):  # ComfyUI's V1 view of a V3 schema, which its validation reads
            types_ = {"required": {}}
            for inp in cls.define_schema().inputs:
                info = {key: value for key, value in inp.options.items() if key != "optional"}
                types_.setdefault("optional" if inp.options.get("optional") else "required", {})[inp.id] = (
                    inp.io_type, info)
            return types_

    io.ComfyNode = ComfyNode
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    latest.ui = types.SimpleNamespace(  # comfy_api.latest.ui: what an output node shows
        SavedResult=lambda filename, subfolder, type: dict(filename=filename, subfolder=subfolder, type=type.value),
        PreviewVideo=lambda values: types.SimpleNamespace(as_dict=lambda: {"images": values, "animated": (True,)}))
    latest.ComfyExtension = type("ComfyExtension", (), {})

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.folders = {}  # folder name -> [directories]; tests fill it
    # As ComfyUI lists a model folder: files with model extensions only (a sharded checkpoint's index is not
    # one). Tests may replace it.
    folder_paths.get_filename_list = lambda folder: ["magi/model-00001-of-00002.safetensors",
                                                    "magi/model-00002-of-00002.safetensors", "other.ckpt"]
    folder_paths.get_folder_paths = lambda folder: list(folder_paths.folders.get(folder, []))
    folder_paths.output_directory = folder_paths.temp_directory = "/nonexistent/comfy-output"  # tests may set them
    folder_paths.get_output_directory = lambda: folder_paths.output_directory
    folder_paths.get_temp_directory = lambda: folder_paths.temp_directory

    def get_full_path_or_raise(folder, name):
        for directory in folder_paths.get_folder_paths(folder):
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")

    def get_full_path(folder, name):
        try:
            return get_full_path_or_raise(folder, name)
        except FileNotFoundError:
            return None

    def get_save_image_path(prefix, output_dir, width=0, height=0):  # ComfyUI's numbering, without its %vars%
        subfolder, name = os.path.dirname(os.path.normpath(prefix)), os.path.basename(os.path.normpath(prefix))
        folder = os.path.join(output_dir, subfolder)
        taken = [f for f in os.listdir(folder) if f.startswith(name + "_")] if os.path.isdir(folder) else []
        return folder, name, len(taken) + 1, subfolder, prefix

    folder_paths.get_save_image_path = get_save_image_path
    folder_paths.get_full_path_or_raise = get_full_path_or_raise
    folder_paths.get_full_path = get_full_path

    comfy = types.ModuleType("comfy")
    modules = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "comfy_api.latest.io": io,
               "folder_paths": folder_paths, "comfy": comfy}
    for sub in ("model_management", "model_patcher", "utils", "ops", "cli_args"):
        modules[f"comfy.{sub}"] = types.ModuleType(f"comfy.{sub}")
        setattr(comfy, sub, modules[f"comfy.{sub}"])
    mm = modules["comfy.model_management"]
    cpu = torch.device("cpu")
    for name in ("get_torch_device", "unet_offload_device", "vae_device", "intermediate_device"):
        setattr(mm, name, lambda: cpu)
    mm.load_models_gpu = lambda models, **kw: None
    mm.get_free_memory = lambda device=None: 64 * 2 ** 30
    mm.current_loaded_models = []
    modules["comfy.ops"].manual_cast = CastOps  # ComfyUI's casting operations behave as these
    modules["comfy.cli_args"].LatentPreviewMethod = LatentPreviewMethod  # ComfyUI's default: no previews
    modules["comfy.cli_args"].args = types.SimpleNamespace(preview_method=LatentPreviewMethod.NoPreviews,
                                                           preview_size=512)
    mm.throw_exception_if_processing_interrupted = lambda: None
    modules["comfy.model_patcher"].ModelPatcher = ModelPatcher
    modules["comfy.utils"].ProgressBar = ProgressBar
    modules["comfy.utils"].common_upscale = _common_upscale
    return modules


@contextmanager
def pack_nodes():
    """The pack's NODES, imported under a fresh test name with the stand-ins in place (restored afterwards,
    so that uses may nest). A node's module is ``sys.modules[node.__module__]``."""
    fakes = _fake_comfy()
    # A name no other use holds, even from another copy of this module (the workflow builder loads its own).
    name = next(f"magipack_stubbed_{i}" for i in itertools.count() if f"magipack_stubbed_{i}" not in sys.modules)
    saved = {module: sys.modules.get(module) for module in fakes}
    sys.modules.update(fakes)
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    try:
        spec.loader.exec_module(pack)
        yield importlib.import_module(f"{name}.nodes").NODES
    finally:
        for module, value in saved.items():
            if value is None:
                sys.modules.pop(module, None)
            else:
                sys.modules[module] = value
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def node_schemas():
    """``{node id: schema}`` of every node of the pack, as the stand-ins record them."""
    with pack_nodes() as nodes:
        return {node.GET_SCHEMA().node_id: node.GET_SCHEMA() for node in nodes}


@contextmanager
def pack_namespace():
    """``pack_nodes`` as one namespace: the node classes by id, and their modules by file name
    (``pack.modules["sampler"]``)."""
    with pack_nodes() as nodes:
        classes = {node.GET_SCHEMA().node_id: node for node in nodes}
        package = nodes[0].__module__.rsplit(".", 1)[0]
        modules = {name.rsplit(".", 1)[1]: module for name, module in list(sys.modules.items())
                   if name.startswith(package + ".")}
        yield types.SimpleNamespace(modules=modules, **classes)
