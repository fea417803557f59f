"""MAGI1Sampler: the autoregressive MAGI-1 sampler as a node (its prefix comes encoded, from nodes/vae.py)."""

import logging
import math

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..magi1 import VideoRequest, generate, release_guidance
from ..magi1.planning.run_time import estimate_run
from ..magi1.prompts.text import scheduled_caption_rows
from ..magi1.sampling.layout import FRAMES_RULE, check_pixel_size
from ..magi1.sampling.request import WINDOW_SIZE
from ..magi1.sampling.schedule import check_steps
from .cache_policy import POLICY_KEY
from .loaders import MAGI1_VAE
from .memory_check import checked_plan, weights_line
from .multi_gpu import MULTI_GPU_KEY, sample_on_workers
from .preview import LivePreview
from .queue_checks import CheckedNode
from .vae import size_problems
from .t5 import T5_KEY
from .text_encode import ENCODER_KEY, FIRST_CHUNK_KEY, UNKNOWN_WORDS_KEY, unknown_note

T5_WIDTH = 4096  # what the official checkpoints read
REMOVED_INPUTS = ("vae", "start_image", "prefix_video")  # the sampler's image inputs before 0.2.0
SIZE_CHECKS = {"width": check_pixel_size, "height": check_pixel_size,  # what execution would refuse
               "steps": lambda name, steps: check_steps(steps, WINDOW_SIZE)}
LIMITS = {"width": (16, 4096), "height": (16, 4096), "steps": (4, 1000)}  # the widgets' ranges


def conditioning_states(conditioning, name, width):
    """The text states ``(L, D)`` and mask ``(L,)`` of the first entry of a CONDITIONING, checked against
    the width the DiT reads (4096 for T5-XXL, 64 for the tiny demo model)."""
    if not conditioning:
        raise ValueError(f"{name} is empty; connect MAGI-1 Text Encode")
    states, options = conditioning[0][0], conditioning[0][1]
    mask = options.get("attention_mask")
    if mask is None:
        raise ValueError(f"{name} has no attention mask: encode the prompt with MAGI-1 Text Encode (T5-XXL loaded "
                         "with CLIPLoader, type 'mochi')")
    if states.shape[-2] != mask.shape[-1]:
        raise ValueError(
            f"{name} holds {states.shape[-2]} text states but an attention mask of {mask.shape[-1]} (e.g. from "
            "ConditioningConcat, which joins the states but not the masks): connect MAGI-1 Text Encode directly; "
            "for prompts that change over the video, write a prompt schedule in it")
    if states.shape[-1] != width:
        raise ValueError(
            f"{name} holds {states.shape[-1]}-wide text states but this model reads {width}-wide ones: encode the "
            "prompt with " + ("MAGI-1 Tiny Text Encode (the built-in tiny model has its own text encoder)"
                              if width != T5_WIDTH else "MAGI-1 Text Encode and T5-XXL (CLIPLoader, type 'mochi')"))
    return states[0], mask[0]


def conditioning_schedule(conditioning, name, width):
    """``[(first_chunk, states, mask), ...]`` of a CONDITIONING from MAGI-1 Text Encode: one prompt for every
    chunk, or a prompt schedule (entries carrying their first chunk). What the sampler cannot apply is
    refused (``check_entries``)."""
    if not conditioning:
        raise ValueError(f"{name} is empty; connect MAGI-1 Text Encode")
    check_entries(conditioning, name)
    scheduled = [entry for entry in conditioning if FIRST_CHUNK_KEY in entry[1]]
    if not scheduled:
        return [(0, *conditioning_states(conditioning, name, width))]
    return sorted(((int(entry[1][FIRST_CHUNK_KEY]), *conditioning_states([entry], name, width)) for entry in scheduled),
                  key=lambda item: item[0])


# Options of a CONDITIONING entry the sampler reads or that change nothing for MAGI-1; every other one was set by
# a node whose effect the sampler does not apply, and is named in the report (or refused: TIMESTEP_RANGE).
READ_OPTIONS = {"attention_mask", "pooled_output", FIRST_CHUNK_KEY, UNKNOWN_WORDS_KEY, ENCODER_KEY}
TIMESTEP_RANGE = ("start_percent", "end_percent")  # ConditioningSetTimestepRange


