"""What a live preview costs against a denoising step (issue 20, requirement 10: under 2% of a step).

A preview is what MAGI-1 Sampler's on_step builds: pick the latent frame (``preview_frame``), project it
to RGB (``project``) and wrap it in a PIL image; ComfyUI's server scales and JPEG-encodes it later, off the
sampling thread (timed too, for completeness).

- tiny model, CPU: measured step time (median gap between on_step calls) against measured preview time;
- 4.5B at 720p: preview time measured on the CPU for a window of 4 chunks of 90x90 latents (on a GPU the
  projection is smaller still; its 24 KB copy to the CPU is not included), step time ESTIMATED from
  ``magi1.network.flops`` of the cheapest step (one 6-frame chunk attending to itself and one cached chunk) at an
  assumed 400 TFLOP/s effective: a lower bound on the step, so an upper bound on the share;
- the one-time fit of the projection, on the tiny VAE and (``--full-vae``) on a random full-size VAE.

    PYTHONPATH=. python bench/speed/preview_cost.py [--full-vae] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
from PIL import Image, ImageOps

import magi1
from magi1 import builtin
from magi1.video import preview
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS

EFFECTIVE_TFLOPS = 400.0  # assumed, for the 720p estimate


def median_s(fn, repeats=50):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(latents, chunks, projection):
    return Image.fromarray(preview.project(preview.preview_frame(latents, chunks), projection).numpy())


def server_side(image, size=512):
    """What ComfyUI's server does with the tuple: scale to the preview size, encode JPEG."""
    buffer = io.BytesIO()
    ImageOps.contain(image, (size, size), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=95)


def tiny_run():
    dit, encoder = builtin.load_tiny_dit(), builtin.load_tiny_text_encoder()
    states, mask = encoder.encode(builtin.TINY.example_prompt)
    request = magi1.VideoRequest(frames=48, height=builtin.SIZE, width=builtin.SIZE, steps=builtin.STEPS)
    caption, caption_mask = magi1.chunk_captions(states, mask, request.chunks, builtin.tiny_special_tokens())
    stamps, steps = [], []

    def on_step(step):
        stamps.append(time.perf_counter())
        steps.append(step)

    magi1.generate(dit, request.with_changes(caption=caption, caption_mask=caption_mask), on_step=on_step)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), steps


def estimated_720p_step_s():
    config = magi1.ModelConfig.from_dict(OFFICIAL_MODEL_CONFIGS["4.5B"])
    tokens = 6 * (720 // 8 // config.patch_size) * (720 // 8 // config.patch_size)
    flop = magi1.flops(config, query_tokens=tokens, key_tokens=2 * tokens, caption_tokens=120).total
    return flop / (EFFECTIVE_TFLOPS * 1e12), flop


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-vae", action="store_true", help="also time the fit on a random full-size VAE")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)

    vae = builtin.load_tiny_vae(device=device)
    fit_s = median_s(lambda: preview.fit_rgb_projection(vae), repeats=3)
    projection = preview.fit_rgb_projection(vae)
    print(f"fit on the tiny VAE ({device}): {fit_s * 1e3:.0f} ms once per VAE; solid-colour error "
          f"{preview.fit_error(vae, projection):.4f} (0-1 scale)")

    step_s, steps = tiny_run()
    last = steps[-1]
    build_s = median_s(lambda: build(last.preview, last.chunks, projection))
    image = build(last.preview, last.chunks, projection)
    serve_s = median_s(lambda: server_side(image))
    print(f"tiny 64x64, CPU: step {step_s * 1e3:.2f} ms (median), preview {build_s * 1e3:.3f} ms = "
          f"{100 * build_s / step_s:.2f}% of a step; server scale+JPEG (off the sampling thread) {serve_s * 1e3:.2f} ms")

    big = torch.randn(16, 24, 90, 90, device=device)  # 4 chunks of 6 latent frames at 720p
    build_s = median_s(lambda: build(big, (0, 4), projection))
    serve_s = median_s(lambda: server_side(build(big, (0, 4), projection)), repeats=20)
    est_s, flop = estimated_720p_step_s()
    print(f"4.5B 720p: preview {build_s * 1e3:.3f} ms ({device}); step ESTIMATE >= {est_s * 1e3:.0f} ms "
          f"({flop / 1e12:.0f} TFLOP at an assumed {EFFECTIVE_TFLOPS:.0f} TFLOP/s) -> at most "
          f"{100 * build_s / est_s:.3f}% of a step; server scale+JPEG {serve_s * 1e3:.2f} ms")

    if args.full_vae:
        full = magi1.random_vae(magi1.VAEConfig(), device=device)
        start = time.perf_counter()
        preview.fit_rgb_projection(full)
        print(f"fit on a random full-size VAE ({device}): {time.perf_counter() - start:.1f} s once per VAE")


if __name__ == "__main__":
    main()
