"""The worker program of a multi-process generation: ``python -m programs.worker JOB_DIR``, run from the pack's
folder by ``magi1.distributed.workers.run_workers`` with torchrun's environment (or by torchrun itself).

It reads the job (``job.json`` and ``inputs.safetensors``, see ``magi1.distributed.workers``), joins the run
(``Parallel.from_environment``; a single worker runs alone), loads the DiT itself with its share of the
weights on its own device, reads the request (``VideoRequest.from_dict``, the cache policy included), runs
``magi1.generate``, and rank 0 writes the result and its progress. A program, not a module of the library: neither ComfyUI nor ``magi1/__init__.py`` imports
it, and it is the one place where ``magi1`` meets ``cache_core`` outside the nodes (it imports
``cache_core`` absolutely: run from the pack's folder, both are top-level packages there).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch

from cache_core import CachePolicy
from magi1 import VideoRequest, generate, load_dit
from magi1.distributed.parallel import Parallel, default_device
from magi1.distributed.workers import PARENT_ENV, read_job, save_result, write_progress
from magi1.builtin import MODELS

PARENT_POLL_S = 1.0


def exit_with_parent():
    """End this worker when the process that started it is gone (killed without stopping its workers):
    a worker must never outlive the run it belongs to and keep its GPU memory."""
    parent = os.getppid()
    named = os.environ.get(PARENT_ENV)  # run_workers' pid: also catches a parent gone while this one started
    named = int(named) if named and os.name == "posix" else None  # os.kill(pid, 0) ends a process on Windows

    def parent_gone():
        if os.getppid() != parent:  # adopted: the parent exited
            return True
        try:
            if named is not None:
                os.kill(named, 0)  # signal 0: only asks whether it exists
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by someone else
            return False
        return False

    def watch():
        while not parent_gone():
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="magi1-parent-watch", daemon=True).start()


def load_model(source, device, parallel):
    """The DiT the job's ``model`` describes, on ``device`` (this rank's share of it under ``parallel``):
    ``builtin`` (a ``magi1.builtin`` model's name) or ``path`` (a checkpoint), in ``dtype`` with ``weights``
    and ``distill`` as MAGI-1 DiT Loader passed them, with its ``attention`` backend."""
    path = MODELS[source["builtin"]].dit_file if source.get("builtin") else source["path"]
    dtype = getattr(torch, source["dtype"]) if source.get("dtype") else None
    model = load_dit(path, device=device, dtype=dtype, distill=source.get("distill"),
                     weights=source.get("weights", "auto"), parallel=parallel)
    model.configure(attention_backend=source.get("attention", "auto"))
    return model


def read_request(job_dir):
    """``(job, VideoRequest)`` of the job in ``job_dir``: a job or request of a format this version does not
    read is refused here, before any process joins the run."""
    job, inputs = read_job(job_dir)
    return job, VideoRequest.from_dict(job["request"], inputs, policy_from_dict=CachePolicy.from_dict)


def run(job_dir, job, request, parallel, device):
    """Load, generate, and (rank 0) write the result."""
    main = parallel is None or parallel.is_main
    model = load_model(job["model"], device, parallel)

    def on_step(step):  # for the node's progress bar
        if main:
            write_progress(job_dir, step.step + 1, step.total)

    result = generate(model, request, on_step=on_step, parallel=parallel)
    if main:
        tensors = {"latent": result.latent}
        if request.record_masks and result.stats.masks is not None:
            tensors["masks"] = result.stats.masks.window_frames()
        save_result(job_dir, tensors, result.stats.summary())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m programs.worker JOB_DIR (run from the pack's folder)")
    exit_with_parent()
    job_dir = argv[0]
    job, request = read_request(job_dir)  # before joining the run: cfg_parallel sets its groups
    parallel = Parallel.from_environment(cfg=int(job.get("cfg_parallel", 1)),
                                         shard_weights=bool(job.get("split_weights", True)))
    device = parallel.device if parallel is not None else default_device(int(os.environ.get("LOCAL_RANK", "0")))
    print(f"MAGI-1 worker {parallel or 'alone'} on {device}", flush=True)
    done = False
    try:
        run(job_dir, job, request, parallel, device)
        done = True
    finally:
        if parallel is not None:
            parallel.close(wait=done)


if __name__ == "__main__":
    main()
