"""Time one DiT chunk forward, dense and sparse, against its analytic FLOPs.

    python -m bench.speed.dit_timing                                    # 4.5B at 720x720 on CUDA (random weights)
    python -m bench.speed.dit_timing --size tiny --device cpu           # a quick CPU run of the same code

The call is the steady-state one: one noisy chunk (6 latent frames) attending to itself and to one
clean chunk read from the KV cache, writing its keys/values back. Sparse calls compute a random
fraction of the chunk's tokens and read the rest's keys/values from the cache. For each attention
backend and fraction it prints the median time (CUDA events on GPU), the time ratio to the dense call
and the FLOP ratio beside it.
"""

from __future__ import annotations

import argparse

import torch

import magi1
from magi1.network.attention import flash_available
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS

from .timing import median_ms

TINY = dict(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4, num_query_groups=2,
            kv_channels=64, caption_channels=64, caption_max_length=32, in_channels=16, out_channels=16,
            apply_layernorm_1p=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="4.5B", choices=["4.5B", "24B", "tiny"])
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fractions", default="1.0,0.75,0.5,0.25,0.1")
    parser.add_argument("--caption-tokens", type=int, default=120, help="valid caption tokens per chunk")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TINY if args.size == "tiny" else OFFICIAL_MODEL_CONFIGS[args.size]
    model = magi1.random_dit(config, seed=0, device=device, dtype=dtype)
    cfg = model.config
    frames, h, w = 6, args.height // 8, args.width // 8
    ct = frames * (h // cfg.patch_size) * (w // cfg.patch_size)
    g = torch.Generator().manual_seed(0)
    length = cfg.caption_max_length
    valid = min(args.caption_tokens, length)
    inputs = dict(
        x=torch.randn(1, cfg.latent_channels, frames, h, w, generator=g).to(device),
        t=torch.tensor([[0.3]], device=device),
        caption=torch.randn(1, 1, length, cfg.caption_channels, generator=g).to(device, dtype),
        caption_mask=(torch.arange(length) < valid).view(1, 1, length).to(device),
        kv_range=[(0, 2 * ct)], slice_point=1, kv_write_chunks=1,
    )
    cache = magi1.KVCache.for_model(model, 2 * ct)
    print(f"MAGI-1 {args.size} DiT, {args.height}x{args.width}: one chunk of {ct} tokens + 1 cached chunk, "
          f"{valid} caption tokens, {device} {dtype}, KV cache {cache.nbytes / 2**30:.2f} GiB, "
          f"median of {args.repeats}")
    fractions = [float(f) for f in args.fractions.split(",")]
    backends = ["flash", "sdpa"] if device.type == "cuda" and flash_available() else ["sdpa"]
    dense_flops = magi1.flops(cfg, query_tokens=ct, key_tokens=2 * ct, caption_tokens=valid).total
    print(f"{'backend':>8} {'active':>7} {'ms':>10} {'time ratio':>11} {'FLOP ratio':>11} {'TFLOP/s':>8}")
    for backend in backends:
        model.set_attention_backend(backend)
        with torch.inference_mode():
            dense_ms = median_ms(lambda: model(**inputs, kv_cache=cache), args.repeats, device)
        print(f"{backend:>8} {'dense':>7} {dense_ms:10.2f} {1.0:11.3f} {1.0:11.3f} {dense_flops / dense_ms / 1e9:8.1f}")
        for fraction in fractions:
            n = max(1, round(fraction * ct))
            active = [torch.randperm(ct, generator=g)[:n].sort().values.to(device)]
            with torch.inference_mode():
                ms = median_ms(lambda: model(**inputs, kv_cache=cache, active=active), args.repeats, device)
            f = magi1.flops(cfg, query_tokens=n, key_tokens=2 * ct, caption_tokens=valid).total
            print(f"{backend:>8} {fraction:7.2f} {ms:10.2f} {ms / dense_ms:11.3f} {f / dense_flops:11.3f} "
                  f"{f / ms / 1e9:8.1f}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
