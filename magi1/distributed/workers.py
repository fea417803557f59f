"""Worker processes for one generation on several devices: start them, watch them, stop them.

``run_workers`` starts ``world_size`` plain subprocesses of the worker program (``python -m programs.worker
JOB_DIR``, run from the pack's folder) with torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), so that ``magi1.distributed.parallel.Parallel.from_environment`` joins them into one
run. Plain subprocesses, not ``torch.multiprocessing`` spawn: spawning a function re-imports the parent's
main module in the child, which inside ComfyUI is ComfyUI itself.

A job is a folder: ``job.json`` (what to load and run, see ``write_job``) and ``inputs.safetensors`` (the
tensors ``magi1.generate`` takes); rank 0 writes ``result.safetensors`` and ``progress.json`` there, and every
worker its log, ``worker-<rank>.log``. Only JSON and safetensors cross, never pickles. No ComfyUI here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the folder holding magi1/
JOB_FILE, INPUTS_FILE = "job.json", "inputs.safetensors"
RESULT_FILE, PROGRESS_FILE = "result.safetensors", "progress.json"
JOB_FORMAT = 2  # 2: the request in VideoRequest's own format (1: generate's keywords and the policy's fields)
INPUT_NAMES = ("caption", "caption_mask", "negative_caption", "negative_mask", "prefix")  # VideoRequest's tensors
STOP_GRACE_S = 5.0  # how long a terminated worker may take to exit before it is killed
LOG_TAIL_CHARS = 3000
PARENT_ENV = "MAGI1_WORKERS_PARENT"  # the pid of the process that started the workers: they end without it


def log_path(job_dir, rank):
    return os.path.join(job_dir, f"worker-{rank}.log")


def write_job(job_dir, job, inputs):
    """Write a job: ``job`` as ``job.json`` and the tensors of ``inputs`` (``INPUT_NAMES``; None ones are left
    out) as ``inputs.safetensors``. ``job``: ``{"model": {...}, "request": VideoRequest.to_dict(), "cfg_parallel":
    int, "split_weights": bool}`` (read by ``programs.worker``; the request's own format has its own version)."""
    unknown = set(inputs) - set(INPUT_NAMES)
    if unknown:
        raise ValueError(f"unknown job inputs {sorted(unknown)}; expected some of {INPUT_NAMES}")
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in inputs.items() if value is not None}
    save_file(tensors, os.path.join(job_dir, INPUTS_FILE))
    with open(os.path.join(job_dir, JOB_FILE), "w") as f:
        json.dump({"format": JOB_FORMAT, **job}, f, indent=1)


def read_job(job_dir):
    """``(job, inputs)`` as ``write_job`` wrote them."""
    with open(os.path.join(job_dir, JOB_FILE)) as f:
        job = json.load(f)
    if job.get("format") != JOB_FORMAT:
        raise ValueError(f"{JOB_FILE} has format {job.get('format')!r}; this worker reads format {JOB_FORMAT}: the job "
                         "was written by another version of the pack; restart ComfyUI after updating it")
    return job, load_file(os.path.join(job_dir, INPUTS_FILE))


def read_result(job_dir):
    """``(tensors, summary)`` of a finished job: ``tensors["latent"]`` (and ``"masks"`` when recorded)."""
    path = os.path.join(job_dir, RESULT_FILE)
    if not os.path.exists(path):
        raise RuntimeError(f"the MAGI-1 workers finished without writing {path}")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        summary = (f.metadata() or {}).get("summary", "")
    return load_file(path), summary


def write_progress(job_dir, step, total):
    """Rank 0's progress, replaced whole so that a reader never sees half a file."""
    partial = os.path.join(job_dir, PROGRESS_FILE + ".partial")
    with open(partial, "w") as f:
        json.dump({"step": int(step), "total": int(total)}, f)
    os.replace(partial, os.path.join(job_dir, PROGRESS_FILE))


def read_progress(job_dir):
    """``(step, total)`` of the last finished step, or None before the first."""
    try:
        with open(os.path.join(job_dir, PROGRESS_FILE)) as f:
            data = json.load(f)
        return int(data["step"]), int(data["total"])
    except (OSError, ValueError, KeyError):
        return None


