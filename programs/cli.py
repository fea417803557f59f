"""Generate a MAGI-1 video headless, without ComfyUI: python -m magi1 [options], from the pack's folder.

    python -m magi1 --prompt "a red ball moving right over a checkerboard" --out ball.mp4
    python -m magi1 --model ckpt/magi/4.5B_distill/inference_weight.distill --vae magi1_vae.safetensors \\
        --special-tokens special_tokens.npz --caption-states prompt.safetensors --width 720 --height 720 --out video.mp4
    torchrun --nproc-per-node 2 -m magi1 ...   (several processes, one GPU each: magi1.distributed.parallel)

The model is a built-in one (``tiny``, ``bench``: their own VAE and text encoder) or an official checkpoint,
whose prompt comes encoded in a caption-states file (``magi1.prompts.caption_states``; ComfyUI's MAGI-1 Save Caption
States node writes them). Rank 0 alone prints the report and writes files.

This program composes ``magi1`` with ``cache_core`` as demo.py does, so it imports ``cache_core`` (absolutely: the
two are top-level packages in the pack's folder); it is run, never imported by ComfyUI or by ``magi1/__init__.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from cache_core import CachePolicy

from magi1 import VideoLayout, VideoRequest, generate, load_dit, load_vae, parse_prompt_schedule, release_guidance
from magi1.planning.run_time import estimate_run, eta, format_clock
from magi1.prompts.caption_states import CaptionStates, load_caption_states
from magi1.prompts.text import SPECIAL_TOKENS_SOURCE, SpecialTokens, find_special_tokens, scheduled_caption_rows
from magi1.sampling.layout import FRAMES_RULE
from magi1.sampling.request import WINDOW_SIZE
from magi1.sampling.schedule import check_steps
from magi1.builtin import MODELS, TINY
from magi1.builtin.text_encoder import unknown_note
from magi1.video.mp4 import FPS
from magi1.video.video_out import StreamedVideo, write_video
from magi1.weights.loader import checkpoint_summary, model_description
from magi1.weights.safetensors_io import refuse_pickle

PROG = "python -m magi1"
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range, and ComfyUI's
MAX_FRAMES = 4096  # MAGI-1 Sampler's limit
CHECKPOINT_SIZE, CHECKPOINT_STEPS = 720, 16  # MAGI-1 Sampler's defaults for an official checkpoint
CACHE_PRESETS = ("slow", "fast", "default", "off")  # the names CachePolicy.preset takes
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_OUT = "magi1_video.mp4"
LATENT_KEY = "latent_tensor"  # the names ComfyUI's Save/Load Latent use: [1, 16, T, H/8, W/8]
LATENT_VERSION_KEY = "latent_format_version_0"  # its marker of an unscaled latent


class UsageError(Exception):
    """A bad option: one line, ``python -m magi1: error: ...``, exit status 2, before anything is loaded."""


@dataclass
class Run:
    """The checked options of one run."""

    builtin: Optional[object]  # a magi1.builtin.BuiltinModel, or None for a checkpoint
    checkpoint: Optional[str]
    vae: Optional[str]
    special_tokens: Optional[str]
    prompt: Optional[str]
    caption_states: Optional[CaptionStates]
    caption_states_path: Optional[str]
    request: VideoRequest  # what to generate (its captions are added once the DiT's header is read)
    text_scale: Optional[float]  # --guidance; None: the release's guidance
    cfg: int
    replicate: bool  # --replicate-weights: every process keeps every layer
    world: int  # processes (torchrun's WORLD_SIZE)
    out: Optional[str]
    latent_out: Optional[str]
    dtype: Optional[torch.dtype]
    device: torch.device
    decode: str = "during"  # --decode: each chunk decoded and written as it is finished, or after the run


# -------------------------------------------------------------------------------------------- options
def int_argument(name, low, high, hint=""):
    """An argparse type: an integer in [low, high], else a one-line error naming the valid range (demo.py's
    options use it too)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number{hint}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be in [{low}, {high}]{hint}, got {value}")
        return value
    parse.__name__ = name  # what argparse names in its own messages
    return parse


