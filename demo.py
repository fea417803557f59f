"""Generate a short video with a built-in MAGI-1 model on the CPU, with MotionDetailCache on.

    python demo.py "a red ball moving right over a checkerboard" --out demo.mp4
    python demo.py --model bench "a red ball moving right slowly and a blue square standing still over a brick wall"

Prints the cache report and writes an H.264 mp4 (24 fps) with PyAV.
"""

from __future__ import annotations

import argparse
import time

import torch

from cache_core import MODES, CachePolicy
from cache_core.policy import PRESET_MODE
from magi1 import VideoLayout, chunk_captions, generate
from magi1.tiny import MODELS, TINY

FPS = 24
DEFAULT_MODEL = TINY
DEFAULT_PROMPT = DEFAULT_MODEL.example_prompt


def write_mp4(video, path, fps=FPS):
    """``[3, F, H, W]`` in [-1, 1] -> an H.264 mp4 at ``fps``."""
    import av  # PyAV: a requirement of the pack (ComfyUI ships it too)

    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "16"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def sample(prompt=None, *, frames=48, steps=None, seed=0, mode=PRESET_MODE, preset="slow", tau=None,
           model=DEFAULT_MODEL, policy=None):
    """The demo's generation on a built-in ``model``: ``(SampleResult, the VAE to decode it with)``. The cache
    policy is the ``preset`` in ``mode`` (``tau`` overriding its τ), or ``policy`` when given."""
    dit, vae, encoder = model.load_dit(), model.load_vae(), model.load_text_encoder()
    states, mask = encoder.encode(model.example_prompt if prompt is None else prompt)
    chunks = VideoLayout.plan(frames, model.size, model.size).chunk_num
    caption, caption_mask = chunk_captions(states, mask, chunks, model.special_tokens(),
                                           length=dit.config.caption_max_length)
    if policy is None:
        overrides = {"mode": mode} if tau is None else {"mode": mode, "tau": tau}
        policy = CachePolicy.preset(preset, **overrides)
    result = generate(dit, caption, caption_mask, frames=frames, height=model.size, width=model.size,
                      steps=model.steps if steps is None else steps, seed=seed, policy=policy)
    return result, vae


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="what to generate (default: the model's example prompt)")
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL.name,
                        help="built-in model: tiny (64x64, a sprite) or bench (128x128, detailed scenes)")
    parser.add_argument("--out", help="mp4 to write (default: magi1_<model>_demo.mp4)")
    parser.add_argument("--frames", type=int, default=48, help="video frames (24 per chunk)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's, 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default=PRESET_MODE, choices=MODES, help="cache mode (off: no cache)")
    parser.add_argument("--preset", default="slow", choices=("slow", "fast"),
                        help="cache preset (calibrated on the benchmark model: bench/calibration_bench.md)")
    parser.add_argument("--tau", type=float, help="reuse threshold instead of the preset's: higher, more reuse")
    args = parser.parse_args(argv)

    model = MODELS[args.model]
    out = args.out or f"magi1_{model.name}_demo.mp4"
    began = time.perf_counter()
    result, vae = sample(args.prompt, frames=args.frames, steps=args.steps, seed=args.seed, mode=args.mode,
                         preset=args.preset, tau=args.tau, model=model)
    video = vae.decode(result.latent)
    write_mp4(video, out)
    print(result.stats.summary())
    print(f"wrote {out}: {video.shape[1]} frames, {model.size}x{model.size}, in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
