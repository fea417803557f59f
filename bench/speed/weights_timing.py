"""Time the per-step token-weight computation for one MAGI-1 chunk.

    python -m bench.speed.weights_timing [--size 720] [--repeats 50] [--device cpu]    (from the repository root)

A chunk at 720x720 is [16, 6, 90, 90] (16 latent channels, 6 latent frames, 90x90 latent pixels, 2x2
patches → 12150 tokens). Prints the median time of motion, detail and combine, through the public
(validating) functions and through the per-step path the sampler uses (no validation, no host sync).
"""

import argparse
import statistics
import time

import torch

from cache_core import combine_weights, detail_weights, motion_weights
from cache_core.token_weights import _combine_unchecked, _detail_weights_unchecked, _motion_weights_unchecked


def median_ms(fn, repeats, device):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=720, help="video height = width in pixels (latent = size / 8)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    side = args.size // 8
    latent = torch.randn(16, 6, side, side, generator=g).to(device)
    prev = torch.randn(16, side, side, generator=g).to(device)

    def public():
        wm = motion_weights(latent, prev, floor=0.6)
        wd = detail_weights(latent, window=3, floor=0.5)
        return combine_weights(wm, wd, "max")

    def per_step():
        wm = _motion_weights_unchecked(latent, prev, (2, 2), 0.6, 1.0)
        wd = _detail_weights_unchecked(latent, 3, (2, 2), 0.5)
        return _combine_unchecked(wm, wd, "max", 0.5)

    assert torch.equal(public(), per_step())
    print(f"chunk {list(latent.shape)} on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"  motion only             {median_ms(lambda: _motion_weights_unchecked(latent, prev, (2, 2), 0.6, 1.0), args.repeats, device):7.2f} ms")
    print(f"  detail only             {median_ms(lambda: _detail_weights_unchecked(latent, 3, (2, 2), 0.5), args.repeats, device):7.2f} ms")
    print(f"  motion+detail+combine   {median_ms(per_step, args.repeats, device):7.2f} ms  (per-step path)")
    print(f"  motion+detail+combine   {median_ms(public, args.repeats, device):7.2f} ms  (public, validating)")


if __name__ == "__main__":
    main()
