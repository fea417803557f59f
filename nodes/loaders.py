"""MAGI1DiTLoader and MAGI1VAELoader: the official checkpoints from ComfyUI's model folders."""

import logging
import os

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths

from ..magi1 import SpecialTokens, find_special_tokens, load_dit, load_vae
from ..magi1 import builtin
from ..magi1.weights.loader import checkpoint_entries, same_path
from .memory_check import weights_line
from .queue_checks import CheckedNode

TINY_CHOICE = "MAGI-1 tiny demo (built-in)"  # the demo model shipped in magi1/builtin/weights
BENCHMARK_CHOICE = "MAGI-1 benchmark model (built-in, 128x128)"  # magi1/builtin/benchmark_model
BUILTIN = {TINY_CHOICE: builtin.TINY, BENCHMARK_CHOICE: builtin.BENCHMARK_MODEL}
MAGI1_VAE = io.Custom("MAGI1_VAE")  # a magi1.MagiVAE
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP8_CHOICES = ("fp8_e4m3fn", "fp8_e4m3fn_scaled")  # DiT weights stored in float8, computed in bfloat16
ATTENTION = ("auto", "sdpa", "flash")


class MagiModel(torch.nn.Module):
    """What a MAGI-1 MODEL's ModelPatcher holds (ComfyUI keeps its bookkeeping, such as ``device``, on this
    module): the DiT as ``diffusion_model``, as in ComfyUI's own models."""

    def __init__(self, dit, special_tokens, source=None):
        super().__init__()
        self.diffusion_model = dit
        self.special_tokens = special_tokens  # magi1.SpecialTokens: the sampler's only source of the table
        # Where the DiT came from and how it was loaded (builtin, path, dtype, weights, distill, attention), so
        # that worker processes can load it themselves (MAGI-1 Multi-GPU).
        self.source = source


def checkpoint_choices(folder):
    """The built-in models, then the checkpoints of a model folder: single .safetensors files, and each
    sharded checkpoint once, by its index file (``magi1.weights.loader.checkpoint_entries``)."""
    return list(BUILTIN) + folder_checkpoints(folder)[0]


def folder_checkpoints(folder):
    """``(entries, set_of)`` of a ComfyUI model folder (``checkpoint_entries``): ComfyUI lists only files
    with model extensions, so the index files are found beside the shards it lists."""
    def folder_of(name):
        return os.path.dirname(folder_paths.get_full_path(folder, name) or "")

    return checkpoint_entries(folder_paths.get_filename_list(folder), folder_of)


def file_hint(input_name, folder, what):
    """A ``CheckedNode.choice_hint`` for a file dropdown: for ``input_name``, where a file the model
    ``folder`` does not list comes from (``missing_file_hint``)."""
    def choice_hint(cls, name, value):
        if name != input_name:
            return None
        return missing_file_hint(value, folder_checkpoints(folder)[0], folder, what)

    return classmethod(choice_hint)


def missing_file_hint(value, entries, folder, what):
    """Where a file a dropdown does not list comes from: a listed entry with the same ending (a folder
    placed one level higher or lower), else what to download and where it goes."""
    wanted = same_path(str(value)).lstrip("/")
    for entry in entries:
        listed = same_path(entry)
        if listed.endswith("/" + wanted) or wanted.endswith("/" + listed):
            return f"the folder lists it as {entry!r}: pick that"
    return (f"It is not in ComfyUI/models/{folder}: {what}, then refresh the page (press R) so that the "
            "list shows it")


def special_tokens_table():
    """MAGI-1's special-token table from models/text_encoders (or models/diffusion_models), as
    special_tokens.npz or magi1_special_tokens.npz; an error saying where to get it and put it otherwise."""
    return SpecialTokens.load(find_special_tokens(model_folders("text_encoders") + model_folders("diffusion_models")))


def model_folders(kind):
    """ComfyUI's folders for a kind of model, without any inside its output or temp folders (a place to put
    a downloaded file, never where results go)."""
    outputs = [os.path.realpath(getter()) for getter in (folder_paths.get_output_directory,
                                                          folder_paths.get_temp_directory)]

    def inside(folder, root):
        try:
            return os.path.commonpath([os.path.realpath(folder), root]) == root
        except ValueError:  # on different Windows drives
            return False

    return [f for f in folder_paths.get_folder_paths(kind) if not any(inside(f, root) for root in outputs)]


