"""The sampler's memory check: MAGI-1's memory plan against what ComfyUI's memory manager can make free."""

import logging

import comfy.model_management as mm

from ..magi1 import memory_plan
from ..magi1.weights.loader import model_description
from ..magi1.planning.memory_plan import GB, dtype_name, replan


def weight_kind(dit):
    return dit.weights or dtype_name(dit.dtype)


def plan_run(dit, request, device=None):
    """The memory plan of this run (a ``VideoRequest``), before anything is allocated; ``device``: where it
    runs (the plan's lines say "GPU" there, "memory" on the CPU; None: a GPU)."""
    return memory_plan(dit.config, request, weight_dtype=weight_kind(dit), compute_dtype=dit.dtype,
                       passes=1 if dit.distill else 3, decode=False, device=device)


def available_bytes(device):
    """Free memory on ``device`` plus what ComfyUI can evict (other loaded models, e.g. a loaded T5, and
    this model's own loaded weights, which the plan counts)."""
    free = mm.get_free_memory(device)
    evictable = sum(loaded.model_loaded_memory() for loaded in getattr(mm, "current_loaded_models", [])
                    if getattr(loaded, "device", device) == device)
    return free + evictable


def check_plan(plan, available):
    """``None`` when the run fits whole; a note when it fits only with the weights partly in host memory
    (ComfyUI's partial loading); a ValueError naming the cheapest changes when it does not fit at all."""
    if plan.fits(available):
        return None
    partial = replan(plan, resident_layers=0)  # about ComfyUI's lowvram floor: a layer or two at a time
    if partial.fits(available):
        return (f"the weights do not all fit beside the run ({plan.total_gpu / GB:.1f} GB needed, "
                f"{available / GB:.1f} GB available): ComfyUI keeps part of them in host memory (slower)")
    changes = [worded(saving) for saving in plan.savings(available)]
    raise ValueError(
        f"MAGI-1 Sampler: this run needs {plan.total_gpu / GB:.1f} GB on the GPU ({plan.dit_phase / GB:.1f} GB while "
        f"sampling) but {available / GB:.1f} GB can be made free. Cheapest changes that would fit: "
        + ("; ".join(changes) or "none found: use a larger GPU") + ".\n" + "\n".join(plan.lines()))


def worded(saving):
    """A change of the memory check's ladder in the sampler's terms: ComfyUI's partial loading is how a
    node user gets the plan's block swap (``resident_layers``)."""
    if "resident_layers" in saving.changes:
        return f"partial loading with {saving.changes['resident_layers']} saves {saving.saved / GB:.2f} GB"
    return str(saving)


def checked_plan(patcher, dit, request):
    """The plan, its note, and the memory ComfyUI should keep free for the run beside the weights."""
    device = patcher.load_device
    plan = plan_run(dit, request, device)
    note = None
    if device.type == "cpu":
        check_host_memory(plan, mm.get_free_memory(device))
    else:
        note = check_plan(plan, available_bytes(device))
        if note:
            logging.info("MAGI-1: %s", note)
    return plan, note, plan.dit_phase - plan.weights_on_gpu


def check_host_memory(plan, available):
    """On the CPU the weights are in memory already: what the run adds must fit the free memory."""
    need = plan.dit_phase - plan.weights_on_gpu
    if need > available:
        raise ValueError(
            f"MAGI-1 Sampler: this run needs {need / GB:.1f} GB of memory beside the weights (KV caches, "
            f"activations) but {available / GB:.1f} GB are free: make the video smaller (width x height x frames "
            "sets it) or use a GPU.\n" + "\n".join(plan.lines()))


def weights_line(dit, device):
    """Which model this is and why, and how its weights are held and computed on ``device``, for the reports."""
    return f"MAGI-1 model: {model_description(dit)}; weights: {_weights(dit, device)}"


def _weights(dit, device):
    kind = weight_kind(dit)
    if not kind.startswith("fp8"):
        return kind
    from ..magi1.network.ops import FP8, fp8_arithmetic

    cast = f"each layer's float8 weights cast to {dtype_name(dit.dtype)} as it runs"
    if kind == "fp8_official" and fp8_arithmetic(device):
        how = "float8 matrix products (this GPU has float8 arithmetic)"
    elif device.type == "cpu":
        how = f"{cast} (the CPU has no float8 arithmetic)"
    else:
        fp8_weights = sum(p.numel() for p in dit.parameters() if p.dtype == FP8)
        cast_ms = 3 * fp8_weights / 1e12 * 1e3  # read 1 byte, write 2 per weight per call, at 1 TB/s
        traffic = "under 1 ms" if cast_ms < 1 else f"about {cast_ms:.0f} ms"
        how = (f"{cast}, {traffic} of memory traffic per DiT call at 1 TB/s (an estimate)"
               + ("" if device.type != "cuda" or fp8_arithmetic(device) else
                  "; this GPU has no float8 arithmetic (before Ada/Hopper), so every fp8 kind is cast up "
                  "this way: half the weight memory of bfloat16, the same result up to rounding"))
    return f"{kind}, {how}"
