"""MAGI1MultiGPU: run MAGI-1 Sampler on several GPUs of this machine, in worker processes the pack starts
and stops (``magi1.distributed.workers``); and the sampler's side of such a run (``sample_on_workers``)."""

import logging
import os
import shutil
import tempfile

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import folder_paths

from ..magi1.distributed.workers import read_progress, read_result, run_workers, write_job
from .queue_checks import CheckedNode

# Where the option travels inside the patched MODEL; MAGI-1 Sampler reads it from here.
MULTI_GPU_KEY = "magi1_multi_gpu"
GPU_RANGE = (2, 8)
CFG_CHOICES = (1, 2, 3)


def parse_devices(text):
    """CUDA device indices from ``"0,1"`` (spaces allowed); None for an empty text."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"devices must be CUDA device numbers separated by commas, e.g. 0,1; got {text!r}") from None
    if any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise ValueError(f"devices must be different CUDA device numbers, 0 or more; got {text!r}")
    return devices


def device_problems(gpus, cfg_parallel, devices):
    """``{input: message}``: what execution would refuse in the values (None for a linked input)."""
    if gpus is not None and not GPU_RANGE[0] <= gpus <= GPU_RANGE[1]:
        return {"gpus": f"MAGI-1 Multi-GPU: gpus must be between {GPU_RANGE[0]} and {GPU_RANGE[1]}, got {gpus}"}
    if cfg_parallel is not None and cfg_parallel not in CFG_CHOICES:
        return {"cfg_parallel": f"MAGI-1 Multi-GPU: cfg_parallel must be 1, 2 or 3, got {cfg_parallel}"}
    if gpus is not None and cfg_parallel is not None and gpus % cfg_parallel:
        return {"gpus": f"MAGI-1 Multi-GPU: gpus ({gpus}) must be a multiple of cfg_parallel ({cfg_parallel}): set "
                        f"gpus to {max(cfg_parallel, gpus - gpus % cfg_parallel)} or cfg_parallel to 1"}
    try:
        listed = parse_devices(devices) if devices is not None else None
    except ValueError as error:
        return {"devices": f"MAGI-1 Multi-GPU: {error}"}
    if listed is not None and gpus is not None and len(listed) != gpus:
        return {"devices": f"MAGI-1 Multi-GPU: devices lists {len(listed)} GPUs ({devices}) but gpus is {gpus}: list "
                           f"{gpus} devices, or leave devices empty for the first ones"}
    return {}


def checked_devices(gpus, devices, cuda_count):
    """The CUDA devices of the run (None: the first ``gpus``; also on a machine without CUDA, where the workers
    compute on the CPU), or an error naming the fix."""
    if cuda_count == 0:
        if devices is not None:
            raise ValueError(f"MAGI-1 Multi-GPU: devices lists CUDA devices {devices} but this machine has no CUDA "
                             "GPU: leave devices empty")
        logging.warning("MAGI-1 Multi-GPU: no CUDA GPU here; the %d workers run on the CPU (gloo), which is only "
                        "useful for testing", gpus)
        return None
    if not torch.distributed.is_available() or not torch.distributed.is_nccl_available():
        raise ValueError("MAGI-1 Multi-GPU needs PyTorch with NCCL for several GPUs (Linux builds have it; Windows "
                         "builds do not): run MAGI-1 Sampler without this node, or ComfyUI under Linux or WSL")
    if devices is None and gpus > cuda_count:
        raise ValueError(f"MAGI-1 Multi-GPU: gpus is {gpus} but this machine has {cuda_count} CUDA devices: set gpus "
                         f"to {cuda_count} or fewer")
    missing = [d for d in devices or () if d >= cuda_count]
    if missing:
        raise ValueError(f"MAGI-1 Multi-GPU: devices {missing} do not exist: this machine has CUDA devices 0 to "
                         f"{cuda_count - 1}")
    return devices


def checked_model(model, processes_per_group, cfg_parallel):
    """The MAGI-1 model's own limits: loaded by MAGI-1 DiT Loader (which records its source), guidance groups
    only for base models, at most one process per attention head in a group."""
    dit = getattr(model.model, "diffusion_model", None)
    if not hasattr(dit, "y_embedder") or getattr(model.model, "source", None) is None:
        raise ValueError("MAGI-1 Multi-GPU needs a model from MAGI-1 DiT Loader (the workers load it themselves)")
    if getattr(model, "patches", None):  # ComfyUI weight patches (e.g. a LoRA) live in this process only
        raise ValueError("MAGI-1 Multi-GPU: this model carries weight patches (e.g. a LoRA), which the workers would "
                         "not see (they load the checkpoint themselves): remove them or run on one GPU")
    if cfg_parallel > 1 and dit.distill:
        raise ValueError(f"MAGI-1 Multi-GPU: cfg_parallel {cfg_parallel} splits the 3 guidance passes of base "
                         "models; this model is distilled (1 pass): set cfg_parallel to 1")
    heads = dit.config.num_attention_heads
    if processes_per_group > heads:
        raise ValueError(f"MAGI-1 Multi-GPU: {processes_per_group} GPUs per guidance group, but this model has "
                         f"{heads} attention heads to split: use at most {heads * cfg_parallel} gpus")


class MAGI1MultiGPU(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1MultiGPU",
            display_name="MAGI-1 Multi-GPU",
            category="MAGI-1",
            description=("Runs MAGI-1 Sampler on several GPUs of this machine: the sampler starts one worker process "
                         "per GPU, each loads its share of the model, and stops them when done or interrupted. "
                         "Returns a copy of the model; the input model is not changed."),
            inputs=[
                io.Model.Input("model", tooltip="A MAGI-1 model from MAGI-1 DiT Loader (optionally through the cache)."),
                io.Int.Input("gpus", default=2, min=GPU_RANGE[0], max=GPU_RANGE[1], tooltip=(
                    "How many GPUs (one worker process each) share the run; a multiple of cfg_parallel. Each "
                    "GPU holds about 1 / (gpus / cfg_parallel) of the transformer layers and of the KV caches.")),
                io.Int.Input("cfg_parallel", default=1, min=1, max=3, tooltip=(
                    "Base models only: their 3 guidance passes on 1, 2 or 3 groups of GPUs (gpus / cfg_parallel "
                    "each). 1: every GPU works on every pass (context parallel only); distilled models need 1.")),
                io.String.Input("devices", default="", optional=True, tooltip=(
                    "Optional CUDA device numbers, e.g. 0,1 (as many as gpus). Empty: the first gpus devices. "
                    "Without CUDA the workers run on the CPU, only useful for testing.")),
                io.Boolean.Input("split_weights", default=True, optional=True, tooltip=(
                    "On: each GPU keeps 1 / (gpus / cfg_parallel) of the transformer layers and sends each to the "
                    "others as it runs (for models too large for one GPU). Off: every GPU keeps the whole model "
                    "and no weights travel, faster when it fits each GPU (above all without NVLink).")),
            ],
            outputs=[io.Model.Output(tooltip="A copy of the model that MAGI-1 Sampler runs on several GPUs.")],
        )

    @classmethod
    def input_rules(cls, values):
        return device_problems(values.get("gpus"), values.get("cfg_parallel"), values.get("devices"))

    @classmethod
    def execute(cls, model, gpus, cfg_parallel, devices="", split_weights=True) -> io.NodeOutput:
        problems = device_problems(gpus, cfg_parallel, devices)
        if problems:
            raise ValueError(next(iter(problems.values())))
        checked_model(model, gpus // cfg_parallel, cfg_parallel)
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        listed = checked_devices(gpus, parse_devices(devices), cuda_count)
        patched = model.clone()
        options = patched.model_options.setdefault("transformer_options", {})
        options[MULTI_GPU_KEY] = {"workers": gpus, "cfg_parallel": cfg_parallel, "devices": listed,
                                  "split_weights": bool(split_weights)}
        return io.NodeOutput(patched)


def job_of(model, request, cfg_parallel, split_weights=True):
    """The worker's job (``programs.worker``): the model's source and the request in its written format
    (``VideoRequest.to_dict``, the policy included); the request's tensors travel apart."""
    source = getattr(model.model, "source", None)
    if source is None:
        raise ValueError("MAGI-1 Sampler on several GPUs needs a model from MAGI-1 DiT Loader (the workers load it "
                         "themselves from where it came from)")
    return {"model": dict(source), "request": request.to_dict(), "cfg_parallel": cfg_parallel,
            "split_weights": bool(split_weights)}


def sample_on_workers(model, option, request, progress):
    """Run the generation ``request`` (a ``VideoRequest``) describes on the workers ``option`` describes;
    ``(tensors, summary)`` as rank 0 wrote them.

    The job lives in a fresh folder under ComfyUI's temp directory, removed afterwards. ComfyUI's interrupt is
    checked while the workers run, and stops (and frees) them all.
    """
    # The workers need the GPUs: the main process keeps nothing there (it computes nothing in this run).
    mm.unload_all_models()
    temp = folder_paths.get_temp_directory()
    os.makedirs(temp, exist_ok=True)
    job_dir = tempfile.mkdtemp(prefix="magi1_workers_", dir=temp)

    def poll():
        mm.throw_exception_if_processing_interrupted()
        done = read_progress(job_dir)
        if done is not None:
            progress.update_absolute(*done)

    try:
        job = job_of(model, request, option["cfg_parallel"], option.get("split_weights", True))
        write_job(job_dir, job, request.tensors())
        run_workers(job_dir, option["workers"], devices=option["devices"], stop=poll)
        return read_result(job_dir)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
