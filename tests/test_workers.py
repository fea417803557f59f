"""Worker processes (magi1.distributed.workers, magi1.worker) and the MAGI-1 Multi-GPU node, on the CPU with gloo: one
worker gives the in-process latent bit for bit, two give it within 1e-5; an interrupt or a failing worker
leaves no worker process behind; the node puts its option on a clone, and the sampler with it gives the
latent of the normal path."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cache_core import CachePolicy
from comfy_stubs import pack_namespace
from magi1 import VideoRequest, chunk_captions
from run_request import generate
from magi1 import builtin
from magi1.distributed.workers import read_progress, read_result, run_workers, worker_environment, write_job
from pipeline_fixtures import relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = builtin.TINY
REQUEST = dict(frames=24, height=64, width=64, steps=8, seed=3)
SOURCE = dict(builtin="tiny", path=None, dtype="float32", weights="auto", distill=True, attention="auto")


def children(parent=None):
    """The pids of the children of ``parent`` (default: this process), from Linux's /proc (no psutil)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == parent:
                found.add(int(entry))
    return found


def _stat(pid):
    """The fields of /proc/PID/stat after the command name (state first), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


@pytest.fixture
def new_children():
    """This process's children started during the test (other tests may leave some of theirs)."""
    before = children()
    return lambda: children() - before


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def dead(pid):
    """Gone, or a zombie: exited, its memory freed, waiting for whoever adopted it to reap it."""
    fields = _stat(pid)
    return gone(pid) or fields is None or fields[0] == "Z"


@pytest.fixture(scope="module")
def captions():
    dit = MODEL.load_dit()
    states, mask = MODEL.load_text_encoder().encode(MODEL.example_prompt)
    caption, caption_mask = chunk_captions(states, mask, 1, MODEL.special_tokens(),
                                           length=dit.config.caption_max_length)
    return dit, caption, caption_mask


@pytest.fixture(scope="module")
def reference(captions):
    """The in-process latent of the job the worker tests run (with a cache policy, so that it travels too)."""
    dit, caption, caption_mask = captions
    return generate(dit, caption, caption_mask, policy=CachePolicy.slow(), **REQUEST).latent


def tiny_job(job_dir, captions, source=SOURCE, split_weights=True, **changes):
    _, caption, caption_mask = captions
    request = VideoRequest(**{**REQUEST, **changes}, caption=caption, caption_mask=caption_mask,
                           policy=CachePolicy.slow())
    job = dict(model=source, request=request.to_dict(), cfg_parallel=1, split_weights=split_weights)
    write_job(str(job_dir), job, request.tensors())
    return str(job_dir)


# ------------------------------------------------------------------------------------------- run_workers
def test_one_worker_gives_the_in_process_latent_bit_for_bit(tmp_path, captions, reference, new_children):
    job_dir = tiny_job(tmp_path, captions)
    run_workers(job_dir, 1)
    tensors, summary = read_result(job_dir)
    assert torch.equal(tensors["latent"], reference)
    assert summary.startswith("MAGI-1 cache hybrid: computed") and read_progress(job_dir) == (8, 8)
    assert not new_children()


@pytest.mark.parametrize("split_weights", [True, False])
def test_two_workers_give_the_in_process_latent(tmp_path, captions, reference, new_children, split_weights):
    job_dir = tiny_job(tmp_path, captions, split_weights=split_weights)
    run_workers(job_dir, 2)
    latent = read_result(job_dir)[0]["latent"]
    assert latent.shape == reference.shape and relative_error(latent, reference) <= 1e-5
    assert "MAGI-1 worker Parallel(rank 1 of 2" in open(tmp_path / "worker-1.log").read()
    assert not new_children()


class Stop(Exception):
    pass


def test_an_interrupt_stops_every_worker(tmp_path, captions, new_children):
    """ComfyUI's interrupt raises from ``stop`` while the two workers are generating (gloo collectives
    between them): the exception comes through, and no worker is left, not even a zombie."""
    job_dir = tiny_job(tmp_path, captions, frames=240, height=128, width=128, steps=16)  # a long run
    seen = {}

    def stop():
        if read_progress(job_dir) is not None:  # the workers are past loading, inside the run
            seen["pids"] = new_children()
            raise Stop("interrupted")
        if time.monotonic() - start > 120:
            raise AssertionError("the workers made no progress in 120 s")

    start = time.monotonic()
    with pytest.raises(Stop):
        run_workers(job_dir, 2, stop=stop)
    assert len(seen["pids"]) == 2
    assert all(gone(pid) for pid in seen["pids"]) and not new_children()
    assert not os.path.exists(os.path.join(job_dir, "result.safetensors"))


