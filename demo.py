"""Generate a short video with a built-in MAGI-1 model on the CPU, with MotionDetailCache on.

    python demo.py "a red ball moving right over a checkerboard" --out demo.mp4
    python demo.py --model bench "a red ball moving right slowly and a blue square standing still over a brick wall"

Prints the cache report and writes an H.264 mp4 (24 fps) with PyAV.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cache_core import MODES, CachePolicy
from cache_core.policy import PRESET_MODE
from magi1 import VideoRequest, chunk_captions, generate
from magi1.builtin import MODELS, TINY
from magi1.planning.run_time import estimate_run
from magi1.sampling.layout import FRAMES_RULE
from magi1.sampling.request import WINDOW_SIZE
from magi1.sampling.schedule import check_steps
from magi1.video.mp4 import FPS, write_mp4  # noqa: F401 (FPS: demo.FPS, as before)
from programs.cli import Progress, estimate_line, int_argument  # as python -m magi1 shows and checks them

DEFAULT_MODEL = TINY
DEFAULT_PROMPT = DEFAULT_MODEL.example_prompt


def sample(prompt=None, *, frames=48, steps=None, seed=0, mode=PRESET_MODE, preset="slow", tau=None,
           model=DEFAULT_MODEL, policy=None, progress=False):
    """The demo's generation on a built-in ``model``: ``(SampleResult, the VAE to decode it with)``. The cache
    policy is the ``preset`` in ``mode`` (``tau`` overriding its τ), or ``policy`` when given. ``progress``:
    print the time estimate and per-chunk progress on stderr, as ``python -m magi1`` does."""
    dit, vae, encoder = model.load_dit(), model.load_vae(), model.load_text_encoder()
    states, mask = encoder.encode(model.example_prompt if prompt is None else prompt)
    if policy is None:
        overrides = {"mode": mode} if tau is None else {"mode": mode, "tau": tau}
        policy = CachePolicy.preset(preset, **overrides)
    request = VideoRequest(frames=frames, width=model.size, height=model.size,  # FRAMES_RULE, as everywhere
                           steps=model.steps if steps is None else steps, seed=seed, policy=policy)
    caption, caption_mask = chunk_captions(states, mask, request.chunks, model.special_tokens(),
                                           length=dit.config.caption_max_length)
    request = request.with_changes(caption=caption, caption_mask=caption_mask)
    on_step = None
    if progress:
        estimate = estimate_run(dit.config, request, passes=1, dtype=dit.dtype)
        print(estimate_line(estimate, policy.enabled), file=sys.stderr)
        on_step = Progress(estimate)
    result = generate(dit, request, on_step=on_step)
    return result, vae


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range, and ComfyUI's
MAX_FRAMES = 2400  # 100 s at 24 fps: longer is a mistake more often than a plan (time grows with it)
OUT_SUFFIX = ".mp4"


class UsageError(Exception):
    """A user error: printed as one line, ``demo.py: error: ...``, exit status 2."""


def _tau(text):
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"tau must be a number >= 0 (e.g. 0.1), got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message names the fix
        self.exit(2, f"{self.prog}: error: {message} (python demo.py --help lists the options)\n")


def build_parser():
    parser = _Parser(prog="demo.py", description=__doc__.split("\n\n")[0],
                     epilog="Errors are one line naming the fix; nothing is generated until the options check out.")
    parser.add_argument("prompt", nargs="?", help="what to generate, in the model's words (default: the model's "
                        "example prompt; README, 'Try it', lists the words each model knows)")
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL.name,
                        help="built-in model: tiny (64x64, a sprite; default) or bench (128x128, detailed scenes)")
    parser.add_argument("--out", help="the .mp4 to write, in an existing writable folder (default: "
                        "magi1_<model>_demo.mp4 in the current folder); checked before generating")
    parser.add_argument("--frames", type=int_argument("frames", 4, MAX_FRAMES), default=48,
                        help=f"video length in frames, 4 to {MAX_FRAMES} (default 48 = 2 s at 24 fps). "
                        + FRAMES_RULE.split(" A start image")[0])
    parser.add_argument("--steps", type=int_argument("steps", 4, 1000, " and a multiple of 4"),
                        help="denoising steps per chunk, a multiple of 4 (default: the model's, 16); fewer is "
                        "faster and rougher")
    parser.add_argument("--seed", type=int_argument("seed", 0, SEED_MAX), default=0,
                        help="noise seed, 0 to 2**64-1 (default 0): the same seed gives the same video")
    parser.add_argument("--mode", default=PRESET_MODE, choices=MODES,
                        help=f"cache mode (default {PRESET_MODE}); off: no cache, every token computed")
    parser.add_argument("--preset", default="slow", choices=("slow", "fast"),
                        help="cache preset (default slow; calibrated on the benchmark model: bench/results/calibration_bench.md)")
    parser.add_argument("--tau", type=_tau, help="reuse threshold (>= 0) instead of the preset's: higher, more "
                        "reuse and faster, lower, closer to no cache; needs a cache mode other than off")
    return parser


def check_out(out):
    """Refuse an ``--out`` that could not be written, before generating anything."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder: give a file name, e.g. --out {path / 'demo.mp4'}")
    if path.suffix.lower() != OUT_SUFFIX:
        raise UsageError(f"--out must end in {OUT_SUFFIX} (an H.264 mp4 is written), got {out!r}: "
                         f"try --out {path.with_suffix(OUT_SUFFIX).name}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"--out: the folder {folder} does not exist: create it (mkdir -p {folder}) or pick another")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--out: cannot write {out} (permission denied): pick a folder you can write to")


def checked_options(args):
    """The run's ``(model, out path, steps, policy)``, or UsageError naming the fix."""
    model = MODELS[args.model]
    out = args.out or f"magi1_{model.name}_demo.mp4"
    check_out(out)
    steps = model.steps if args.steps is None else args.steps
    try:
        check_steps(steps, WINDOW_SIZE)
    except ValueError as error:
        raise UsageError(f"--steps: {error}") from None
    if args.tau is not None and args.mode == "off":
        raise UsageError("--tau sets the cache's reuse threshold, and --mode off has no cache: drop --tau, "
                         "or pick a cache mode (e.g. --mode hybrid)")
    try:
        overrides = {"mode": args.mode} if args.tau is None else {"mode": args.mode, "tau": args.tau}
        policy = CachePolicy.preset(args.preset, **overrides)
    except ValueError as error:
        raise UsageError(f"--tau: {error}") from None
    return model, out, steps, policy


def fail(message, status=1):
    """Exit with one line on stderr: ``demo.py: error: <message>``."""
    print(f"demo.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        model, out, steps, policy = checked_options(args)
    except UsageError as error:
        fail(error, status=2)
    began = time.perf_counter()
    try:
        result, vae = sample(args.prompt, frames=args.frames, steps=steps, seed=args.seed, model=model,
                             policy=policy, progress=True)
        video = vae.decode(result.latent)
    except ValueError as error:  # the library's refusals name their fix
        fail(error)
    except KeyboardInterrupt:
        fail("interrupted; nothing written", status=130)
    try:
        write_mp4(video, out)
    except ImportError:
        fail("writing the mp4 needs PyAV: pip install av (or pip install -r requirements.txt)")
    print(result.stats.summary())
    print(f"wrote {out}: {video.shape[1]} frames ({args.frames} asked), {model.size}x{model.size}, in "
          f"{time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
