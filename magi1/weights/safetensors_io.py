"""Reading safetensors checkpoints, shared by the DiT and VAE loaders: headers without the tensors,
tensors one file at a time, and the checks that name what is wrong with a file (never a pickle)."""

from __future__ import annotations

import os

from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path):
    """A clear error for a pickle-based weights file: only safetensors are read."""
    if os.fspath(path).endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{os.path.basename(path)} is a pickle-based file; only .safetensors checkpoints are loaded "
                         "(the official MAGI-1 weights are published as safetensors)")


def read_header(file):
    """``(shapes, dtypes, metadata)`` of a safetensors file, without reading its tensors; a clear error
    for a file that is not one (an interrupted download, say)."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            slices = {key: f.get_slice(key) for key in f.keys()}
            return ({k: tuple(v.get_shape()) for k, v in slices.items()}, {k: v.get_dtype() for k, v in slices.items()},
                    metadata)
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable .safetensors file ({error}); the download is probably incomplete "
                         "or damaged: download it again") from error


def read_tensors(file, device, dtype_of, convert=None, skip=()):
    """Every tensor of ``file`` on ``device``, each in ``dtype_of(key)``; or, with ``convert(key, tensor)
    -> {key: tensor}``, what it makes of each (one tensor at a time); keys in ``skip`` are not read."""
    tensors = {}
    with safe_open(file, framework="pt", device="cpu") as f:
        for key in f.keys():
            if key in skip:
                continue
            tensor = f.get_tensor(key)
            parts = convert(key, tensor) if convert is not None else {key: tensor.to(dtype_of(key))}
            tensors.update({k: v.to(device) for k, v in parts.items()})
    return tensors


def check_state_dict(model, shapes, what="MAGI-1 DiT"):
    """Raise a clear error unless ``shapes`` (key -> shape) are exactly the model's tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != tuple(shapes[k]))
    if missing or unexpected or wrong:
        lines = [f"the checkpoint is not a {what} of the inferred architecture:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys, first: {missing[:5]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, first: {unexpected[:5]}")
        if wrong:
            lines.append("  wrong shapes: " + ", ".join(f"{k} {tuple(shapes[k])} (expected {expected[k]})"
                                                         for k in wrong[:5]))
        raise ValueError("\n".join(lines))


# What a safetensors file holds, told by its tensor names, so that a file given to the wrong loader is named.
KNOWN_KINDS = (
    ("videodit_blocks.", "a MAGI-1 DiT: load it as the DiT (MAGI-1 DiT Loader, models/diffusion_models)"),
    ("decoder.last_layer.", "a MAGI-1 VAE: load it as the VAE (MAGI-1 VAE Loader, models/vae)"),
    ("encoder.block.", "a T5 text encoder: load it as the text encoder (CLIPLoader, type mochi, models/text_encoders)"),
    ("model.diffusion_model.", "a ComfyUI checkpoint of another model, not MAGI-1"),
)


def file_kind(names):
    """What a file with these tensor names is (a phrase naming where it belongs), or None if unknown."""
    for prefix, kind in KNOWN_KINDS:
        if any(name.startswith(prefix) for name in names):
            return kind
    return None