def test_a_failing_worker_names_its_rank_and_error(tmp_path, captions, new_children):
    job_dir = tiny_job(tmp_path, captions, source=dict(SOURCE, builtin=None, path="/nonexistent/magi1.safetensors"))
    with pytest.raises(RuntimeError) as error:
        run_workers(job_dir, 1)
    message = str(error.value)
    assert message.startswith("MAGI-1 worker rank 0 of 1 failed with exit code 1")
    assert "FileNotFoundError: no MAGI-1 checkpoint at /nonexistent/magi1.safetensors" in message
    assert not new_children()


def test_a_worker_that_dies_stops_the_others(tmp_path, captions, new_children):
    """Rank 1 fails at once; rank 0 would wait for it to join the run for half an hour: it is stopped, and
    the error is rank 1's."""
    wrapper = tmp_path / "python"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$RANK" = 1 ]; then echo "rank 1 cannot start: out of memory" >&2; exit 7; fi
        exec {sys.executable} "$@"
        """))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "job").mkdir()
    job_dir = tiny_job(tmp_path / "job", captions)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        run_workers(job_dir, 2, python=str(wrapper))
    assert str(error.value).startswith("MAGI-1 worker rank 1 of 2 failed with exit code 7")
    assert "rank 1 cannot start: out of memory" in str(error.value)
    assert time.monotonic() - started < 30 and not new_children()


def test_workers_end_when_their_parent_is_killed(tmp_path, captions):
    """A ComfyUI killed outright cannot stop its workers: they notice and exit by themselves."""
    job_dir = tiny_job(tmp_path, captions, frames=240, height=128, width=128, steps=16)  # a long run
    script = f"from magi1.distributed.workers import run_workers; run_workers({job_dir!r}, 1)"
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    workers = set()
    try:
        deadline = time.monotonic() + 120
        while read_progress(job_dir) is None:
            assert time.monotonic() < deadline and parent.poll() is None, "the worker made no progress"
            time.sleep(0.1)
        workers = children(parent.pid)
        assert len(workers) == 1
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while not all(dead(pid) for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived its parent"
            time.sleep(0.1)
        assert not os.path.exists(os.path.join(job_dir, "result.safetensors"))  # ended, not finished
    finally:  # whatever failed, leave nothing running
        for pid in [parent.pid] * (parent.poll() is None) + [pid for pid in workers if not dead(pid)]:
            os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_worker_environment_is_torchruns_and_maps_devices():
    env = worker_environment(1, 2, 12345, devices=[3, 1], environ={"PATH": "/bin"})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == dict(
        RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="12345")
    assert env["CUDA_VISIBLE_DEVICES"] == "3,1"  # worker r computes on cuda:r, the r-th listed device
    # indices are this process's: through its own CUDA_VISIBLE_DEVICES
    assert worker_environment(0, 2, 1, devices=[1, 0], environ={"CUDA_VISIBLE_DEVICES": "4,6"})[
        "CUDA_VISIBLE_DEVICES"] == "6,4"
    assert "CUDA_VISIBLE_DEVICES" not in worker_environment(0, 2, 1, environ={})
    assert worker_environment(0, 1, 1, environ={}).get("OMP_NUM_THREADS") is None  # one worker: as this process
    assert worker_environment(0, 2, 1, environ={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match=r"CUDA devices \[2\] are not among the 2"):
        worker_environment(0, 2, 1, devices=[0, 2], environ={"CUDA_VISIBLE_DEVICES": "4,6"})


# ------------------------------------------------------------------------------------------ MAGI-1 Multi-GPU
TINY_CHOICE = "MAGI-1 tiny demo (built-in)"


@pytest.fixture(scope="module")
def pack():
    with pack_namespace() as pack:
        yield pack


@pytest.fixture(scope="module")
def model(pack):
    return pack.MAGI1DiTLoader.execute(checkpoint=TINY_CHOICE, variant="auto", weight_dtype="auto",
                                       attention="auto").result[0]


def multi_gpu(pack, model, gpus=2, cfg_parallel=1, devices=""):
    return pack.MAGI1MultiGPU.execute(model=model, gpus=gpus, cfg_parallel=cfg_parallel, devices=devices).result[0]


def test_the_loader_records_where_the_model_came_from(model):
    assert model.model.source == dict(builtin="tiny", path=os.path.abspath(MODEL.dit_file), dtype="float32",
                                      weights="auto", distill=True, attention="auto")


def test_the_multi_gpu_node_sets_its_option_on_a_clone(pack, model):
    key = pack.modules["multi_gpu"].MULTI_GPU_KEY
    patched = multi_gpu(pack, model, gpus=4)
    assert patched is not model and key not in model.model_options["transformer_options"]
    assert patched.model_options["transformer_options"][key] == {"workers": 4, "cfg_parallel": 1, "devices": None,
                                                                     "split_weights": True}
    assert patched.model is model.model  # the weights are shared, not copied


def test_the_multi_gpu_node_refuses_what_cannot_run_naming_the_fix(pack, model, monkeypatch):
    node = pack.MAGI1MultiGPU
    assert node.validate_inputs(gpus=2, cfg_parallel=1, devices="") is True
    assert node.validate_inputs(gpus=None, cfg_parallel=None) is True  # linked inputs: checked at execution
    assert "set gpus to 3 or cfg_parallel to 1" in node.validate_inputs(gpus=4, cfg_parallel=3, devices="")
    assert "devices lists 3 GPUs (0,1,2) but gpus is 2" in node.validate_inputs(gpus=2, cfg_parallel=1,
                                                                               devices="0,1,2")
    assert "separated by commas" in node.validate_inputs(gpus=2, cfg_parallel=1, devices="0;1")
    assert "different CUDA device numbers" in node.validate_inputs(gpus=2, cfg_parallel=1, devices="1,1")
    assert "between 2 and 8, got 9" in node.validate_inputs(gpus=9, cfg_parallel=1, devices="")
    with pytest.raises(ValueError, match="this model is distilled .*: set cfg_parallel to 1"):
        multi_gpu(pack, model, gpus=2, cfg_parallel=2)
    with pytest.raises(ValueError, match="this model has 4 attention heads to split: use at most 4 gpus"):
        multi_gpu(pack, model, gpus=8)
    patched = model.clone()
    patched.patches = {"videodit_blocks.layers.0.mlp.linear_fc1.weight": ["a LoRA's patch"]}
    with pytest.raises(ValueError, match="carries weight patches .* remove them or run on one GPU"):
        multi_gpu(pack, patched)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU: leave devices empty"):
            multi_gpu(pack, model, devices="0,1")
    multi = pack.modules["multi_gpu"]
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)  # a Windows build of PyTorch
    with pytest.raises(ValueError, match="needs PyTorch with NCCL .* or ComfyUI under Linux or WSL"):
        multi.checked_devices(2, None, 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)  # as on Linux with CUDA
    with pytest.raises(ValueError, match="gpus is 4 but this machine has 2 CUDA devices: set gpus to 2 or fewer"):
        multi.checked_devices(4, None, 2)
    with pytest.raises(ValueError, match=r"devices \[3\] do not exist: this machine has CUDA devices 0 to 1"):
        multi.checked_devices(2, [0, 3], 2)
    assert multi.checked_devices(2, [1, 0], 2) == [1, 0]


def test_the_sampler_on_a_worker_gives_the_latent_of_the_normal_path(pack, model, tmp_path, monkeypatch):
    """Through the graph: loader -> cache -> sampler, with the Multi-GPU option for one worker process (two
    are run_workers' test above): the worker gets the policy, captions, prefix and guidance of the normal
    path and gives its latent and masks bit for bit; the model is not loaded on a GPU here, and the job folder is
    removed."""
    multi = pack.modules["multi_gpu"]
    monkeypatch.setattr(multi.folder_paths, "temp_directory", str(tmp_path))
    unloaded, loaded = [], []
    monkeypatch.setattr(multi.mm, "unload_all_models", lambda: unloaded.append(True), raising=False)
    monkeypatch.setattr(pack.modules["sampler"].mm, "load_models_gpu", lambda *a, **k: loaded.append(a))
    cache_inputs = {i.id: i.options["default"] for i in pack.MAGI1MotionDetailCache.GET_SCHEMA().inputs
                    if "default" in i.options}
    cached = pack.MAGI1MotionDetailCache.execute(model=model, **cache_inputs).result[0]
    positive, _ = pack.MAGI1TinyTextEncode.execute(prompt=MODEL.example_prompt).result
    prefix = {"samples": torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))}  # image-to-video
    request = dict(positive=positive, guidance=5.0, record_masks=True, prefix_latent=prefix, **REQUEST)
    latent, report, masks = pack.MAGI1Sampler.execute(model=cached, **request).result
    assert len(loaded) == 1
    on_worker = multi_gpu(pack, cached)
    on_worker.model_options["transformer_options"][multi.MULTI_GPU_KEY]["workers"] = 1
    worker_latent, worker_report, worker_masks = pack.MAGI1Sampler.execute(model=on_worker, **request).result
    assert len(loaded) == 1 and unloaded == [True]
    assert torch.equal(worker_latent["samples"], latent["samples"])
    assert torch.equal(worker_masks, masks) and masks.shape[0] > 1  # one per step, not the 1-frame placeholder
    assert "MAGI-1 ran on 1 worker processes (the CPU (gloo); cfg parallel 1)" in worker_report
    assert worker_report.splitlines()[0].startswith("MAGI-1 cache hybrid: computed")
    assert "MAGI-1 memory plan" in report and "MAGI-1 memory plan" not in worker_report
    assert os.listdir(tmp_path) == []