def check_entries(conditioning, name):
    """Refuse what would silently change the prompt: several prompts that are not a prompt schedule (e.g.
    ConditioningCombine, of which only the first would be read) and a timestep range."""
    plain = [entry for entry in conditioning if FIRST_CHUNK_KEY not in entry[1]]
    if len(plain) > 1 or (plain and len(plain) < len(conditioning)):
        raise ValueError(
            f"{name} holds {len(conditioning)} prompts (e.g. from ConditioningCombine), and MAGI-1 Sampler reads one "
            "prompt per chunk: for prompts that change over the video, write a prompt schedule in one MAGI-1 Text "
            "Encode ('0: first prompt', '2: second prompt', ...); otherwise connect one prompt")
    for entry in conditioning:
        start, end = (entry[1].get(key) for key in TIMESTEP_RANGE)
        if (start is not None and start > 0) or (end is not None and end < 1):
            raise ValueError(
                f"{name} carries a timestep range ({start} to {end}, from ConditioningSetTimestepRange), which MAGI-1 "
                "Sampler does not apply (every chunk reads its prompt at every step): remove that node; to change "
                "the prompt over the video, use a prompt schedule in MAGI-1 Text Encode")


def check_encoder(conditioning, name, builtin, caption_channels):
    """The prompt must come from the text encoder of this model: the built-in model's own encoder for a
    built-in one (``builtin``: its name, else None), T5-XXL for a checkpoint that reads T5's 4096-wide
    states. Otherwise (entries of other nodes, which name no encoder; a checkpoint of another width) the
    states are checked by their width alone (``conditioning_states``)."""
    if builtin is None and caption_channels != T5_WIDTH:
        return
    wanted = builtin or T5_KEY
    for entry in conditioning:
        encoder = entry[1].get(ENCODER_KEY)
        if encoder is None or encoder == wanted:
            continue
        if builtin is None:
            fix = "encode it with MAGI-1 Text Encode and T5-XXL (CLIPLoader, type 'mochi')"
        elif encoder == T5_KEY:
            fix = f"encode it with MAGI-1 Tiny Text Encode, model {builtin}"
        else:
            fix = f"set MAGI-1 Tiny Text Encode's model to {builtin}"
        made_by = "T5-XXL" if encoder == T5_KEY else f"the built-in {encoder} model's text encoder"
        this = f"the built-in {builtin} model" if builtin else "this checkpoint, which reads T5-XXL prompts"
        raise ValueError(f"{name} was encoded by {made_by}, but the DiT is {this}: {fix}")


def conditioning_notes(conditioning, chunks):
    """Report lines about the prompt: what the tiny encoder could not read, scheduled prompts this run does
    not reach, options of other nodes the sampler does not apply."""
    unknown = sorted({word for entry in conditioning for word in entry[1].get(UNKNOWN_WORDS_KEY, [])})
    unused = sorted(entry[1][FIRST_CHUNK_KEY] for entry in conditioning
                    if entry[1].get(FIRST_CHUNK_KEY, 0) >= chunks)
    ignored = sorted({key for entry in conditioning for key, value in entry[1].items()
                      if key not in READ_OPTIONS and key not in TIMESTEP_RANGE and value is not None})
    return [unknown and unknown_note(unknown),
            unused and f"the prompts scheduled from chunks {unused} are not used: this run makes {chunks} chunks",
            ignored and f"the prompt carries options the sampler does not apply (set by other conditioning nodes): "
                        f"{ignored}"]


def prefix_latents(prefix_latent, width, height, channels):
    """The clean latents ``[C, P, h, w]`` of a prefix LATENT from MAGI-1 Encode Prefix, checked against the
    video size and the DiT's latent channels; None for text-to-video."""
    if prefix_latent is None:
        return None
    samples = prefix_latent["samples"]
    if samples.dim() != 5 or samples.shape[0] != 1 or samples.shape[1] != channels:
        raise ValueError(f"prefix_latent must be one MAGI-1 latent [1, {channels}, frames, h, w], got "
                         f"{list(samples.shape)}: make it with MAGI-1 Encode Prefix")
    encoded = (samples.shape[4] * 8, samples.shape[3] * 8)  # (width, height) in pixels
    if encoded != (width, height):
        raise ValueError(
            f"the prefix latent was encoded at {encoded[0]}x{encoded[1]} but the sampler makes {width}x{height}: "
            f"set MAGI-1 Encode Prefix's width/height to {width}x{height} (or the sampler's to "
            f"{encoded[0]}x{encoded[1]})")
    return samples[0].float()