def _guidance(text):
    """An argparse type: a text guidance scale in [0, 30] (MAGI-1 Sampler's range)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 30.0:
        raise argparse.ArgumentTypeError(f"guidance must be a number in [0, 30] (the release uses 7.5), got {text!r}")
    return value


def first_process():
    """Whether this is rank 0 (or the only process): the one that reports and writes."""
    return os.environ.get("RANK", "0") == "0"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: the message names the fix; from one process
        self.exit(2, f"{self.prog}: error: {message} ({PROG} --help lists the options)\n" if first_process() else None)


def build_parser():
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                     epilog="Errors are one line naming the fix; nothing is loaded until the options check out.")
    add = parser.add_argument
    add("--model", default=TINY.name, help="tiny (default: 64x64, seconds on a CPU), bench (128x128), or an official "
        "MAGI-1 DiT checkpoint:\na .safetensors file, a sharded checkpoint's model.safetensors.index.json or its "
        "folder")
    add("--vae", help="the MAGI-1 VAE .safetensors of a checkpoint, to decode the video (built-ins carry their own)")
    add("--special-tokens", help="a checkpoint's special_tokens.npz (default: one beside the checkpoint); from\n"
        f"{SPECIAL_TOKENS_SOURCE}")
    add("--prompt", help="what to generate, through a built-in model's own text encoder (default: its example\n"
        "prompt); a prompt schedule too: lines 'N: prompt' from chunk N (24 frames each)")
    add("--caption-states", help="a caption-states .safetensors (ComfyUI: MAGI-1 Text Encode -> MAGI-1 Save Caption "
        "States),\ninstead of --prompt; any model")
    add("--frames", type=int_argument("frames", 4, MAX_FRAMES), default=48, help=f"video length, 4 to {MAX_FRAMES} "
        "frames (default 48 = 2 s at 24 fps).\n" + "\n".join(textwrap.wrap(FRAMES_RULE, 90)))
    add("--width", type=int_argument("width", 16, 4096), help="video width in pixels, a multiple of 16 (default: a "
        f"built-in's size, else {CHECKPOINT_SIZE})")
    add("--height", type=int_argument("height", 16, 4096), help="video height in pixels, a multiple of 16 (default: as for "
        "--width)")
    add("--steps", type=int_argument("steps", 4, 1000, " and a multiple of 4"), help="denoising steps per chunk, a "
        f"multiple of 4 (default: a built-in's, {TINY.steps}; for a checkpoint {CHECKPOINT_STEPS},\nsuited to "
        "distilled ones: base models were released with 64)")
    add("--seed", type=int_argument("seed", 0, SEED_MAX), default=0, help="noise seed, 0 to 2**64-1 (default 0): the "
        "same seed gives the same video")
    add("--cache", default="slow", help="the cache preset: slow (default), fast, default (the released "
        "MotionDetailCache\nconfiguration) or off (every token computed)")
    add("--guidance", type=_guidance, help="text guidance of base checkpoints, 0 to 30 (default 7.5, as "
        "released); distilled\nmodels (the built-ins too) make one pass without it")
    add("--cfg-parallel", type=int, choices=(1, 2, 3), default=1, help="with torchrun: deal a base model's three "
        "guidance passes out to 1 (default),\n2 or 3 groups of processes (it must divide the process count)")
    add("--replicate-weights", action="store_true", help="with torchrun: every process keeps every layer (default: "
        "each keeps 1/N and\nbroadcasts it when it runs; replicating is faster when the model fits each GPU)")
    add("--out", help=f"the .mp4 (H.264, {FPS} fps) to write (default: {DEFAULT_OUT}, unless only --latent-out "
        "is given)")
    add("--latent-out", help="also (or only) save the latent, a .safetensors in ComfyUI's latent layout "
        f"('{LATENT_KEY}':\nrenamed to .latent in ComfyUI/input, Load Latent reads it)")
    add("--decode", choices=("during", "after"), default="during", help="during (default): each chunk is "
        "decoded and written to the mp4\nas soon as it is finished (memory flat however long the video; the VAE "
        "shares the device\nwith the DiT); after: the whole run first, then the decode (the VAE alone on the device)")
    add("--kv-offload", action="store_true", help="keep the KV caches in host memory (slower; for GPUs short of "
        "memory)")
    add("--token-block", type=int_argument("--token-block", 128, 10 ** 6), help="the DiT's low-memory mode: "
        "its per-token work in blocks of this\nmany tokens (e.g. 8192; the same video to float rounding, a little "
        "slower)")
    add("--dtype", choices=tuple(DTYPES), default="auto", help="weights' dtype: auto (default: bfloat16 on CUDA, "
        "float32 on the CPU), bfloat16, float32")
    add("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is available, else cpu)")
    return parser


def check_out(option, path, suffix):
    """Refuse an output path that could not be written, before generating anything."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {path} is a folder: give a file name, e.g. {option} {out / ('video' + suffix)}")
    if out.suffix.lower() != suffix:
        raise UsageError(f"{option} must end in {suffix}, got {path!r}: try {option} {out.with_suffix(suffix).name}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{option}: the folder {folder} does not exist: create it (mkdir -p {folder}) or pick another")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"{option}: cannot write {path} (permission denied): pick a folder you can write to")