def free_port():
    """A TCP port free on this machine now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_devices(devices, environ=None):
    """``CUDA_VISIBLE_DEVICES`` for workers that should use the CUDA devices ``devices`` (indices as this
    process numbers them, i.e. through its own ``CUDA_VISIBLE_DEVICES`` if set); None leaves it as it is."""
    if devices is None:
        return None
    environ = os.environ if environ is None else environ
    inherited = environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None or not inherited.strip():
        return ",".join(str(int(d)) for d in devices)
    names = [name.strip() for name in inherited.split(",") if name.strip()]
    outside = [d for d in devices if not 0 <= int(d) < len(names)]
    if outside:
        raise ValueError(f"CUDA devices {outside} are not among the {len(names)} this process sees "
                         f"(CUDA_VISIBLE_DEVICES={inherited})")
    return ",".join(names[int(d)] for d in devices)


def worker_environment(rank, world_size, port, devices=None, environ=None):
    """torchrun's variables for worker ``rank``. Every worker sees the same devices (``devices`` in that
    order, else whatever this process sees) and ``LOCAL_RANK = rank``, so that worker ``r`` computes on
    ``cuda:r``: the ``r``-th listed device, or the ``r``-th visible one. Several workers share the cores
    (``OMP_NUM_THREADS``, unless set)."""
    env = dict(os.environ if environ is None else environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    env[PARENT_ENV] = str(os.getpid())
    visible = visible_devices(devices, env)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if world_size > 1 and "OMP_NUM_THREADS" not in env:
        # As torchrun does: workers that each use every core slow each other down (10x on 2 CPU workers).
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count() // world_size))
    return env


def cpu_count():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_workers(job_dir, world_size, *, devices=None, stop=None, poll=0.1, python=sys.executable):
    """Run the job in ``job_dir`` on ``world_size`` worker processes and wait for them.

    ``devices``: CUDA device indices, one per worker (None: the first ``world_size`` this process sees;
    without CUDA the workers compute on the CPU over gloo). ``stop`` is called every ``poll`` seconds and
    interrupts by raising (ComfyUI's interrupt check). On that exception, on KeyboardInterrupt, or when a
    worker fails, every worker is terminated (killed after ``STOP_GRACE_S``) and waited for, so that none is
    left and their memory is free; then the exception is re-raised, or a RuntimeError naming the failed rank
    with the end of its log. Returns when every worker has exited cleanly.
    """
    world_size = int(world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if devices is not None and len(devices) != world_size:
        raise ValueError(f"{len(devices)} devices listed for {world_size} workers: list one per worker")
    port, workers, logs = free_port(), [], []
    try:
        for rank in range(world_size):
            logs.append(open(log_path(job_dir, rank), "wb"))
            workers.append(subprocess.Popen(
                [python, "-m", "programs.worker", os.path.abspath(job_dir)], cwd=PACK_ROOT,
                env=worker_environment(rank, world_size, port, devices), stdin=subprocess.DEVNULL,
                stdout=logs[-1], stderr=subprocess.STDOUT))
        _wait(workers, job_dir, stop, poll)
    finally:  # a no-op when every worker exited; else stop them all, whatever raised
        stop_workers(workers)
        for log in logs:
            log.close()


def _wait(workers, job_dir, stop, poll):
    """Until every worker exited cleanly; a RuntimeError as soon as one fails."""
    while True:
        codes = [worker.poll() for worker in workers]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            raise RuntimeError(failure_message(job_dir, failed, codes))
        if all(code == 0 for code in codes):
            return
        if stop is not None:
            stop()
        time.sleep(poll)


def failure_message(job_dir, failed, codes):
    """The first failed rank, its exit code and the end of its log (the others' failures are often only the
    lost connection to it)."""
    rank = failed[0]
    others = f" (ranks {failed[1:]} failed too)" if len(failed) > 1 else ""
    return (f"MAGI-1 worker rank {rank} of {len(codes)} failed with exit code {codes[rank]}{others}; the end of "
            f"its log:\n{log_tail(job_dir, rank)}")


def log_tail(job_dir, rank, chars=LOG_TAIL_CHARS):
    try:
        with open(log_path(job_dir, rank), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError as error:
        return f"(no log: {error})"


def stop_workers(workers, grace=STOP_GRACE_S):
    """Terminate every worker still running, kill those still there after ``grace`` seconds, and wait for
    all (no zombie left)."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + grace
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def save_result(job_dir, tensors, summary):
    """Rank 0's result: ``tensors`` (``latent``, optionally ``masks``) with the report's ``summary``."""
    partial = os.path.join(job_dir, RESULT_FILE + ".partial")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, partial,
              metadata={"summary": summary})
    os.replace(partial, os.path.join(job_dir, RESULT_FILE))
