"""Several processes: per-rank memory and communication on paper for 24B, and time per step measured on CPU.

    python -m bench.scaling.parallel_scaling              # writes bench/results/parallel_scaling.md
    python -m bench.scaling.parallel_scaling --paper      # the paper table only (no processes started)

Paper (``magi1.planning.memory_plan`` and ``magi1.distributed.parallel``'s scheme; 24B distill, 720x1280, 96 frames, one pass,
context parallel over N processes, bf16 compute, cache off). Per rank:

* weights: the layers it owns (``ceil(L / N)``), the layers in flight (the running one and the next, which
  is broadcast while the running one computes; one for N = 2, where every other layer is its own), and
  everything outside the layers (replicated);
* KV cache: the KV heads its query heads read (``8 / N`` of 8 for N <= 8);
* activations: the window call's peak (``dit_activation_bytes``) with its per-token part divided by N,
  plus the all-to-all buffers (send and receive copies of q, k, v of its tokens) and the gathered output;
  the latents and caption table stay whole on every rank;
* communication per denoising step (one window call), bytes received by one rank: per layer, the
  all-to-alls of q, k, v and the attention output ((N - 1) / N of its share each) and the gathered output;
  and the weights of the layers it does not own (N - 1 of N), broadcast by their owners;
* compute per step: ``magi1.network.flops`` of the window call (keys taken as the window's tokens, an estimate)
  over N, at an assumed 600 TFLOP/s per GPU.

Measured: the built-in tiny model (64x64, 48 frames, 16 steps), gloo on this machine's CPU cores, one
thread per process: one process as usual, one process through the parallel path (world 1), and two
processes. With the slow cache preset, the two-process run's free-running decisions are compared with the
one-process run's (rank 0 decides on latents that differ by float rounding).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from magi1 import VideoRequest, memory_plan
from magi1.network.config import ModelConfig
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS
from magi1.planning.memory_plan import GB, dit_activation_bytes, layer_weight_bytes, window_calls
from magi1.network.flops import flops
from magi1.distributed.parallel import split_sizes

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
OUT = os.path.join(HERE, "results", "parallel_scaling.md")
SIZE = dict(frames=96, height=720, width=1280)
BF16 = 2
PER_GPU_FLOPS = 600e12  # an assumed sustained bf16 rate per GPU (H100-class), for the compute column


def per_rank(config, processes, weight_dtype="bfloat16"):
    """Per-rank GB of weights, KV cache, activations, and the GB one rank receives per step."""
    request = VideoRequest(**SIZE)
    plan = memory_plan(config, request, weight_dtype=weight_dtype, passes=1, decode=False)
    layout = request.layout(config.patch_size)
    calls = window_calls(layout, passes=1)
    n, L = processes, config.num_layers
    layer = [sum(layer_weight_bytes(config, i, weight_dtype).values()) for i in range(L)]
    rest = sum(plan.weights.values()) - sum(layer)
    owned = max(sum(layer[i] for i in range(L) if i % n == r) for r in range(n))
    weights = rest + owned + (2 * max(layer) if n > 2 else max(layer) if n == 2 else 0)  # layers in flight
    local_kv = max(split_sizes(config.num_attention_heads, n)) * config.num_query_groups // config.num_attention_heads
    kv = plan.kv_on_gpu * max(1, local_kv) // config.num_query_groups
    tokens = calls.query * layout.tokens_per_chunk
    local = max(split_sizes(tokens, n))
    q, k = config.num_attention_heads * config.kv_channels, config.num_query_groups * config.kv_channels
    whole = dit_activation_bytes(config, layout, calls)
    activations = whole / n + (2 * local * (q + 2 * k) * BF16 + tokens * 4 * config.out_channels * 4 if n > 1 else 0)
    exchanged = broadcast = 0.0
    if n > 1:
        share = (n - 1) / n
        # q, k, v to heads and the output back to tokens, every layer; the gathered output once
        exchanged = L * share * local * (2 * q + 2 * k) * BF16 + tokens * 4 * config.out_channels * 4 * share
        broadcast = sum(layer) * share  # the layers this rank does not own
    # one window call per step, its keys about the window's tokens (an estimate)
    work = flops(config, query_tokens=tokens, key_tokens=tokens, caption_tokens=120, chunks=calls.query).total
    return dict(weights=weights / GB, kv=kv / GB, activations=activations / GB,
                total=(weights + kv + activations) / GB, exchanged=exchanged / GB, broadcast=broadcast / GB,
                compute_s=work / n / PER_GPU_FLOPS)


def paper_table():
    config = ModelConfig.from_dict(OFFICIAL_MODEL_CONFIGS["24B"])
    lines = ["| 24B distill 720x1280, 96 frames | N | weights / rank | KV cache / rank | activations / rank | "
             "total / rank | all-to-all / step / rank | weights received / step / rank | compute / step / rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, dtype in (("bf16", "bfloat16"), ("fp8_e4m3fn weights", "fp8_e4m3fn")):
        for n in (1, 2, 4, 8):
            r = per_rank(config, n, dtype)
            lines.append(f"| {label} | {n} | {r['weights']:.1f} GB | {r['kv']:.1f} GB | {r['activations']:.1f} GB | "
                         f"{r['total']:.1f} GB | {r['exchanged']:.1f} GB | {r['broadcast']:.1f} GB | "
                         f"{r['compute_s']:.1f} s |")
    return "\n".join(lines)


# --- measured on CPU ------------------------------------------------------------------------------------

def _request(frames=48, steps=16):
    from magi1 import chunk_captions
    from magi1.builtin import TINY
    states, mask = TINY.load_text_encoder().encode(TINY.example_prompt)
    request = VideoRequest(frames=frames, height=TINY.size, width=TINY.size, steps=steps, seed=0)
    caption, caption_mask = chunk_captions(states, mask, request.chunks, TINY.special_tokens(), length=800)
    return request.with_changes(caption=caption, caption_mask=caption_mask)


def _policy():
    from cache_core import CachePolicy
    return CachePolicy.preset("slow")


def _run(parallel, cached):
    from magi1 import generate
    from magi1.builtin import TINY
    model = TINY.load_dit(parallel=parallel)
    if parallel is not None and parallel.world == 1:  # distribute skips the exchanges for one process: forced
        model.context_parallel = parallel.context(model.config)
    request = _request().with_changes(policy=_policy() if cached else None, record_masks=cached)
    with torch.no_grad():
        generate(model, _request(frames=24, steps=8), parallel=parallel)  # warm-up
        start = time.perf_counter()
        result = generate(model, request, parallel=parallel)
    return result, time.perf_counter() - start


def _steps(stats):
    """Forward steps of a run."""
    return 1 + max(record.step for record in stats.records)


def _worker(rank, world, port, out_dir):
    from safetensors.torch import save_file
    from magi1.distributed.parallel import Parallel
    torch.set_num_threads(1)
    par = Parallel.start(rank, world, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        plain, seconds = _run(par, cached=False)
        cached, _ = _run(par, cached=True)
        if rank == 0:
            save_file({"latent": plain.latent, "masks": cached.stats.masks.frames().float(),
                       "cached": cached.latent}, os.path.join(out_dir, "out.safetensors"),
                      metadata={"seconds": repr(seconds), "steps": repr(_steps(plain.stats))})
    finally:
        par.close()


def _processes(world):
    import torch.multiprocessing as mp
    from safetensors import safe_open
    from safetensors.torch import load_file
    from magi1.distributed.workers import free_port
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, port, out_dir), nprocs=world, join=True)
        path = os.path.join(out_dir, "out.safetensors")
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        return load_file(path), float(meta["seconds"]), int(meta["steps"])


def measured():
    torch.set_num_threads(1)
    plain, seconds = _run(None, cached=False)
    cached, _ = _run(None, cached=True)
    steps = _steps(plain.stats)
    lines = ["| tiny model, 64x64, 48 frames, 16 steps (CPU, 1 thread per process) | s / step | latent vs 1 process |",
             "|---|---|---|", f"| 1 process | {seconds / steps * 1000:.1f} ms | - |"]
    mismatch = {}
    for world in (1, 2):
        out, secs, _ = _processes(world)
        error = float((out["latent"] - plain.latent).norm() / plain.latent.norm())
        label = "1 process through the parallel path (gloo)" if world == 1 else f"{world} processes (gloo)"
        lines.append(f"| {label} | {secs / steps * 1000:.1f} ms | {error:.1e} |")
        single = cached.stats.masks.frames().float()
        mismatch[world] = float((out["masks"] != single).float().mean())
    lines.append("")
    lines.append(f"Free-running cache decisions (slow preset), share of mask entries (step x token) that differ "
                 f"from one process: 1 process through the parallel path {mismatch[1]:.2%}, "
                 f"2 processes {mismatch[2]:.2%}.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="the paper table only")
    args = parser.parse_args(argv)
    text = paper_table()
    if not args.paper:
        text += "\n\n" + measured()
        with open(OUT, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