def check_model(args):
    """``(built-in model or None, checkpoint path or None)``; refuses options that do not fit the model."""
    builtin = MODELS.get(args.model)
    if builtin is not None:
        for option, value in (("--vae", args.vae), ("--special-tokens", args.special_tokens)):
            if value is not None:
                raise UsageError(f"{option}: the built-in models carry their own: drop {option}")
        if args.guidance is not None or args.cfg_parallel > 1:
            option = "--guidance" if args.guidance is not None else "--cfg-parallel"
            raise UsageError(f"{option} applies to base models' three guidance passes, and the built-in models are "
                             f"distilled (one pass): drop {option}")
        return builtin, None
    if not os.path.exists(args.model):
        raise UsageError(f"--model: {args.model!r} is neither a built-in model ({', '.join(MODELS)}) nor an existing "
                         "checkpoint file or folder")
    try:
        refuse_pickle(args.model)
    except ValueError as error:
        raise UsageError(f"--model: {error}") from None
    if args.prompt is not None or args.caption_states is None:
        raise UsageError("a checkpoint reads T5-XXL states, and this program has no T5: encode the prompt in ComfyUI "
                         "(MAGI-1 Text Encode -> MAGI-1 Save Caption States) and give --caption-states FILE "
                         "instead of --prompt")
    return None, args.model


def check_checkpoint_files(args, checkpoint, out):
    """A checkpoint's VAE (when a video is written) and special-token table: ``(vae, special tokens)``."""
    if args.vae is not None and not os.path.isfile(args.vae):
        raise UsageError(f"--vae: no file at {args.vae}")
    if out is not None and args.vae is None:
        raise UsageError("writing a checkpoint's video needs its VAE: add --vae PATH (MAGI-1's "
                         "diffusion_pytorch_model.safetensors), or save only the latent with --latent-out FILE")
    tokens = args.special_tokens
    if tokens is None:
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
        try:
            tokens = find_special_tokens([folder])
        except FileNotFoundError:
            raise UsageError(f"a checkpoint needs MAGI-1's special-token table: download special_tokens.npz from "
                             f"{SPECIAL_TOKENS_SOURCE} and give --special-tokens PATH (or put it in {folder})"
                             ) from None
    elif not os.path.isfile(tokens):
        raise UsageError(f"--special-tokens: no file at {tokens}")
    return args.vae, tokens


def check_prompt(args):
    """``(prompt text or None, CaptionStates or None)``: a caption-states file is read and checked here."""
    if args.prompt is not None and args.caption_states is not None:
        raise UsageError("give --prompt or --caption-states, not both")
    if args.caption_states is None:
        try:
            parse_prompt_schedule(args.prompt or "")
        except ValueError as error:
            raise UsageError(f"--prompt: {error}") from None
        return args.prompt, None
    try:
        return None, load_caption_states(args.caption_states)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--caption-states: {error}") from None


def check_size(args, builtin):
    """``(width, height, steps)`` with the model's defaults, checked as the sampler will."""
    size = builtin.size if builtin else CHECKPOINT_SIZE
    width = args.width if args.width is not None else size
    height = args.height if args.height is not None else size
    steps = args.steps if args.steps is not None else builtin.steps if builtin else CHECKPOINT_STEPS
    try:
        VideoLayout.plan(4, height, width)
    except ValueError as error:
        raise UsageError(f"--width/--height: {error}") from None
    try:
        check_steps(steps, WINDOW_SIZE)
    except ValueError as error:
        raise UsageError(f"--steps: {error}") from None
    return width, height, steps