def compute_dtype(choice, device):
    """The release's dtype (bfloat16) on a GPU, float32 on the CPU, unless the user picked one."""
    if DTYPES[choice] is not None:
        return DTYPES[choice]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class MAGI1DiTLoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1DiTLoader",
            display_name="MAGI-1 DiT Loader",
            category="MAGI-1",
            description=("Loads an official MAGI-1 DiT (4.5B or 24B, base or distill) from models/diffusion_models: "
                         "a .safetensors file, or any shard or the index of a sharded checkpoint; with it MAGI-1's "
                         "special_tokens.npz from models/text_encoders."),
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_choices("diffusion_models"), tooltip=(
                    "The DiT weights, e.g. 4.5B_distill/inference_weight.distill/model.safetensors.index.json "
                    "(a sharded checkpoint is listed once, by its index file; the size is read from the "
                    "tensors), or a built-in model: the tiny demo (CPU, 64x64 videos) or "
                    "the benchmark model (CPU, 128x128 scenes); pair them with MAGI-1 Tiny Text Encode (same "
                    "model) and the built-in VAE.")),
                io.Combo.Input("variant", options=["auto", "base", "distill"], default="auto", tooltip=(
                    "Base and distill checkpoints hold the same tensors. auto: distill when the path says "
                    "'distill'. Distilled models sample with 1 guidance pass and few steps, base ones with 3.")),
                io.Combo.Input("weight_dtype", options=list(DTYPES) + list(FP8_CHOICES), default="auto", tooltip=(
                    "auto: as the file stores them: bfloat16 on a GPU (as released; float32 on the CPU), or the "
                    "file's float8 kind (official *_distill_quant or other fp8 .safetensors files are recognised). "
                    "fp8_e4m3fn: the layers' weights stored in float8 at load (half the memory of bfloat16, "
                    "slightly different numbers); _scaled keeps one scale per weight (more accurate). float32 "
                    "doubles the memory.")),
                io.Combo.Input("attention", options=list(ATTENTION), default="auto", tooltip=(
                    "auto: flash-attn on CUDA when installed, else PyTorch SDPA. Both give the same result.")),
            ],
            outputs=[io.Model.Output(tooltip=(
                "The MAGI-1 model and its special-token table, managed by ComfyUI's memory manager."))],
        )

    @classmethod
    def still_accepted(cls, name, value):
        # A shard of a sharded checkpoint, chosen before the dropdown listed each checkpoint once, still loads
        # (the whole checkpoint: magi1.weights.loader finds its siblings); so does a name saved with the other
        # system's separators (workflows name 4.5B_distill/... ; ComfyUI on Windows lists 4.5B_distill\...).
        if name != "checkpoint" or not isinstance(value, str):
            return False
        entries, set_of = folder_checkpoints("diffusion_models")
        return same_path(value) in {same_path(known) for known in [*entries, *set_of]}

    choice_hint = file_hint("checkpoint", "diffusion_models", (
        "the MAGI-1 DiT: download its folder (e.g. ckpt/magi/4.5B_distill) from https://huggingface.co/sand-ai/MAGI-1 "
        "into ComfyUI/models/diffusion_models/"))

    @classmethod
    def execute(cls, checkpoint, variant, weight_dtype, attention) -> io.NodeOutput:
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        distill = None if variant == "auto" else variant == "distill"
        if checkpoint in BUILTIN:
            builtin = BUILTIN[checkpoint]
            path, distill, tokens = builtin.dit_file, True, builtin.special_tokens()
        else:
            # The table is not in the weights; found here, once, and before the slow load, so that a
            # missing file is reported at once with where to get it.
            tokens = special_tokens_table()
            path = folder_paths.get_full_path_or_raise("diffusion_models", checkpoint)
        weights = weight_dtype if weight_dtype in FP8_CHOICES else "auto"
        dtype = compute_dtype("auto" if weights != "auto" else weight_dtype, load_device)
        # ComfyUI's operations: its memory manager can keep layers in host memory (partial loading) and cast them.
        model = load_dit(path, device=offload_device, dtype=dtype, distill=distill, weights=weights,
                         operations=comfy.ops.manual_cast)
        model.configure(attention_backend=attention)
        logging.info("%s", weights_line(model, load_device))
        source = dict(builtin=BUILTIN[checkpoint].name if checkpoint in BUILTIN else None, path=os.path.abspath(path),
                      dtype=str(dtype).removeprefix("torch."), weights=weights, distill=distill, attention=attention)
        return io.NodeOutput(comfy.model_patcher.ModelPatcher(MagiModel(model, tokens, source), load_device=load_device,
                                                              offload_device=offload_device))


class MAGI1VAELoader(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1VAELoader",
            display_name="MAGI-1 VAE Loader",
            category="MAGI-1",
            description="Loads the official MAGI-1 VAE (ckpt/vae/diffusion_pytorch_model.safetensors) from models/vae.",
            inputs=[
                io.Combo.Input("vae_name", options=checkpoint_choices("vae"), tooltip=(
                    "The MAGI-1 VAE weights (any file name; a config.json beside them is read if present), or "
                    "the built-in models' VAE (both built-in models share it).")),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto", tooltip=(
                    "auto: bfloat16 on a GPU (as released), float32 on the CPU.")),
            ],
            outputs=[MAGI1_VAE.Output(tooltip="The MAGI-1 VAE, for MAGI-1 Decode and MAGI-1 Encode Prefix.")],
        )

    choice_hint = file_hint("vae_name", "vae", (
        "the MAGI-1 VAE: download ckpt/vae/diffusion_pytorch_model.safetensors from https://huggingface.co/sand-ai/MAGI-1 "
        "into ComfyUI/models/vae/ (any name)"))

    @classmethod
    def execute(cls, vae_name, weight_dtype) -> io.NodeOutput:
        device = mm.vae_device()
        if vae_name in BUILTIN:
            path = BUILTIN[vae_name].vae_file
        else:
            path = folder_paths.get_full_path_or_raise("vae", vae_name)
        vae = load_vae(path, device=device, dtype=compute_dtype(weight_dtype, device))
        return io.NodeOutput(vae)
