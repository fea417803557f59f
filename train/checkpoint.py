"""Resume checkpoints of a training run: everything needed to continue exactly as if it had never stopped
(the modules' tensors, the optimizer's moments, the random generators' states, the step, and small
numbers the loop keeps), in one safetensors file written atomically. Nothing is pickled."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FILENAME = "resume.safetensors"


def save(folder, *, step, modules, optimizer, generator, extra=None):
    """Write ``folder/resume.safetensors``; ``modules`` maps names to ``nn.Module``s, ``extra`` holds JSON
    values (the loop's running numbers)."""
    tensors = {f"module.{name}.{key}": value.detach().clone().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    state = optimizer.state_dict()
    for index, moments in state["state"].items():
        for key, value in moments.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).clone().contiguous()
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {"step": str(step), "param_groups": json.dumps(state["param_groups"]),
                "extra": json.dumps(extra or {})}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FILENAME)
    save_file(tensors, path + ".partial", metadata=metadata)
    os.replace(path + ".partial", path)  # a run killed while writing keeps the previous checkpoint
    return path


def load(folder, *, modules, optimizer, generator):
    """Restore what ``save`` wrote into the given objects; returns ``(step, extra)``, or None when the
    folder holds no checkpoint."""
    path = os.path.join(folder, FILENAME)
    if not os.path.isfile(path):
        return None
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    for name, module in modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    moments = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": json.loads(metadata["param_groups"])})
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(metadata["step"]), json.loads(metadata["extra"])