def check_device(args, environ, world):
    """The torch device of this process: ``--device`` (``cuda`` meaning ``cuda:LOCAL_RANK``), else cuda:LOCAL_RANK
    when CUDA is available, else the CPU."""
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {text!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: {text!r}: this program runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: this PyTorch sees no CUDA GPU: give --device cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda" and world > 1:
        raise UsageError(f"--device {text}: with several processes each takes cuda:LOCAL_RANK: give --device cuda")
    return device


def world_size(environ=os.environ):
    """The process count torchrun gives (``WORLD_SIZE``; 1 without torchrun)."""
    try:
        return int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE must be a whole number, got {environ['WORLD_SIZE']!r}") from None


def check_parallel(args, environ):
    """The process count: a multiple of ``--cfg-parallel``."""
    world = world_size(environ)
    cfg = args.cfg_parallel
    if world % cfg:
        raise UsageError(f"--cfg-parallel {cfg} needs a multiple of {cfg} processes, this run has {world}: torchrun "
                         f"--nproc-per-node {cfg * max(1, world // cfg)} -m magi1 ... (or drop --cfg-parallel)")
    return world


def checked_options(args, environ=os.environ):
    """The run's options, checked (nothing is loaded but a caption-states file), or a UsageError naming the fix."""
    world = check_parallel(args, environ)
    builtin, checkpoint = check_model(args)
    prompt, caption_states = check_prompt(args)
    out = args.out if args.out is not None else (None if args.latent_out is not None else DEFAULT_OUT)
    for option, path, suffix in (("--out", out, ".mp4"), ("--latent-out", args.latent_out, ".safetensors")):
        if path is not None:
            check_out(option, path, suffix)
    vae, tokens = check_checkpoint_files(args, checkpoint, out) if checkpoint else (None, None)
    width, height, steps = check_size(args, builtin)
    if args.cache not in CACHE_PRESETS:
        raise UsageError(f"--cache must be one of {', '.join(CACHE_PRESETS)}, got {args.cache!r}")
    return Run(builtin=builtin, checkpoint=checkpoint, vae=vae, special_tokens=tokens, prompt=prompt,
               caption_states=caption_states, caption_states_path=args.caption_states,
               request=VideoRequest(frames=args.frames, width=width, height=height, steps=steps, seed=args.seed,
                                    guidance=release_guidance(args.guidance), policy=CachePolicy.preset(args.cache),
                                    kv_offload=args.kv_offload, token_block=args.token_block),
               text_scale=args.guidance, cfg=args.cfg_parallel, replicate=args.replicate_weights, world=world, out=out,
               latent_out=args.latent_out, dtype=DTYPES[args.dtype], device=check_device(args, environ, world),
               decode=args.decode)


# ------------------------------------------------------------------------------------------ the run
def start_parallel(run):
    """This process's ``magi1.distributed.parallel.Parallel`` under torchrun, else None (a single process)."""
    if run.world == 1:
        return None
    from magi1.distributed.parallel import Parallel  # only multi-process runs need torch.distributed set up

    return Parallel.from_environment(cfg=run.cfg, device=run.device, shard_weights=not run.replicate)


def dit_header(run):
    """``(ModelConfig, distilled, why)`` of the run's DiT from its files' headers, as ``load_dit`` reads them
    (no tensor is read): for the checks and the time estimate before loading."""
    if run.builtin is not None:
        return checkpoint_summary(run.builtin.dit_file, distill=True)[0], True, "a built-in model"
    return checkpoint_summary(run.checkpoint)


def load_models(run, par):
    """``(DiT, VAE or None)``; the VAE is read on rank 0 alone (it decodes), into host memory until the latent
    is made."""
    extra = {} if par is None else {"parallel": par}  # each rank reads only its share of the weights
    main = par is None or par.is_main
    wants_vae = main and run.out is not None
    if run.builtin is not None:
        dit = run.builtin.load_dit(device=run.device, dtype=run.dtype, **extra)
        vae = run.builtin.load_vae(device="cpu", dtype=_compute_dtype(run)) if wants_vae else None
        return dit, vae
    dit = load_dit(run.checkpoint, device=run.device, dtype=run.dtype, **extra)
    vae = load_vae(run.vae, device="cpu", dtype=_compute_dtype(run)) if wants_vae else None
    return dit, vae


def _compute_dtype(run):
    if run.dtype is not None:
        return run.dtype
    return torch.bfloat16 if run.device.type == "cuda" else torch.float32  # load_dit's and load_vae's rule


def prompt_states(run):
    """``(CaptionStates, unknown words)``: the file's, or ``--prompt`` through the built-in's text encoder,
    one entry per scheduled prompt as MAGI-1 Tiny Text Encode makes them."""
    if run.caption_states is not None:
        return run.caption_states, []
    encoder = run.builtin.load_text_encoder()
    text = run.builtin.example_prompt if run.prompt is None else run.prompt
    schedule = parse_prompt_schedule(text)
    positive = tuple((first, *encoder.encode(prompt)) for first, prompt in schedule)
    unknown = sorted({word for _, prompt in schedule for word in encoder.unknown_words(prompt)})
    return CaptionStates(positive), unknown


def captions(run, config, distill, tokens):
    """The request's captions (``{"caption", "negative_caption"}``, as MAGI-1 Sampler builds them) and the
    report's notes about the prompt, for the DiT of ``config``."""
    states, unknown = prompt_states(run)
    if states.width != config.caption_channels:
        source = f"the caption states in {run.caption_states_path}" if run.caption_states else "the prompt's states"
        raise ValueError(f"{source} are {states.width} wide but this model reads {config.caption_channels}-wide ones: "
                         + ("encode the prompt with T5-XXL (MAGI-1 Text Encode)" if config.caption_channels == 4096
                            else "encode it for this built-in model (--prompt)"))
    chunks = run.request.chunks
    caption = scheduled_caption_rows(list(states.positive), chunks, tokens, length=config.caption_max_length)
    negative = None if states.negative is None else scheduled_caption_rows(list(states.negative), chunks,
                                                                           length=config.caption_max_length)
    unused = states.unused_prompts(chunks)
    notes = [unknown and unknown_note(unknown),
             unused and f"the prompts scheduled from chunks {unused} are not used: this run makes {chunks} chunks",
             states.negative and distill and "the negative prompt is not used: distilled models make one pass",
             run.text_scale is not None and distill and "--guidance is not used: distilled models make one pass"]
    return dict(caption=caption, negative_caption=negative), [note for note in notes if note]


def sample(run, par):
    """Check the prompt against the DiT's header, estimate the time (rank 0, on stderr), load and generate with
    progress lines: ``(latent, VAE or None, report lines)`` (the VAE on rank 0 alone)."""
    config, distill, why = dit_header(run)
    if run.cfg > 1 and distill:
        raise ValueError(f"--cfg-parallel {run.cfg} needs a base model, and this one is distilled ({why}; one "
                         "guidance pass): drop --cfg-parallel")
    tokens = run.builtin.special_tokens() if run.builtin is not None else SpecialTokens.load(run.special_tokens)
    prompt, notes = captions(run, config, distill, tokens)
    request = run.request.with_changes(**prompt)
    estimate = None
    if par is None or par.is_main:
        estimate = estimate_run(config, request, passes=1 if distill else 3, device=run.device,
                                dtype=_compute_dtype(run), processes=run.world)
        print(estimate_line(estimate, request.reuse != "off"), file=sys.stderr, flush=True)
    dit, vae = load_models(run, par)
    extra = {} if par is None else {"parallel": par}
    video = start_video(run, vae) if vae is not None and run.decode == "during" else None
    progress = Progress(estimate) if estimate is not None else None  # its clock starts here
    try:
        result = generate(dit, request, on_step=progress, on_frames=video, **extra)
    except BaseException:
        if video is not None:
            video.abort()
        raise
    finally:
        if progress is not None:
            progress.close()
    variant = model_description(dit)  # as MAGI-1 Sampler's report names it
    lines = [result.stats.summary(),
             f"MAGI-1 model: {variant}; frames: {request.frames_report(result.latent.shape[1])}, "
             f"{request.width}x{request.height}, {request.steps} steps, seed {request.seed}"]
    return result.latent, video or vae, lines + [f"MAGI-1 note: {note}" for note in notes]


def start_video(run, vae):
    """The mp4 written during the run (rank 0): each finished chunk decoded with the seamless tiling."""
    latent_frames = run.request.layout().latent_frames
    return StreamedVideo(vae.to(run.device), run.out, total_latent_frames=latent_frames,
                         keep_frames=vae.decoded_frames(latent_frames))


# ------------------------------------------------------------------------------------ time and progress
def estimate_line(estimate, cached):
    """The line printed before loading: the estimate of the DiT's time, and what it leaves out."""
    chunks = f"{estimate.chunks} chunk{'s' * (estimate.chunks > 1)}"
    saving = ": the cache skips some of it" if cached else ""
    return (f"estimated time: {estimate} for the DiT ({chunks} in {estimate.forward_steps} steps, every token "
            f"counted{saving}; decoding adds some)")


class Progress:
    """``generate``'s ``on_step`` (rank 0): a line on ``stream`` each time a chunk is finished, with the time
    elapsed and an ETA from the measured pace (spread over the steps by the estimate's FLOPs); on a terminal
    also one live line, rewritten after every step, saying which chunks are being denoised."""

    def __init__(self, estimate, stream=None, clock=time.perf_counter):
        self.estimate, self.stream, self.clock = estimate, stream if stream is not None else sys.stderr, clock
        self.live = self.stream.isatty()
        self.began, self.done, self.shown = clock(), 0, 0  # shown: the live line's length, 0 when none

    def __call__(self, progress):
        elapsed = self.clock() - self.began
        step = min(progress.step, self.estimate.forward_steps - 1)
        times, left = f"{format_clock(elapsed)} elapsed", eta(self.estimate, step, elapsed)
        if progress.step + 1 < progress.total and left is not None:
            times += f", ETA {format_clock(left)}"
        total = self.estimate.chunks
        while self.done < self.estimate.chunks_done[step]:
            self.done += 1
            self._write(f"chunk {self.done}/{total} done, {times}", "\n")
        if self.live and progress.step + 1 < progress.total:
            first, end = (c - self.estimate.chunk_offset + 1 for c in progress.chunks)
            which = f"chunk {first}" if end == first + 1 else f"chunks {first}-{end - 1}"
            self._write(f"step {progress.step + 1}/{progress.total}, denoising {which} of {total}, {times}", "")

    def close(self):
        """End a live line left open (an error or an interrupt comes next)."""
        if self.shown:
            self._write("", "\n")

    def _write(self, text, end):
        if self.live:
            text = "\r" + text.ljust(self.shown)
            self.shown = 0 if end else len(text) - 1
        self.stream.write(text + end)
        self.stream.flush()


def save_latent(latent, path, run):
    """The latent as ComfyUI's Save Latent writes it (Load Latent reads it back for MAGI-1 Decode, from a file
    named ``*.latent`` in ComfyUI's input folder)."""
    r = run.request
    metadata = {"magi1_frames": str(latent.shape[1] * 4), "magi1_width": str(r.width), "magi1_height": str(r.height),
                "magi1_seed": str(r.seed), "magi1_steps": str(r.steps)}
    save_file({LATENT_KEY: latent[None].float().cpu().contiguous(), LATENT_VERSION_KEY: torch.tensor([])}, path,
              metadata=metadata)


def fail(message, status=1, rank=None):
    """Exit with one line on stderr: ``python -m magi1: error: <message>`` (naming the rank when several run)."""
    where = f" (rank {rank})" if rank is not None else ""
    print(f"{PROG}: error{where}: {message}", file=sys.stderr)
    sys.exit(status)


def write_outputs(run, latent, video, began):
    """Rank 0's files: the latent, then the decoded video (``video``: the ``StreamedVideo`` written during the
    run, or the VAE to decode with now); a line for each."""
    lines = []
    if run.latent_out is not None:
        save_latent(latent, run.latent_out, run)
        lines.append(f"wrote {run.latent_out}: latent {[1, *latent.shape]}")
    if run.out is not None:
        if isinstance(video, StreamedVideo):
            try:
                frames = video.finish()
            except BaseException:
                video.abort()
                raise
        else:  # the latent stays in host memory: a tile's latents go to the VAE at a time
            frames = write_video(video.to(run.device), latent, run.out, keep_frames=video.decoded_frames(latent.shape[1]))
        lines.append(f"wrote {run.out}: {frames} frames, {run.request.width}x{run.request.height}, "
                     f"in {time.perf_counter() - began:.1f} s")
    return lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run = checked_options(args)
    except UsageError as error:
        if first_process():  # every process checks the same options: one says so
            print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(2)
    named_rank = os.environ.get("RANK") if run.world > 1 else None  # runtime errors may differ between processes
    began, par, done = time.perf_counter(), None, False
    try:
        par = start_parallel(run)
        latent, vae, lines = sample(run, par)
        if par is None or par.is_main:
            print("\n".join(lines + write_outputs(run, latent, vae, began)))
        done = True
    except (ValueError, FileNotFoundError) as error:  # the library's refusals name their fix
        fail(error, rank=named_rank)
    except ImportError as error:
        fail(f"{error}: pip install -r requirements.txt (writing the mp4 needs PyAV: pip install av)", rank=named_rank)
    except KeyboardInterrupt:
        fail("interrupted; nothing written", status=130, rank=named_rank)
    finally:
        if par is not None:
            par.close(wait=done)


if __name__ == "__main__":
    main()