MASK_PREVIEW_WIDTH = 384  # pixels: one cell per token is a few pixels wide, too small to see in a node


def visible(frames):
    """Mask frames ``(N, H, W)`` enlarged by a whole factor (nearest: each token a sharp block) to about
    ``MASK_PREVIEW_WIDTH`` pixels wide."""
    factor = max(1, MASK_PREVIEW_WIDTH // frames.shape[-1])
    return frames.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


WARN_SECONDS = 600  # a run estimated longer is named in the log and the report, with the estimate
# On the CPU, a run estimated longer is refused: hours, even if the cache (not counted) halved it. A GPU's long
# runs are the user's call (24B base at 720p takes hours on one card).
CPU_REFUSED_SECONDS = 4 * 3600


def checked_time(dit, device, request):
    """The run's estimated time on ``device`` (``magi1.planning.run_time``): None when short, a note when long, a
    ValueError naming the estimate and the fix when it would take over 4 hours on the CPU."""
    try:
        estimate = estimate_run(dit.config, request, passes=1 if dit.distill else 3, device=device, dtype=dit.dtype)
    except torch.cuda.OutOfMemoryError:  # its matrix-product measurement found no room: no estimate, no check
        logging.info("MAGI-1 Sampler: no time estimate (the GPU is full before the run)")
        return None
    if estimate.seconds > CPU_REFUSED_SECONDS and device.type == "cpu":
        raise ValueError(
            f"MAGI-1 Sampler: this run would take {estimate.describe()} (an estimate from its "
            f"{estimate.flops / 1e12:.0f} TFLOP; a cache policy saves part of it): make the video smaller "
            f"(width x height: {request.width}x{request.height}), shorter (frames) or use fewer steps, or run on a GPU")
    if estimate.seconds > WARN_SECONDS:
        note = f"this run is estimated to take {estimate.describe()} (the DiT alone, without the cache's savings)"
        logging.warning("MAGI-1 Sampler: %s", note)
        return note
    return None


def special_tokens(model):
    """The special-token table MAGI-1 DiT Loader attached to the MODEL (it is found once, at load)."""
    tokens = getattr(model.model, "special_tokens", None)
    if tokens is None:
        raise ValueError(
            "this MODEL carries no MAGI-1 special-token table: load it with MAGI-1 DiT Loader, which reads "
            "special_tokens.npz from models/text_encoders (download it from "
            "https://github.com/SandAI-org/MAGI-1/blob/main/example/assets/special_tokens.npz)")
    return tokens


class MAGI1Sampler(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1Sampler",
            display_name="MAGI-1 Sampler",
            category="MAGI-1",
            description=("Generates a MAGI-1 video chunk by chunk (text-to-video, or from a start image or a prefix "
                         "video encoded by MAGI-1 Encode Prefix), applying the model's cache policy if MAGI-1 "
                         "MotionDetailCache set one."),
            inputs=[
                io.Model.Input("model", tooltip="A MAGI-1 model from MAGI-1 DiT Loader (optionally through the cache)."),
                io.Conditioning.Input("positive", tooltip="The prompt, from MAGI-1 Text Encode."),
                io.Int.Input("width", default=720, min=LIMITS["width"][0], max=LIMITS["width"][1], step=16, tooltip=(
                    "Video width in pixels: a multiple of 16 (other values are refused when queued, naming the "
                    "nearest). Memory and time grow with width x height; a run that cannot fit is refused "
                    "before it starts.")),
                io.Int.Input("height", default=720, min=LIMITS["height"][0], max=LIMITS["height"][1], step=16, tooltip=(
                    "Video height in pixels: a multiple of 16 (other values are refused when queued).")),
                io.Int.Input("frames", default=96, min=4, max=4096, step=4, tooltip=(
                    "Frames of the video (24 per second). " + FRAMES_RULE + " The report says how many were made.")),
                io.Int.Input("steps", default=16, min=LIMITS["steps"][0], max=LIMITS["steps"][1], step=4, tooltip=(
                    "Denoising steps per chunk, a multiple of 4 (others are refused when queued): 64 as "
                    "released for base models; 8, 12 or 16 for distilled ones. More = slower, usually cleaner.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=(
                    "The noise seed; the same seed gives the same video on any device.")),
                io.Float.Input("guidance", default=7.5, min=0.0, max=30.0, step=0.1, tooltip=(
                    "Text guidance of base models (3 passes) while a chunk is below t = 0.3; the release uses 7.5. "
                    "Higher follows the prompt more, with harsher colours. Distilled models ignore it.")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "Optional negative prompt for base models; without it the learned null caption is used, "
                    "as released.")),
                io.Latent.Input("prefix_latent", optional=True, tooltip=(
                    "Image-to-video or video continuation: the start image or frames to continue from, from "
                    "MAGI-1 Encode Prefix at this width and height (or the latent of an earlier run, to continue "
                    "it). Unconnected: text-to-video.")),
                io.Boolean.Input("record_masks", default=False, optional=True, tooltip=(
                    "Output one frame per step showing where the cache computed (white) or reused (black).")),
                io.Boolean.Input("kv_offload", default=False, optional=True, tooltip=(
                    "Keep the KV cache in CPU memory: fits longer videos on small GPUs, a little slower.")),
                MAGI1_VAE.Input("preview_vae", optional=True, tooltip=(
                    "Optional: the MAGI-1 VAE, for live previews of the chunk being denoised (a latent-to-RGB "
                    "projection fitted once from this VAE). Shown when ComfyUI's preview method is not 'none' "
                    "(e.g. --preview-method auto). Unconnected: no previews.")),
                io.Int.Input("token_block", default=0, min=0, max=1 << 20, step=1024, optional=True, tooltip=(
                    "Low-memory mode: 0 (default) off; e.g. 8192 runs the DiT's per-token work (MLP, "
                    "projections, norms) in blocks of this many tokens: far less activation memory (24B at "
                    "720x1280: 19 GB -> 7 GB planned), the same video up to float rounding, a little slower. "
                    "The memory check suggests it when a run does not fit.")),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The generated MAGI-1 latents, for MAGI-1 Decode."),
                io.String.Output(display_name="cache_report", tooltip="Share of work computed, FLOP saving, time."),
                io.Image.Output(display_name="cache_masks", tooltip=(
                    "With record_masks: per step, the window's chunks as rows of latent frames (oldest on top); "
                    "white computed, black reused, grey idle.")),
            ],
        )

    @classmethod
    def input_rules(cls, values):
        # A prompt saved before 0.2.0 may still wire these removed inputs (ComfyUI passes undeclared linked
        # inputs to validate_inputs too): refused at queue time saying where they went.
        problems = {name: (f"MAGI-1 Sampler no longer takes {name} (pack 0.2.0): connect it to MAGI-1 Encode "
                           "Prefix, and its prefix_latent to the sampler's prefix_latent")
                    for name in REMOVED_INPUTS if name in values}
        return {**problems, **size_problems(values, SIZE_CHECKS)}

    @classmethod
    def execute(cls, model, positive, width, height, frames, steps, seed, guidance, negative=None,
                prefix_latent=None, record_masks=False, kv_offload=False, preview_vae=None,
                token_block=0) -> io.NodeOutput:
        policy = model.model_options.get("transformer_options", {}).get(POLICY_KEY)
        workers = model.model_options.get("transformer_options", {}).get(MULTI_GPU_KEY)  # MAGI-1 Multi-GPU
        dit = getattr(model.model, "diffusion_model", None)
        if not hasattr(dit, "y_embedder"):
            raise ValueError("MAGI-1 Sampler needs a model from MAGI-1 DiT Loader")
        config = dit.config
        tokens = special_tokens(model)
        if not math.isfinite(guidance):
            raise ValueError(f"MAGI-1 Sampler: guidance must be a finite number, got {guidance}: set it to 7.5 "
                             "(the release's) or another value from 0 to 30")
        builtin = (getattr(model.model, "source", None) or {}).get("builtin")
        for name, conditioning in (("positive", positive), ("negative", negative)):
            if conditioning is not None:  # before anything loads: a prompt this run cannot use is refused now
                check_entries(conditioning, name)
                check_encoder(conditioning, name, builtin, config.caption_channels)
        request = VideoRequest(frames=frames, width=width, height=height, steps=steps, seed=seed,
                               prefix=prefix_latents(prefix_latent, width, height, config.latent_channels),
                               guidance=release_guidance(guidance), policy=policy, kv_offload=kv_offload,
                               token_block=token_block or None, record_masks=record_masks)
        chunks = request.chunks  # FRAMES_RULE: whole chunks; the captions are made for them
        request = request.with_changes(**run_captions(positive, negative, chunks, tokens, config))
        plan = plan_note = time_note = None
        if workers is None:
            plan, plan_note, run_bytes = checked_plan(model, dit, request)
            time_note = checked_time(dit, model.load_device, request)
            # ComfyUI frees what the run needs beside the weights, and loads the weights partially if they do not fit.
            mm.load_models_gpu([model], memory_required=run_bytes, minimum_memory_required=run_bytes)
            dit.configure(execution_device=model.load_device)  # where it computes, whatever stays in host memory
            latent, summary, mask_frames = run_here(dit, request, preview_vae)
            run_lines, notes = [], []
        else:  # each worker loads its share of the model on its own GPU: nothing is loaded here, and the memory
            # check of one device does not apply
            latent, summary, mask_frames, run_lines, notes = run_on_workers(model, workers, request, preview_vae)
        samples = {"samples": latent[None].to(mm.intermediate_device())}
        if record_masks and mask_frames is not None:
            masks = visible(mask_frames)[..., None].expand(-1, -1, -1, 3).contiguous()
        else:
            masks = torch.zeros(1, 8, 8, 3)
        notes = [plan_note, time_note, *notes, policy.unreached_token_phase(steps) if policy is not None else None,
                 *conditioning_notes(positive, chunks)]
        lines = [summary, f"MAGI-1 frames: {request.frames_report(latent.shape[1])}", *run_lines,
                 weights_line(dit, model.load_device)]
        report = "\n".join(lines + [f"MAGI-1 note: {note}" for note in notes if note]
                           + (plan.lines() if plan is not None else []))
        return io.NodeOutput(samples, report, masks)


