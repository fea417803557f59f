"""How long a generation takes on a device, estimated before anything runs.

``estimate_run(config, request, passes=..., device=..., dtype=...)`` (``request``: a ``VideoRequest``)
counts the DiT FLOPs of the whole run (``magi1.network.flops`` over the sampler's schedule) and divides them by the
device's measured matmul rate times ``EFFICIENCY``, the share of that rate the DiT reaches:

    seconds = flops / (processes * matmul FLOP/s * EFFICIENCY[device type])

The count follows ``magi1.sampling.sampler`` call by call, as its ``Recorder`` counts the dense run: every forward
step of the window (``magi1.sampling.schedule.window_step``) is one DiT call per guidance pass over the window's
chunks, each with its key range; the clean chunk re-encoded at the start of a stage is in that call (at
the null caption); distilled models (1 pass) add the nearly-clean copy of the oldest chunk (itself as its
only keys) while its time is above ``Guidance.near_clean_threshold``; base models (3 passes) run cond and
cond_pre over the window and uncond over each noisy chunk alone; a prefix's clean chunks are encoded once.

Approximated: the prompt's caption length (``caption_tokens``; the cross-attention is a few percent of a
call); every token is counted (a cache policy skips some, so a cached run is faster: this is its upper
bound); the time of a DiT call is its FLOPs at one rate (per-call overheads, which dominate only tiny
calls, and memory-bound work are in ``EFFICIENCY``, calibrated on the CPU; on CUDA it is an assumption, see
below); several processes are assumed to split the work evenly; the VAE decode and the text encoder are
not counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..checks import check_choice, check_int
from ..network.flops import flops
from ..prompts.text import NULL_CAPTION_TOKENS
from ..sampling.guidance import Guidance
from ..sampling.schedule import CLEAN_CHUNK_KVRANGE, check_steps, time_grid, total_forward_steps, window_step

# The DiT's rate as a share of a bare square matmul's in the same dtype on the same device. CPU: measured with
# the built-in tiny model (float32, 2 cores, SDPA, no cache): 0.6 to 0.8 from 128x128 to 512x512, 0.4 at 64x64
# where per-call overheads dominate tiny calls. With 0.7, estimate / measured was 0.87 at 128x128 (48 frames,
# 8 steps), 0.94 at 256x256 (48 frames, 4 steps), 1.09 to 1.18 at 512x512 (24 frames, 4 steps), 1.00 at
# 512x512 (48 frames), 0.6 at 64x64. CUDA: not measured yet (bench/gpu_suite.py reports the dense forward's
# share of its GEMM rate): 0.5 is an assumption, what DiTs with flash attention reach in bf16.
EFFICIENCY = {"cpu": 0.7, "cuda": 0.5}
DEFAULT_EFFICIENCY = 0.5
DEFAULT_CAPTION_TOKENS = NULL_CAPTION_TOKENS  # a prompt of a sentence or two, with its special tokens
MATMUL_SECONDS = 0.1  # the throughput measurement times matmuls for about this long
_MAX_SIDE = {"cpu": 4096, "cuda": 8192}
_THROUGHPUT = {}  # (device, dtype) -> measured matmul FLOP/s, once per process


@dataclass(frozen=True)
class RunFlops:
    """The DiT work of one generation: ``flops`` in all, ``dit_calls`` calls over ``forward_steps`` window
    steps, ``step_flops`` per forward step (the prefix's encoding in the first), ``chunks_done[k]`` chunks
    finished after step ``k``, of ``chunks`` to generate (after ``chunk_offset`` chunks of prefix: the
    sampler's ``StepProgress.chunks`` count those too)."""

    flops: float
    dit_calls: int
    forward_steps: int
    chunks: int
    chunk_offset: int
    step_flops: Tuple[float, ...]
    chunks_done: Tuple[int, ...]


@dataclass(frozen=True)
class RunEstimate(RunFlops):
    """``RunFlops`` and its time on ``device``: ``seconds`` at ``throughput`` (measured matmul FLOP/s of one
    device, in ``dtype``) times ``efficiency``, over ``processes`` devices."""

    device: str = "cpu"
    dtype: str = "float32"
    throughput: float = 0.0
    efficiency: float = DEFAULT_EFFICIENCY
    processes: int = 1
    seconds: float = 0.0

    def describe(self):
        """E.g. ``"about 3 min on the CPU"``, ``"about 2.4 h on cuda:0"``, ``"about 40 min on 4 GPUs like cuda:0"``."""
        if self.processes == 1:
            where = "the CPU" if self.device == "cpu" else self.device
        else:
            where = f"{self.processes} processes on the CPU" if self.device == "cpu" else \
                f"{self.processes} GPUs like {self.device}"
        return f"about {format_duration(self.seconds)} on {where}"

    def __str__(self):
        return self.describe()

    def fraction_done(self, step):
        """The share of the run's FLOPs done after forward step ``step`` (0-based)."""
        return sum(self.step_flops[:step + 1]) / self.flops if self.flops else 1.0


def run_flops(config, request, *, passes, caption_tokens=DEFAULT_CAPTION_TOKENS, negative_tokens=NULL_CAPTION_TOKENS):
    """The dense DiT work of ``generate(model, request)`` (a ``VideoRequest``: its frames, size, steps, prefix,
    window), for ``passes`` guidance passes (1: distilled, 3: base), a prompt of ``caption_tokens`` valid
    tokens and (3 passes) a negative prompt of ``negative_tokens`` (the null caption's when there is none):
    a ``RunFlops``."""
    check_choice("passes", passes, (1, 3))
    check_int("caption_tokens", caption_tokens, low=0)
    check_int("negative_tokens", negative_tokens, low=0)
    steps, window_size = request.steps, request.window_size
    check_steps(steps, window_size)
    layout = request.layout(config.patch_size)
    ct, offset = layout.tokens_per_chunk, layout.chunk_offset

    def call(chunks):  # one DiT call: (key tokens, caption tokens) of each chunk, ct queries each
        return sum(flops(config, query_tokens=ct, key_tokens=keys, caption_tokens=captions).total
                   for keys, captions in chunks)

    grid = time_grid(steps).tolist()
    threshold = Guidance().near_clean_threshold
    total = total_forward_steps(layout.chunk_num, steps, window_size, offset)
    per_stage = steps // window_size
    step_flops, done, calls = [], [], 0
    if offset:  # the prefix's clean chunks, each seeing itself, at the null caption: one call
        calls += 1
        first = call([(CLEAN_CHUNK_KVRANGE * ct, NULL_CAPTION_TOKENS)] * offset)
    else:
        first = 0.0
    for step in range(total):
        plan = window_step(step, chunk_num=layout.chunk_num, num_steps=steps, window_size=window_size,
                           chunk_offset=offset)
        noisy = plan.end - plan.start
        keys = [(b - a) * ct for a, b in plan.kv_ranges]
        clean = [NULL_CAPTION_TOKENS] * plan.refresh_clean  # the re-encoded clean chunk
        window = list(zip(keys, clean + [caption_tokens] * noisy))
        if passes == 1:
            work = call(window)
            if grid[plan.steps[0]] > threshold:  # the oldest chunk's nearly-clean copy, in the same call
                work += call([(ct, caption_tokens)])
            calls += 1
        else:  # cond and cond_pre over the window, uncond over each noisy chunk alone
            negative = list(zip(keys, clean + [negative_tokens] * noisy))
            work = call(window) + call(negative) + call([(ct, negative_tokens)] * noisy)
            calls += 3
        step_flops.append(work + (first if step == 0 else 0.0))
        done.append(min(max((step + 1) // per_stage - window_size + 1, 0), layout.chunk_num - offset))
    return RunFlops(sum(step_flops), calls, total, layout.chunk_num - offset, offset, tuple(step_flops), tuple(done))


def estimate_run(config, request, *, passes, device="cpu", dtype=torch.float32, caption_tokens=DEFAULT_CAPTION_TOKENS,
                 negative_tokens=NULL_CAPTION_TOKENS, processes=1, throughput=None, efficiency=None):
    """How long ``generate(model, request)`` takes with the DiT of ``config`` (its ``ModelConfig``) on
    ``device`` in ``dtype`` (the DiT's compute dtype), before anything runs: a ``RunEstimate``.

    ``passes``: 1 for distilled models, 3 for base ones; ``caption_tokens``, ``negative_tokens``: see
    ``run_flops``. ``processes``: devices sharing the run evenly (torchrun). ``throughput``: the matmul
    FLOP/s to use (default: measured once per device and dtype, ``matmul_throughput``); ``efficiency``: the
    DiT's share of it (default: ``EFFICIENCY``).
    """
    check_int("processes", processes, low=1)
    device = _device(device)
    work = run_flops(config, request, passes=passes, caption_tokens=caption_tokens, negative_tokens=negative_tokens)
    rate = matmul_throughput(device, dtype) if throughput is None else float(throughput)
    share = EFFICIENCY.get(device.type, DEFAULT_EFFICIENCY) if efficiency is None else float(efficiency)
    seconds = work.flops / (processes * rate * share)
    fields = {name: getattr(work, name) for name in RunFlops.__dataclass_fields__}
    return RunEstimate(**fields, device=str(device), dtype=str(dtype).replace("torch.", ""), throughput=rate,
                       efficiency=share, processes=processes, seconds=seconds)


def matmul_throughput(device, dtype=torch.float32):
    """FLOP/s of a large square matmul on ``device`` in ``dtype`` (float8 dtypes: bfloat16, the compute dtype
    of float8 weights), measured once per process and device (about ``MATMUL_SECONDS``)."""
    device = _device(device)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    key = (str(device), dtype)
    if key not in _THROUGHPUT:
        _THROUGHPUT[key] = _measure_matmul(device, dtype)
    return _THROUGHPUT[key]


def _measure_matmul(device, dtype, seconds=MATMUL_SECONDS, batches=3):
    """Grow a square matmul until one takes a fifth of ``seconds`` (or the side reaches its cap), then time
    as many as fill ``seconds`` in ``batches`` and keep the fastest batch (another process's burst on a
    shared machine slows some)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    cap = _MAX_SIDE.get(device.type, 4096)
    side, a, b, once = 256, None, None, 0.0
    with torch.no_grad():
        while True:
            try:
                a = torch.randn(side, side, device=device).to(dtype)
                b = torch.randn(side, side, device=device).to(dtype)
            except torch.cuda.OutOfMemoryError:  # keep the last size that fitted
                side //= 2
                break
            out = a @ b  # the first call warms the kernel up
            sync()
            began = time.perf_counter()
            torch.mm(a, b, out=out)
            sync()
            once = time.perf_counter() - began
            if once >= seconds / 5 or side >= cap:
                break
            side *= 2
        a, b = a[:side, :side], b[:side, :side]
        out = torch.empty(side, side, device=device, dtype=dtype)
        repeats = max(1, math.ceil(seconds / batches / max(once, 1e-6)))
        fastest = math.inf
        for _ in range(batches):
            sync()
            began = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b, out=out)
            sync()
            fastest = min(fastest, time.perf_counter() - began)
    return 2.0 * side**3 * repeats / max(fastest, 1e-9)


def _device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def format_duration(seconds):
    """A rough duration for messages: ``"40 s"``, ``"3 min"``, ``"2.4 h"``, ``"3.5 days"``."""
    if seconds < 1:
        return "1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_clock(seconds):
    """Elapsed times and ETAs: ``"0:42"``, ``"12:05"``, ``"2:03:09"``."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def eta(estimate: RunEstimate, step, elapsed) -> Optional[float]:
    """Seconds left after forward step ``step`` (0-based) when it took ``elapsed`` seconds to get there: the
    measured pace, spread over the steps by their FLOPs (later steps carry more chunks and keys)."""
    done = estimate.fraction_done(step)
    return None if done <= 0 else elapsed * (1.0 - done) / done
