"""The autoregressive MAGI-1 sampling loop, as released, with token reuse applied during denoising.

The latent video is split into chunks of ``chunk_width`` latent frames, denoised in a staggered window
(``magi1.sampling.schedule``): at every forward step the window's chunks, each at its own time, go through the
DiT together and take one Euler step ``x += v * (t[s + 1] - t[s])``. Clean chunks leave the window and
are re-encoded once at ``clean_t`` into the KV cache that later chunks attend to.

This module is the loop: plan the window, get its velocities, integrate, report. Its helpers each
have one job: ``guidance`` (the guidance passes and the KV caches they read and write), ``reuse`` (the
cache policy's decisions and reused velocities), ``recording`` (FLOPs, per-step records, masks),
``caption_rows`` (the captions as table rows) and ``dit_call`` (one DiT call in those terms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..distributed.parallel import collective_buffers
from .caption_rows import CaptionRows
from .dit_call import DiTCall
from .guidance import SinglePass, ThreePass
from .latent_store import LatentStore
from .recording import Recorder
from .request import VideoRequest
from .reuse import start_reuse
from .sample_stats import SampleStats
from .schedule import check_steps, kv_span, time_grid, total_forward_steps, window_step


class SamplingInterrupted(RuntimeError):
    """Raised when ``should_stop()`` returned true; every buffer of the run has been released."""


@dataclass(frozen=True)
class StepProgress:
    """Passed to ``on_step`` after every forward step."""

    step: int  # 0-based
    total: int
    chunks: tuple  # (first, end) noisy chunks denoised at this step
    preview: torch.Tensor  # [C, frames, H, W]: denoised estimate x + (1 - t) v of those chunks


@dataclass
class SampleResult:
    latent: torch.Tensor  # [C, T, H, W] float32, the generated latent frames (see VideoLayout.output_start)
    stats: SampleStats


def generate(model, request: VideoRequest, *, noise=None, on_step: Optional[Callable] = None,
             should_stop: Optional[Callable] = None, stop: Optional[Callable] = None, parallel=None,
             on_frames: Optional[Callable] = None):
    """Generate the latent video ``request`` describes (a ``VideoRequest``) with the MAGI-1 DiT ``model`` (a
    ``MagiDiT``).

    The request's captions: the prompt's caption tokens ``(G, L, caption_channels)`` and mask ``(G, L)``, one
    per chunk to generate (G = ``request.chunks``), or one ``(L, ...)`` for all, or a ``ChunkCaptions``
    (distinct rows, no mask: the text path's). An all-zero mask means no prompt. Its ``token_block``, when
    set, is the model's low-memory mode for this run (set and restored here).

    Args:
        noise: the initial noise ``[16, T, H/8, W/8]``; default: drawn on the CPU from ``request.seed``.
        on_step: called with a ``StepProgress`` after every step; may raise to interrupt. should_stop:
            polled before every step; true raises ``SamplingInterrupted``.
        stop: a callable that interrupts by raising, polled before every step and inside every DiT call
            (between layers and blocks of queries), so that a long step stops promptly.
        parallel: a ``magi1.Parallel`` (default: the model's, see ``magi1.distributed.parallel``): every process calls
            with the same request and gets the same latent; ``on_step`` and ``on_frames`` run on rank 0
            only, and ``stop`` / ``should_stop`` must agree on every process (else end the processes).
        on_frames: called with each finished chunk's frames of the returned latent (``[16, n, H/8, W/8]``,
            host memory, read-only), in order: what a streamed decode reads. They join into the latent.

    Returns:
        ``SampleResult(latent, stats)``, the latent in host memory (the device holds only the window's
        chunks); ``stats.masks`` with ``request.record_masks``. All KV caches and per-run state are
        released on return, on error and on interrupt.
    """
    if not hasattr(request, "frames_to_generate"):  # duck-typed: a test may load a second copy of the package
        raise TypeError(f"generate takes a magi1.VideoRequest, got {type(request).__name__}: build one with "
                        "VideoRequest(frames=..., width=..., height=..., caption=..., ...)")
    # None keeps the model's own setting (off unless configured); a value holds for this run only
    before = {} if request.token_block is None else model.configure(token_block=request.token_block)
    try:
        return _generate(model, request, noise, on_step, should_stop, stop, parallel, on_frames)
    finally:
        if before:
            model.configure(**before)


def _generate(model, request, noise, on_step, should_stop, stop, parallel, on_frames):
    r = request
    parallel = _checked_parallel(parallel, model)
    if parallel is not None and not parallel.is_main:  # progress, previews and frames from rank 0
        on_step = on_frames = None
    steps, window_size = r.steps, r.window_size
    check_steps(steps, window_size)
    layout = r.layout(model.config.patch_size)
    prefix, x = _prefix_and_noise(model, layout, r.prefix, noise, r.seed, r.frames_to_generate)
    x = LatentStore(x, layout.chunk_width, model.device)
    captions = CaptionRows(model, layout, r.caption, r.caption_mask, r.negative_caption, r.negative_mask)

    reuse = start_reuse(r.policy, model, layout, steps, parallel)  # before any KV cache: a policy may refuse this video
    recorder = Recorder(reuse.mode, model.config, captions, layout, r.record_masks, window_size)
    call = DiTCall(model, captions, recorder, steps, stop)
    streams = _guidance_streams(r.guidance, model, layout, captions, call, reuse, r.kv_offload, steps, window_size,
                                parallel)
    recorder.stats.kv_cache_bytes = sum(c.nbytes for c in streams.kv_caches)
    loop = _Loop(layout, steps, window_size, x, prefix, streams, reuse, recorder, on_step, on_frames)
    del x, prefix  # the loop holds them now, and drops them when it closes
    try:
        with torch.no_grad():
            recorder.start(model.device)
            latent = loop.run(should_stop, stop)
            return SampleResult(latent, _all_streams_counted(recorder.finish(model.device), parallel))
    finally:  # the traceback of an error or interrupt keeps this frame alive, not the buffers
        loop.close()
        captions.close()


class _Loop:
    """The denoising loop of one generation over its latent ``x`` (changed in place)."""

    def __init__(self, layout, steps, window_size, x, prefix, streams, reuse, recorder, on_step, on_frames):
        self.layout, self.steps, self.window_size = layout, steps, window_size
        self.cw = layout.chunk_width
        self.x, self.prefix = x, prefix  # a LatentStore; the prefix latents in host memory
        self.streams, self.reuse, self.recorder, self.on_step = streams, reuse, recorder, on_step
        self.on_frames = on_frames
        self.grid32 = time_grid(steps)
        self.grid = self.grid32.tolist()  # the same float32 values as host numbers
        self.total_steps = total_forward_steps(layout.chunk_num, steps, window_size, layout.chunk_offset)

    def run(self, should_stop, stop):
        if self.layout.chunk_offset:
            self.recorder.count_as_dense(lambda: self.streams.encode_prefix(self.prefix, self.layout.chunk_offset))
        for step in range(self.total_steps):
            if should_stop is not None and should_stop():
                raise SamplingInterrupted(f"sampling interrupted before step {step + 1} of {self.total_steps}")
            if stop is not None:
                stop()
            self.step(step)
        return self.x.host[:, self.layout.output_start:].contiguous()

    def close(self):
        self.streams.close()
        self.reuse.close()
        if self.x is not None:
            self.x.close()
        self.x = self.prefix = self.streams = self.reuse = None

    def step(self, step):
        layout, cw = self.layout, self.cw
        plan = window_step(step, chunk_num=layout.chunk_num, num_steps=self.steps, window_size=self.window_size,
                           chunk_offset=layout.chunk_offset)
        noisy = list(range(plan.start, plan.end))
        self.x.drop_before(plan.start - 1)  # the chunk before stays: its last frame feeds the reuse weights
        x_call = self.x.chunks(plan.slice_point, plan.end)
        self._pad_prefix(x_call, plan.slice_point * cw)
        x_noisy = x_call[:, int(plan.refresh_clean) * cw:]
        t_noisy = [self.grid[s] for s in plan.steps]

        decisions = self.reuse.decide(noisy, plan.steps, x_noisy, t_noisy)
        active, counts = self.reuse.active(decisions, len(noisy))
        self.recorder.count_dense(self.streams.dense_calls(plan, t_noisy))
        fresh = [None] * len(noisy)
        if any(counts) or plan.refresh_clean:  # else the whole window is reused: no DiT call at all
            fresh = self.streams.velocities(plan, x_call, t_noisy, active, counts)
            fresh = [v if q else None for v, q in zip(fresh, counts)]

        dts = [self.grid32[s + 1] - self.grid32[s] for s in plan.steps]
        velocities = self.reuse.velocities(decisions, fresh, [float(dt) for dt in dts])
        x_new = torch.empty_like(x_noisy)
        for j, (v, dt) in enumerate(zip(velocities, dts)):
            frames = slice(j * cw, (j + 1) * cw)
            x_new[:, frames] = x_noisy[:, frames] + v * dt
        self.reuse.share(x_new)  # over several processes with a policy: rank 0's latents everywhere
        self.x.write(plan.start, x_new)

        t_after = [self.grid[s + 1] for s in plan.steps]
        self.reuse.observe(noisy, plan.steps, x_new, velocities, t_after, self._frame_before(plan.start))
        self.recorder.record_step(step, noisy, plan.steps, t_noisy, decisions)
        if self.on_step is not None:
            preview = torch.cat([x_new[:, j * cw:(j + 1) * cw] + (1 - t) * v
                                 for j, (t, v) in enumerate(zip(t_after, velocities))], dim=1)
            self.on_step(StepProgress(step, self.total_steps, (plan.start, plan.end), preview))
        for chunk, chunk_step in zip(noisy, plan.steps):
            if chunk_step + 1 == self.steps:
                self._finished(chunk)

    def _finished(self, chunk):
        """The chunk took its last step: its frames are final (in host memory), and go to ``on_frames``."""
        frames = self.x.finish(chunk)
        first = max(self.layout.output_start - chunk * self.cw, 0)
        if self.on_frames is not None and first < self.cw:
            self.on_frames(frames[:, first:])

    def _pad_prefix(self, x_call, first_frame):
        """Image-to-video / continuation: the prefix latents overwrite their frames before every forward."""
        if self.prefix is None or self.layout.prefix_frames <= first_frame:
            return
        n = min(self.layout.prefix_frames - first_frame, x_call.shape[1])
        x_call[:, :n] = self.prefix[:, first_frame:first_frame + n].to(x_call.device)

    def _frame_before(self, chunk):
        """The clean latent frame before ``chunk`` (None for the first chunk): for the reuse weights."""
        if chunk == 0:
            return None
        frame = chunk * self.cw - 1
        if frame < self.layout.prefix_frames:
            return self.prefix[:, frame].to(self.x.device)
        return self.x.frame(frame)


def _guidance_streams(guidance, model, layout, captions, call, reuse, kv_offload, steps, window_size, parallel):
    """1 pass for distilled models, 3 for base ones (unless ``guidance.passes`` says otherwise), with the
    KV caches that ``reuse`` needs, each as wide as the schedule's widest call (``kv_span``)."""
    single = guidance.passes == 1 or (guidance.passes is None and model.distill)
    copy_blocks = int(single and reuse.reusing)  # the nearly-clean copy's keys/values after the window
    kv_chunks = kv_span(layout.chunk_num, steps, window_size, layout.chunk_offset, extra_blocks=copy_blocks)
    if single:
        if parallel is not None and parallel.cfg > 1:
            raise ValueError(f"guidance parallel ({parallel.cfg} groups) needs the 3 guidance passes of a base model; "
                             "distilled models make 1: run them with cfg parallel 1")
        return SinglePass(guidance, model, layout, captions, call, reusing=reuse.reusing, kv_offload=kv_offload,
                          kv_chunks=kv_chunks)
    return ThreePass(guidance, model, layout, captions, call, reusing=reuse.reusing, token_level=reuse.token_level,
                     kv_offload=kv_offload, window_size=window_size, kv_chunks=kv_chunks, parallel=parallel)


def _all_streams_counted(stats, parallel):
    """With guidance streams in several process groups each rank counted its own group's DiT calls: add the
    other groups' (exact: the counts are whole numbers and FLOP sums far below 2**53)."""
    if parallel is not None and parallel.cfg > 1:
        with collective_buffers():
            counts = torch.tensor([stats.flops, float(stats.model_calls)], dtype=torch.float64, device=parallel.device)
        torch.distributed.all_reduce(counts, group=parallel.peer_group)
        stats.flops, stats.model_calls = float(counts[0]), int(counts[1])
    return stats


def _checked_parallel(parallel, model):
    """The run's ``Parallel`` (the model's by default), which must be the one the model is shared with."""
    parallel = parallel if parallel is not None else getattr(model, "parallel", None)
    if parallel is not None and getattr(model, "parallel", None) is not parallel:
        raise ValueError("generate(parallel=...) needs a model shared with it: load it with load_dit(parallel=...) "
                         "or pass it through magi1.weights.layer_sharding.distribute(model, parallel)")
    return parallel


def _prefix_and_noise(model, layout, prefix, noise, seed, frames):
    """The checked prefix latents and the initial latent, in host memory (``LatentStore`` moves the chunks
    being denoised to the model's device)."""
    latent_shape = (model.config.latent_channels, layout.latent_frames, layout.latent_height, layout.latent_width)
    return _checked_prefix(prefix, latent_shape, layout, frames), _initial_latent(noise, seed, latent_shape)


def _checked_prefix(prefix, latent_shape, layout, frames):
    if prefix is None:
        return None
    channels, total_frames = latent_shape[:2]
    if prefix.dim() != 4 or prefix.shape[0] != channels or tuple(prefix.shape[2:]) != latent_shape[2:]:
        raise ValueError(f"prefix must be latents [{channels}, P, {latent_shape[2]}, {latent_shape[3]}] for a "
                         f"{latent_shape[2] * 8}x{latent_shape[3] * 8} video, got {list(prefix.shape)}")
    if layout.prefix_frames >= total_frames:
        raise ValueError(f"the prefix has {layout.prefix_frames} latent frames; frames={frames} adds none after it")
    return prefix.to("cpu", torch.float32)


def _initial_latent(noise, seed, latent_shape):
    """``noise`` (checked), or noise drawn on the CPU from ``seed``: the same video on any device."""
    if noise is None:
        return torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(seed)))
    if tuple(noise.shape) != latent_shape:
        raise ValueError(f"noise must be {list(latent_shape)}, got {list(noise.shape)}")
    return noise.to("cpu", torch.float32, copy=True)