def run_captions(positive, negative, chunks, tokens, config):
    """The request's captions: per chunk, from the prompt (and the negative prompt, if any), as
    ``ChunkCaptions`` (a prompt's distinct rows, not one per chunk: a long video's are no larger)."""
    caption = scheduled_caption_rows(conditioning_schedule(positive, "positive", config.caption_channels), chunks,
                                     tokens, length=config.caption_max_length)
    negative_caption = None
    if negative is not None:
        negative_caption = scheduled_caption_rows(conditioning_schedule(negative, "negative", config.caption_channels),
                                                  chunks, length=config.caption_max_length)
    return dict(caption=caption, caption_mask=None, negative_caption=negative_caption, negative_mask=None)


def run_here(dit, request, preview_vae):
    """The run in this process, on the model's device: ``(latent, summary, mask frames or None)``."""
    progress = comfy.utils.ProgressBar(1)
    live_preview = LivePreview(preview_vae)  # gives None each step without a VAE or with previews off

    def on_step(step):  # ComfyUI's interrupt point; the sampler frees its state when it raises
        mm.throw_exception_if_processing_interrupted()
        progress.update_absolute(step.step + 1, step.total, live_preview(step))

    result = generate(dit, request, on_step=on_step,
                      stop=mm.throw_exception_if_processing_interrupted)  # polled inside every DiT call too
    masks = result.stats.masks.window_frames() if request.record_masks else None
    return result.latent, result.stats.summary(), masks


def run_on_workers(model, workers, request, preview_vae):
    """The run on the worker processes of MAGI-1 Multi-GPU: ``(latent, summary, mask frames or None, report
    lines, notes)``."""
    tensors, summary = sample_on_workers(model, workers, request, comfy.utils.ProgressBar(1))
    where = (f"CUDA devices {workers['devices']}" if workers["devices"] is not None else
             f"the first {workers['workers']} CUDA devices" if torch.cuda.is_available() else "the CPU (gloo)")
    lines = [f"MAGI-1 ran on {workers['workers']} worker processes ({where}; cfg parallel {workers['cfg_parallel']})"]
    notes = ["live previews are not shown when the sampler runs on several GPUs" if preview_vae is not None else None,
             "the cache masks did not come back from the workers" if request.record_masks and "masks" not in tensors
             else None]
    return tensors["latent"], summary, tensors.get("masks"), lines, notes
