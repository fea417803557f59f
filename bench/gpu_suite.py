"""The pack at real size on one GPU: one prepared command, random weights at the official shapes, nothing
downloaded.

    python -m bench.gpu_suite                       # on a CUDA GPU: about 5 minutes, writes bench/results/gpu_results.md
    python -m bench.gpu_suite --only a,b            # chosen sections
    python -m bench.gpu_suite --smoke               # every section on tiny shapes on the CPU (CI runs this)

On the lent device machine (its own torch; nothing to install), as one call:
    PYTHONUNBUFFERED=1 python3 -m bench.gpu_suite --out $OUT/gpu_results.md 2>&1 | tee $OUT/log
then commit the returned file as bench/results/gpu_results.md. The results file is rewritten after every
section, so a run cut short keeps what it measured.

Sections (each skipped, saying so, when the time budget would not hold it):
  a. 4.5B dense window forward at 720x720 (one chunk attending to itself and one cached chunk), bf16:
     time, TFLOP/s, share of the datasheet bf16 peak and of a large bf16 GEMM measured here;
  b. the same call with 75 / 50 / 25 / 10% of tokens active: time ratio beside FLOP ratio;
  c. attention kernels: flash-attn if importable, SDPA restricted to each of its kernels;
  e. whole 4.5B-distill generations, 720x720, 48 frames, 16 steps: off, slow, fast, and forced active
     fractions: wall time, FLOP ratio, bookkeeping share of a step, peak memory;
  g. VAE decode of one 720x720 chunk: time and peak memory;
  f. 24B at 720x1280: 2 and 4 layers timed, extrapolated to 48 (labelled as such);
  d. torch.compile of the layer stack, on against off;
  m. memory: a 4.5B-distill 720x720 2-chunk generation's peak against magi1.planning.memory_plan; the window
     forward with fp8 weights (cast per layer, and the official fp8 layers' float8 products) against
     bf16; layer streaming (block swap) with 8 and 0 resident layers against resident;
  l. length: 4.5B-distill 720x720 generations of 2, 6 and 12 chunks (cache slow, 8 steps): peak memory
     against the plan (flat in length since 0.9, and within 10% of the plan);
  p. the multi-process code path on one process (magi1.distributed.parallel, NCCL world of 1): the window forward's
     time against the plain model's (the all-to-alls, token split and gather with nothing to exchange).
Random weights: the cache's decisions on them are arbitrary, so the forced fractions of e are what
measure wall time against FLOPs at real size.
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import dataclass, field

import torch

import magi1
from cache_core import CachePolicy
from magi1.network.attention import flash_available
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS

from .speed.forced_reuse import ForcedFraction
from .speed.timing import InsideDiT, median_ms

ORDER = "abmlpcegfd"  # the run order: the cheap, most wanted numbers first, compilation last
ESTIMATES = dict(a=40, b=15, m=60, l=120, p=25, c=20, e=130, g=40, f=45, d=90)  # seconds each on an H100/H200, model builds included
# Dense bf16 matrix peaks from the vendors' datasheets (TFLOP/s, no sparsity).
DATASHEET_BF16 = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A6000": 154.8}
GOALS = "dense forward >= 60% of bf16 peak; sparse speed-up >= 0.9 of the FLOP saving at 50% active; " \
        "bookkeeping < 2% of a step; slow preset's wall speed-up within 10% of its FLOP ratio"
TINY_45 = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
               kv_channels=32, caption_channels=64, caption_max_length=32, in_channels=16, out_channels=16)
TINY_24 = dict(TINY_45, num_layers=6, in_channels=32, out_channels=32, half_channel_vae=True, x_rescale_factor=0.1,
               gated_linear_unit=True)
TINY_VAE = magi1.VAEConfig(embed_dim=256, depth=1, num_heads=4, mlp_ratio=1.0, video_size=64, video_length=12)


@dataclass
class Setup:
    """What differs between a real run and the smoke run."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    size_45: tuple  # (height, width) of the 4.5B sections
    size_24: tuple
    frames: int
    repeats: int
    gemm: int  # side of the square GEMM that measures the reachable matrix rate
    compile_backend: str
    models: dict = field(default_factory=dict)  # built once, shared by the sections

    @classmethod
    def make(cls, smoke):
        if smoke:
            return cls(torch.device("cpu"), torch.float32, True, (64, 64), (64, 96), 48, 2, 256, "aot_eager")
        return cls(torch.device("cuda"), torch.bfloat16, False, (720, 720), (720, 1280), 48, 5, 8192, "inductor")

    def dit(self, name, layers=None):
        """The 4.5B ("4.5B") or 24B ("24B") DiT with random weights (tiny stand-ins in the smoke run)."""
        key = (name, layers)
        if key not in self.models:
            config = dict((TINY_45 if name == "4.5B" else TINY_24) if self.smoke else OFFICIAL_MODEL_CONFIGS[name])
            if layers is not None:
                config["num_layers"] = layers
            self.models[key] = magi1.random_dit(config, seed=0, device=self.device, dtype=self.dtype,
                                                draw_device=self.device)
        return self.models[key]


class Timer:
    """``median_ms`` with this run's device, repeats and warm-up."""

    def __init__(self, device, repeats, warmup=2):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, fn):
        return median_ms(fn, self.repeats, self.device, self.warmup)


class WindowCall:
    """The steady-state chunk call: one noisy chunk attending to itself and one cached clean chunk."""

    def __init__(self, model, height, width, caption_tokens=120):
        config, device = model.config, model.device
        self.model = model
        h, w = height // 8, width // 8
        self.tokens = 6 * (h // config.patch_size) * (w // config.patch_size)
        g = torch.Generator().manual_seed(0)
        length = config.caption_max_length
        self.caption_tokens = min(caption_tokens, length)
        self.inputs = dict(
            x=torch.randn(1, config.latent_channels, 6, h, w, generator=g).to(device),
            t=torch.tensor([[0.3]], device=device),
            caption=torch.randn(1, 1, length, config.caption_channels, generator=g).to(device, model.dtype),
            caption_mask=(torch.arange(length) < self.caption_tokens).view(1, 1, length).to(device),
            kv_range=[(0, 2 * self.tokens)], slice_point=1, kv_write_chunks=1)
        self.kv_cache = magi1.KVCache.for_model(model, 2 * self.tokens)
        self.generator = g

    def flops(self, active_tokens=None):
        queries = self.tokens if active_tokens is None else active_tokens
        return magi1.flops(self.model.config, query_tokens=queries, key_tokens=2 * self.tokens,
                           caption_tokens=self.caption_tokens).total

    def random_active(self, fraction):
        n = max(1, round(fraction * self.tokens))
        return [torch.randperm(self.tokens, generator=self.generator)[:n].sort().values.to(self.model.device)]

    def __call__(self, active=None):
        with torch.inference_mode():
            return self.model(**self.inputs, kv_cache=self.kv_cache, active=active)


# ---------------------------------------------------------------------------------------------- sections
def section_a(setup, timer, found):
    gemm_tflops = measure_gemm(setup, timer)
    call = WindowCall(setup.dit("4.5B"), *setup.size_45)
    ms = timer(call)
    tflops = call.flops() / ms / 1e9
    peak = datasheet_peak(setup.device)
    found.update(dense_ms=ms, dense_tflops=tflops, gemm_tflops=gemm_tflops, peak=peak)
    share_peak = f"{tflops / peak:.0%}" if peak else "unknown (no datasheet entry for this device)"
    return [f"One chunk of {call.tokens} tokens + 1 cached chunk, {call.caption_tokens} caption tokens, "
            f"{setup.dtype}, median of {setup.repeats} (warm-up excluded).", "",
            "| dense forward | TFLOP | TFLOP/s | share of datasheet bf16 peak | share of the GEMM rate |",
            "|---|---|---|---|---|",
            f"| {ms:.1f} ms | {call.flops() / 1e12:.1f} | {tflops:.0f} | {share_peak} | {tflops / gemm_tflops:.0%} |",
            "", f"Square {setup.gemm}x{setup.gemm} GEMM in {setup.dtype}: {gemm_tflops:.0f} TFLOP/s."]


def section_b(setup, timer, found):
    call = WindowCall(setup.dit("4.5B"), *setup.size_45)
    dense_ms = found.get("dense_ms") or timer(call)
    lines = ["| active | ms | time ratio | FLOP ratio | speed-up / FLOP saving |", "|---|---|---|---|---|"]
    for fraction in (0.75, 0.5, 0.25, 0.1):
        active = call.random_active(fraction)
        ms = timer(lambda: call(active))
        flop_ratio = call.flops(int(active[0].numel())) / call.flops()
        efficiency = (dense_ms / ms) / (1 / flop_ratio)
        if fraction == 0.5:
            found["sparse_efficiency_50"] = efficiency
        lines.append(f"| {fraction:.0%} | {ms:.1f} | {ms / dense_ms:.3f} | {flop_ratio:.3f} | {efficiency:.2f} |")
    return lines


def section_c(setup, timer, found):
    model = setup.dit("4.5B")
    call = WindowCall(model, *setup.size_45)
    lines = ["| kernel | dense forward ms |", "|---|---|"]
    if flash_available() and setup.device.type == "cuda":
        model.set_attention_backend("flash")
        lines.append(f"| flash-attn | {timer(call):.1f} |")
    model.set_attention_backend("sdpa")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = [("SDPA, PyTorch's choice", None), ("SDPA flash", SDPBackend.FLASH_ATTENTION),
               ("SDPA memory-efficient", SDPBackend.EFFICIENT_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)]
    if setup.smoke:
        kernels.append(("SDPA math", SDPBackend.MATH))  # at real size the math kernel would not fit in time
    for name, kernel in kernels:
        try:
            if kernel is None:
                ms = timer(call)
            else:
                with sdpa_kernel([kernel]):
                    ms = timer(call)
            lines.append(f"| {name} | {ms:.1f} |")
        except Exception as error:  # a kernel that cannot take this call is a finding, not a failure
            lines.append(f"| {name} | not usable here: {(str(error).splitlines() or [''])[0][:120]} |")
    model.set_attention_backend("auto")
    return lines


def section_d(setup, timer, found):
    call = WindowCall(setup.dit("4.5B"), *setup.size_45)
    plain_ms = found.get("dense_ms") or timer(call)
    layers = setup.dit("4.5B").videodit_blocks.layers
    began = time.perf_counter()
    try:
        for layer in layers:
            layer.compile(backend=setup.compile_backend)
        call()  # compiles
        compile_s = time.perf_counter() - began
        ms = timer(call)
    except Exception as error:  # a compiler failure is a result to report, not a reason to lose the others
        return [f"torch.compile ({setup.compile_backend}) failed: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}"]
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # back to eager for anything after this section
    return ["| layer stack | dense forward ms | speed-up |", "|---|---|---|",
            f"| eager | {plain_ms:.1f} | 1.00 |",
            f"| torch.compile ({setup.compile_backend}), compiled in {compile_s:.0f} s | {ms:.1f} | "
            f"{plain_ms / ms:.2f} |"]


def section_e(setup, timer, found):
    model = setup.dit("4.5B")
    model.distill = True
    height, width = setup.size_45
    layout = magi1.VideoLayout.plan(setup.frames, height, width)
    steps = 16
    forward_steps = magi1.sampling.schedule.total_forward_steps(layout.chunk_num, steps, 4)
    g = torch.Generator().manual_seed(0)
    config = model.config
    caption = torch.randn(config.caption_max_length, config.caption_channels, generator=g)
    mask = torch.arange(config.caption_max_length) < min(120, config.caption_max_length)
    runs = [("off", None), ("slow", CachePolicy.slow()), ("fast", CachePolicy.fast())]
    runs += [(f"forced {f:.0%} active", ForcedFraction(f)) for f in (0.5, 0.25)]
    inside = InsideDiT(model)
    measured = {}
    for name, policy in runs:
        inside.seconds = 0.0
        request = magi1.VideoRequest(frames=setup.frames, height=height, width=width, steps=steps, policy=policy,
                                     caption=caption, caption_mask=mask)
        result = magi1.generate(model, request)
        measured[name] = (result.stats, inside.seconds)
    inside.remove()
    off_stats, off_inside = measured["off"]
    off_outside = (off_stats.wall_seconds - off_inside) / forward_steps
    step = off_stats.wall_seconds / forward_steps
    lines = [f"{setup.frames} frames {height}x{width} ({layout.chunk_num} chunks of {layout.tokens_per_chunk} tokens), "
             f"{steps} steps, 1-pass guidance, one run each. No memory plan exists yet to compare the peaks with.", "",
             "| run | wall s | speed-up | FLOP ratio | speed-up / FLOP ratio | computed | bookkeeping / step | "
             "peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for name, (stats, seconds_inside) in measured.items():
        speedup = off_stats.wall_seconds / stats.wall_seconds
        bookkeeping = ((stats.wall_seconds - seconds_inside) / forward_steps - off_outside) / step
        peak = "-" if stats.peak_memory_bytes is None else f"{stats.peak_memory_bytes / 2**30:.1f}"
        lines.append(f"| {name} | {stats.wall_seconds:.1f} | {speedup:.2f}x | {stats.flop_ratio:.2f}x | "
                     f"{speedup / stats.flop_ratio:.2f} | {stats.computed_fraction:.0%} | {bookkeeping:+.1%} | {peak} |")
        if name == "slow":
            found.update(slow_efficiency=speedup / stats.flop_ratio, bookkeeping=bookkeeping)
    return lines


def section_f(setup, timer, found):
    height, width = setup.size_24
    times = {}
    for layers in (2, 4):
        call = WindowCall(setup.dit("24B", layers), height, width)
        times[layers] = timer(call)
        setup.models.pop(("24B", layers))  # free it before the next
        del call
    per_layer = (times[4] - times[2]) / 2
    full_layers = TINY_24["num_layers"] if setup.smoke else OFFICIAL_MODEL_CONFIGS["24B"]["num_layers"]
    whole = times[2] + (full_layers - 2) * per_layer
    return [f"{height}x{width}: one chunk of {call_tokens(setup, height, width)} tokens + 1 cached chunk; the "
            "whole model's time is an extrapolation from 2 and 4 layers, not a measurement.", "",
            "| 24B layers | dense forward ms |", "|---|---|", f"| 2 | {times[2]:.1f} |", f"| 4 | {times[4]:.1f} |",
            f"| {full_layers} (**extrapolated**: 2 layers + {full_layers - 2} x {per_layer:.1f} ms) | {whole:.0f} |"]


def section_g(setup, timer, found):
    config = TINY_VAE if setup.smoke else magi1.VAEConfig()
    vae = magi1.random_vae(config, seed=0, device=setup.device, dtype=setup.dtype, draw_device=setup.device)
    height, width = setup.size_45
    latent = torch.randn(16, 6, height // 8, width // 8, generator=torch.Generator().manual_seed(0)).to(setup.device)
    tiling = magi1.VAETiling(height=min(256, height), width=min(256, width))
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    with torch.inference_mode():
        ms = Timer(setup.device, max(1, setup.repeats // 2), warmup=1)(lambda: vae.decode(latent, tiling))
    peak = f"{torch.cuda.max_memory_allocated(setup.device) / 2**30:.1f} GiB" if setup.device.type == "cuda" else "-"
    frames = vae.decoded_frames(6, tiling)
    return ["| VAE decode, one chunk (6 latent frames) | ms | peak memory |", "|---|---|---|",
            f"| {frames} frames {height}x{width}, tiles {tiling.height}x{tiling.width} | {ms:.0f} | {peak} |"]


def distilled_45(setup):
    """The 4.5B DiT as a distilled model, and a random caption of 120 tokens (``(model, caption, mask)``)."""
    model = setup.dit("4.5B")
    model.distill = True
    config = model.config
    g = torch.Generator().manual_seed(0)
    caption = torch.randn(config.caption_max_length, config.caption_channels, generator=g)
    mask = torch.arange(config.caption_max_length) < min(120, config.caption_max_length)
    return model, caption, mask


def section_m(setup, timer, found):
    name = "4.5B"
    height, width = setup.size_45
    model, caption, mask = distilled_45(setup)
    config = model.config
    request = magi1.VideoRequest(frames=48, height=height, width=width, steps=8, caption=caption, caption_mask=mask)
    plan = magi1.memory_plan(config, request, weight_dtype=str(setup.dtype).replace("torch.", ""),
                             compute_dtype=setup.dtype, passes=1, decode=False)
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(setup.device)
    magi1.generate(model, request)
    peak = torch.cuda.max_memory_allocated(setup.device) if cuda else None
    lines = [f"48 frames {height}x{width}, 8 steps, cache off: peak allocated "
             + (f"{peak / 2**30:.2f} GiB against the plan's {plan.dit_phase / 2**30:.2f} GiB "
                f"(ratio {peak / plan.dit_phase:.2f}; goal within 10%)" if cuda else "- (CPU)"), ""]
    if cuda:
        found.update(plan_ratio=peak / plan.dit_phase)
    call = WindowCall(model, height, width)
    rows = [("bf16 weights, resident", timer(call))]
    lines += spread_weights(model, call, setup, timer, rows)
    for resident in (8, 0):
        streamer = magi1.stream_layers(model, setup.device, min(resident, config.num_layers))
        rows.append((f"streamed, {resident} resident layers", timer(call)))
        streamer.remove()
    del call
    for kind in ("fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official"):
        fp8 = magi1.random_dit(dict(TINY_45) if setup.smoke else OFFICIAL_MODEL_CONFIGS[name], seed=0,
                               device=setup.device, dtype=setup.dtype, draw_device=setup.device, weights=kind)
        how = "float8 products where the GPU has them" if kind == "fp8_official" else "cast per layer"
        rows.append((f"{kind} weights ({how})", timer(WindowCall(fp8, height, width))))
        del fp8
    base = rows[0][1]
    lines += ["| window forward (1 chunk + 1 cached) | ms | against bf16 resident |", "|---|---|---|"]
    lines += [f"| {label} | {ms:.1f} | {ms / base:.2f}x |" for label, ms in rows]
    return lines


def section_l(setup, timer, found):
    """Length for free: the peak memory of 2-, 6- and 12-chunk generations against the plan (flat in length)."""
    height, width = setup.size_45
    model, caption, mask = distilled_45(setup)
    config = model.config
    cuda = setup.device.type == "cuda"
    lines = ["| chunks (frames) | peak allocated GiB | plan GiB | peak / plan | seconds |", "|---|---|---|---|---|"]
    peaks = {}
    for chunks in (2, 6, 12):
        frames = 24 * chunks
        request = magi1.VideoRequest(frames=frames, height=height, width=width, steps=8, caption=caption,
                                     caption_mask=mask, policy=CachePolicy.preset("slow"))
        plan = magi1.memory_plan(config, request, weight_dtype=str(setup.dtype).replace("torch.", ""),
                                 compute_dtype=setup.dtype, passes=1, decode=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(setup.device)
        began = time.perf_counter()
        magi1.generate(model, request)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated(setup.device) if cuda else None
        peaks[chunks] = peak
        lines.append(f"| {chunks} ({frames}) | " + (f"{peak / 2**30:.2f}" if cuda else "- (CPU)")
                     + f" | {plan.dit_phase / 2**30:.2f} | " + (f"{peak / plan.dit_phase:.2f}" if cuda else "-")
                     + f" | {seconds:.1f} |")
    if cuda:
        found.update(length_ratio=peaks[12] / peaks[2], length_plan_ratio=peaks[12] / plan.dit_phase)
        lines += ["", f"12 chunks / 2 chunks: {peaks[12] / peaks[2]:.2f}x (goal: flat); 12 chunks against the plan: "
                      f"{peaks[12] / plan.dit_phase:.2f} (goal within 10%)"]
    return lines


def section_p(setup, timer, found):
    from magi1.weights.layer_sharding import distribute
    from magi1.distributed.parallel import Parallel
    from magi1.distributed.workers import free_port
    model = setup.dit("4.5B")
    call = WindowCall(model, *setup.size_45)
    plain_ms = timer(call)
    reference = call().clone()
    parallel = Parallel.start(0, 1, f"tcp://127.0.0.1:{free_port()}", device=setup.device)
    try:
        distribute(model, parallel)
        model.context_parallel = parallel.context(model.config)  # distribute skips it for one process: forced
        through = call()
        parallel_ms = timer(call)
    finally:
        model.parallel = model.context_parallel = None
        parallel.close()
    difference = float((through - reference).abs().max())
    found.update(parallel_overhead=parallel_ms / plain_ms - 1)
    return [f"Window forward (1 chunk of {call.tokens} tokens + 1 cached), {setup.dtype}, one process.", "",
            "| path | ms | against plain |", "|---|---|---|", f"| plain model | {plain_ms:.1f} | 1.00x |",
            f"| through magi1.distributed.parallel (world of 1) | {parallel_ms:.1f} | {parallel_ms / plain_ms:.3f}x |", "",
            f"Largest difference between the two outputs: {difference:.1e}."]


def spread_weights(model, call, setup, timer, rows):
    """Every other layer left in host memory and cast in as it runs, as ComfyUI's partial loading leaves a
    model: the same output as resident (ComfyUI itself is tested on the CPU in tests/test_comfyui.py)."""
    resident = call().clone()
    left = [layer for i, layer in enumerate(model.videodit_blocks.layers) if i % 2]
    for layer in left:
        layer.to("cpu")
    model.execution_device = setup.device
    try:
        spread = call()
        rows.append((f"{len(left)} layers left in host memory (partial loading)", timer(call)))
    finally:
        for layer in left:
            layer.to(setup.device)
        model.execution_device = None
    same = torch.equal(spread, resident)
    return [f"Weights spread over host and GPU (every other layer in host memory): output "
            f"{'identical to' if same else 'DIFFERENT from'} the resident model's.", ""]


SECTIONS = dict(m=("Memory: plan, fp8, streaming", section_m), l=("Length: peak memory at 2, 6, 12 chunks", section_l), p=("Multi-process path on one GPU", section_p), a=("4.5B dense window forward", section_a), b=("4.5B sparse window forward", section_b),
                c=("Attention kernels", section_c), d=("torch.compile of the layer stack", section_d),
                e=("Whole 4.5B-distill generations", section_e), f=("24B, a few layers timed and extrapolated", section_f),
                g=("VAE decode", section_g))


# ---------------------------------------------------------------------------------------------- helpers
def call_tokens(setup, height, width):
    return 6 * (height // 16) * (width // 16)


def measure_gemm(setup, timer):
    n = setup.gemm
    a = torch.randn(n, n, device=setup.device, dtype=setup.dtype)
    b = torch.randn(n, n, device=setup.device, dtype=setup.dtype)
    ms = timer(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


def datasheet_peak(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


def environment(setup):
    if setup.device.type == "cuda":
        name = torch.cuda.get_device_name(setup.device)
        memory = torch.cuda.get_device_properties(setup.device).total_memory / 2**30
        device = f"{name}, {memory:.0f} GiB"
    else:
        device = f"CPU ({torch.get_num_threads()} threads): smoke run on tiny shapes, not a measurement"
    sdpa = [n for n, flag in (("flash", "flash_sdp_enabled"), ("memory-efficient", "mem_efficient_sdp_enabled"),
                              ("cuDNN", "cudnn_sdp_enabled"), ("math", "math_sdp_enabled"))
            if getattr(torch.backends.cuda, flag, lambda: False)()]
    return [f"- date: {datetime.date.today().isoformat()}", f"- device: {device}",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
            f"- flash-attn importable: {'yes' if flash_available() else 'no'}; SDPA kernels enabled: {', '.join(sdpa)}",
            "- weights: random at the official shapes (nothing downloaded); the cache's decisions on random "
            "weights are arbitrary"]


def goals(found):
    def row(goal, value, ok, shown):
        verdict = "not measured" if value is None else ("met" if ok(value) else "**not met**")
        return f"| {goal} | {'-' if value is None else shown(value)} | {verdict} |"

    peak = found.get("peak")
    dense = found["dense_tflops"] / peak if "dense_tflops" in found and peak else None
    return ["| goal | measured | |", "|---|---|---|",
            row("dense forward >= 60% of the bf16 datasheet peak", dense, lambda v: v >= 0.6, lambda v: f"{v:.0%}"),
            row("sparse speed-up >= 0.9 of the FLOP saving at 50% active", found.get("sparse_efficiency_50"),
                lambda v: v >= 0.9, lambda v: f"{v:.2f}"),
            row("cache bookkeeping < 2% of a step (slow preset)", found.get("bookkeeping"), lambda v: v < 0.02,
                lambda v: f"{v:+.1%}"),
            row("slow preset's wall speed-up within 10% of its FLOP ratio", found.get("slow_efficiency"),
                lambda v: v >= 0.9, lambda v: f"{v:.2f} of it"),
            row("peak memory flat in length: 12 chunks within 5% of 2 chunks", found.get("length_ratio"),
                lambda v: v <= 1.05, lambda v: f"{v:.2f}x"),
            row("12-chunk peak within 10% of the plan", found.get("length_plan_ratio"),
                lambda v: abs(v - 1) <= 0.1, lambda v: f"{v:.2f}")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=ORDER, help="sections to run, e.g. a,b,e (default: all)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; a section that would overrun is skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, every section (for CI)")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/gpu_results.md; none with --smoke)")
    args = parser.parse_args(argv)
    chosen = [s for s in ORDER if s in args.only.replace(",", "")]
    unknown = sorted(set(args.only.replace(",", "")) - set(ORDER))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(ORDER)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this suite measures a CUDA GPU; use --smoke for a CPU check of the code")
    setup = Setup.make(args.smoke)
    timer = Timer(setup.device, setup.repeats)
    out = args.out or (None if args.smoke else "bench/results/gpu_results.md")
    began, found = time.perf_counter(), {}
    lines = ["# MAGI-1 at real size on one GPU" if not args.smoke else "# GPU suite, smoke run (tiny shapes, CPU)",
             "", *environment(setup), "", f"Goals: {GOALS}.", ""]
    for key in chosen:
        title, run = SECTIONS[key]
        lines += [f"## {key}. {title}", ""]
        elapsed = time.perf_counter() - began
        if not args.smoke and elapsed + ESTIMATES[key] > args.budget:
            lines += [f"Skipped: {elapsed:.0f} s used, about {ESTIMATES[key]} s needed, budget {args.budget:.0f} s "
                      f"(run it alone with --only {key}).", ""]
            continue
        section_began = time.perf_counter()
        lines += run(setup, timer, found)
        lines += ["", f"({time.perf_counter() - section_began:.0f} s)", ""]
        print(f"section {key} done after {time.perf_counter() - began:.0f} s", flush=True)
        write(out, lines, found, began)  # after every section: a run cut short still leaves its results
    print(write(out, lines, found, began))
    return 0


def write(out, lines, found, began):
    """The results so far with the goals table, written to ``out`` (if any); returns the text."""
    text = "\n".join(lines + ["## Goals", "", *goals(found), "", f"Total {time.perf_counter() - began:.0f} s."]) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
