"""The autoregressive MAGI-1 sampler, as released, with the cache policies applied during denoising.

The latent video is split into chunks of ``chunk_width`` latent frames, denoised in a staggered window
(``magi1.schedule``): at every forward step the window's chunks, each at its own time, go through the
DiT together and take one Euler step ``x += v * (t[s + 1] - t[s])``. Clean chunks leave the window and
are re-encoded once at ``clean_t`` into the KV cache that later chunks attend to.

Guidance, as released:

* base models, 3 passes: ``cond`` (prompt, reads the cache), ``cond_pre`` (null caption, unconditional
  adaLN token, reads and writes the cache) and ``uncond`` (null caption, each chunk alone). Per chunk,
  with scales chosen by the chunk's time:
  ``v = (1 - s_prev) * v_uncond + (s_prev - s_text) * v_cond_pre + s_text * v_cond``.
* distilled models, 1 pass with the prompt; while the oldest chunk is nearly clean (t > 0.3) a copy of
  it that sees only itself is appended, and its velocity is blended in: ``0.7 * v + 0.3 * v_alone``.

With a ``CachePolicy``, a per-run ``CacheState`` decides for every chunk and step whether to compute it
(dense), only some tokens (sparse) or nothing (skip); the DiT's sparse forward then computes just the
active tokens and reads the others' keys/values from the caches. One decision serves every guidance
pass. Because the cache rows of a window chunk must hold the keys/values of the stream reading them,
3-pass runs keep one cache per stream: ``cond_pre`` the official one, ``cond`` its own (whose clean
rows are copied from the official one), and ``uncond`` one chunk-sized cache per window slot.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .dit import distill_dt
from .flops import flops
from .kv_cache import KVCache
from .sample_stats import ChunkStepRecord, MaskRecorder, SampleStats
from .text import null_caption
from .schedule import (CLEAN_CHUNK_KVRANGE, CLEAN_T, NOISE2CLEAN_KVRANGE, step_intervals, time_grid,
                       total_forward_steps, window_step)

TEMPORAL_DOWNSAMPLE = 4  # video frames per latent frame
FEATURE_BATCH_BYTES = 64 * 2**20  # change features of a window up to this size come from one convolution


class SamplingInterrupted(RuntimeError):
    """Raised when ``should_stop()`` returned true; every buffer of the run has been released."""


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance as released (``runtime_config`` of the official example configs).

    ``passes``: 3 for base models, 1 for distilled ones; None picks from the model. The scales apply
    per chunk by its time: ``scales[i]`` for ``t_range[i] <= t < t_range[i + 1]``.
    """

    passes: Optional[int] = None
    t_range: Sequence[float] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: Sequence[float] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: Sequence[float] = (7.5, 7.5, 7.5, 0.0, 0.0)
    near_clean_threshold: float = 0.3  # 1 pass: the oldest chunk gets its self-only copy above this t
    near_clean_context_scale: float = 0.7  # share of the in-context velocity in that blend

    def __post_init__(self):
        if self.passes not in (None, 1, 3):
            raise ValueError(f"guidance passes must be 1 (distilled models), 3 (base models) or None, got {self.passes!r}")
        n = len(self.t_range)
        if n < 1 or len(self.prev_chunk_scales) != n or len(self.text_scales) != n:
            raise ValueError(f"t_range, prev_chunk_scales and text_scales must have the same length, got "
                             f"{len(self.t_range)}, {len(self.prev_chunk_scales)}, {len(self.text_scales)}")
        if list(self.t_range) != sorted(self.t_range) or self.t_range[0] > 0:
            raise ValueError(f"t_range must be ascending and start at 0, got {list(self.t_range)}")
        if not 0.0 <= self.near_clean_context_scale <= 1.0:
            raise ValueError(f"near_clean_context_scale must be in [0, 1], got {self.near_clean_context_scale}")

    def with_text_scale(self, scale):
        """A copy whose text scale is ``scale`` wherever the release guides by text (its 7.5 entries;
        the nearly-clean ranges stay unguided)."""
        text_scales = tuple(float(scale) if s else 0.0 for s in self.text_scales)
        return dataclasses.replace(self, text_scales=text_scales)

    def scales(self, t):
        """``(s_prev, s_text)`` for a chunk at time ``t`` (a float32 value), as the official lookup."""
        edges = torch.tensor(list(self.t_range), dtype=torch.float32) - 1e-7
        index = int(torch.searchsorted(edges, torch.tensor([t], dtype=torch.float32))) - 1
        index = min(max(index, 0), len(edges) - 1)
        return float(self.prev_chunk_scales[index]), float(self.text_scales[index])


@dataclass(frozen=True)
class VideoLayout:
    """How a request maps onto chunks of latent frames."""

    chunk_num: int  # chunks of the whole latent video, prefix included
    chunk_offset: int  # leading chunks that are entirely prefix (clean, never denoised)
    chunk_width: int  # latent frames per chunk
    prefix_frames: int  # latent frames given (image: 1, video: its latents)
    latent_height: int
    latent_width: int
    tokens_per_chunk: int

    @classmethod
    def plan(cls, frames, height, width, *, prefix_frames=0, chunk_width=6, patch_size=2):
        """As the official ``extract_feature_for_inference``: ``frames // 4`` new latent frames after the
        prefix, rounded up to whole chunks. ``height`` and ``width`` are in pixels."""
        for name, value in (("frames", frames), ("height", height), ("width", width), ("chunk_width", chunk_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if frames < TEMPORAL_DOWNSAMPLE:
            raise ValueError(f"frames must be at least {TEMPORAL_DOWNSAMPLE} (one latent frame), got {frames}")
        multiple = 8 * patch_size  # VAE downsampling x patch size
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
                nearest = lower if lower and value - lower < upper - value else upper
                raise ValueError(f"{name} must be a multiple of {multiple}; the nearest valid value is {nearest}")
        new = frames // TEMPORAL_DOWNSAMPLE
        chunk_num = math.ceil((new + prefix_frames) / chunk_width)
        h, w = height // 8, width // 8
        return cls(chunk_num, prefix_frames // chunk_width, chunk_width, prefix_frames, h, w,
                   chunk_width * (h // patch_size) * (w // patch_size))

    @property
    def latent_frames(self):
        return self.chunk_num * self.chunk_width

    @property
    def output_start(self):
        """First latent frame returned: after the prefix video, but from frame 0 for one image."""
        return 0 if self.prefix_frames == 1 else self.prefix_frames


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


def generate(model, caption, caption_mask, *, frames, height, width, steps=64, seed=0, noise=None,
             negative_caption=None, negative_mask=None, prefix=None, guidance=None, policy=None,
             window_size=4, chunk_width=6, kv_offload=False, on_step: Optional[Callable] = None,
             should_stop: Optional[Callable] = None, record_masks=False):
    """Generate one latent video with the MAGI-1 DiT ``model`` (a ``MagiDiT``).

    Args:
        caption, caption_mask: the prompt's caption tokens ``(G, L, caption_channels)`` and mask
            ``(G, L)``, one per chunk to generate (G = chunks after the prefix; the text path builds
            them), or a single ``(L, ...)`` for every chunk. An all-zero mask means no prompt.
        frames, height, width: video frames and pixel size (``VideoLayout.plan``).
        steps: denoising steps per chunk (a multiple of 4 and of ``window_size``; 12 uses the
            distilled shortcut schedule).
        seed, noise: the initial noise is ``noise`` if given ([16, T, H/8, W/8]), else drawn on the
            CPU from ``seed`` (the same video on any device).
        negative_caption, negative_mask: replaces the null caption in the unconditional passes of base
            models (same shapes as ``caption``).
        prefix: clean latents ``[16, P, H/8, W/8]`` to continue from (image: P = 1; video), already
            scaled by the VAE's scale factor.
        guidance: ``Guidance()``; policy: a ``cache_core.CachePolicy`` (None = no cache).
        window_size, chunk_width: the official 4 and 6.
        kv_offload: keep the KV caches in host memory (slower; for small GPUs).
        on_step: called with a ``StepProgress`` after every step; may raise to interrupt.
        should_stop: polled before every step; returning true raises ``SamplingInterrupted``.
        record_masks: keep the active-token masks (``stats.masks``).

    Returns:
        ``SampleResult(latent, stats)``. All caches and per-run state are released on return, on
        error and on interrupt.
    """
    run = _Run(model, caption, caption_mask, frames=frames, height=height, width=width, steps=steps, seed=seed,
               noise=noise, negative_caption=negative_caption, negative_mask=negative_mask, prefix=prefix,
               guidance=guidance or Guidance(), policy=policy, window_size=window_size, chunk_width=chunk_width,
               kv_offload=kv_offload, on_step=on_step, should_stop=should_stop, record_masks=record_masks)
    try:
        with torch.no_grad():
            return run.sample()
    finally:
        run.close()


class _Run:
    """One generation: its latent, caches, cache state and statistics; ``close`` drops them all."""

    def __init__(self, model, caption, caption_mask, *, frames, height, width, steps, seed, noise,
                 negative_caption, negative_mask, prefix, guidance, policy, window_size, chunk_width, kv_offload,
                 on_step, should_stop, record_masks):
        config = model.config
        self.model, self.config, self.guidance = model, config, guidance
        self.device = model.device
        if policy is not None and not callable(getattr(policy, "new_state", None)):
            raise TypeError(f"policy must be a cache_core.CachePolicy or None, got {type(policy).__name__}")
        self.policy = policy
        self.caching = policy is not None and policy.enabled
        self.token_mode = self.caching and policy.uses_token_weights
        self.passes = guidance.passes or (1 if model.distill else 3)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive integer, got {window_size!r}")
        stages = len(NOISE2CLEAN_KVRANGE)
        if steps % window_size or steps % stages:
            valid = math.lcm(window_size, stages)
            raise ValueError(f"steps must be a multiple of {valid} (window_size {window_size} and the {stages} "
                             f"key-range stages); the nearest valid value is {max(valid, round(steps / valid) * valid)}")
        self.steps, self.window_size = steps, window_size

        prefix_frames = 0 if prefix is None else int(prefix.shape[1])
        layout = VideoLayout.plan(frames, height, width, prefix_frames=prefix_frames, chunk_width=chunk_width,
                                  patch_size=config.patch_size)
        self.layout = layout
        self.cw, self.ct = layout.chunk_width, layout.tokens_per_chunk
        channels = 16 if config.half_channel_vae else config.in_channels
        latent_shape = (channels, layout.latent_frames, layout.latent_height, layout.latent_width)
        self.latent_shape = latent_shape
        if prefix is not None:
            if prefix.dim() != 4 or prefix.shape[0] != channels or tuple(prefix.shape[2:]) != latent_shape[2:]:
                raise ValueError(f"prefix must be latents [{channels}, P, {latent_shape[2]}, {latent_shape[3]}] for a "
                                 f"{height}x{width} video, got {list(prefix.shape)}")
            if prefix_frames >= layout.latent_frames:
                raise ValueError(f"the prefix has {prefix_frames} latent frames; frames={frames} adds none after it")
            prefix = prefix.to(self.device, torch.float32)
        self.prefix = prefix

        if noise is None:
            generator = torch.Generator().manual_seed(int(seed))
            noise = torch.randn(latent_shape, generator=generator)
        elif tuple(noise.shape) != latent_shape:
            raise ValueError(f"noise must be {list(latent_shape)}, got {list(noise.shape)}")
        self.x = noise.to(self.device, torch.float32, copy=True)

        self._captions(caption, caption_mask, negative_caption, negative_mask)
        self.grid32 = time_grid(steps)
        self.grid = self.grid32.tolist()  # the same float32 values as host numbers
        self.intervals = step_intervals(steps)
        self.total_steps = total_forward_steps(layout.chunk_num, steps, window_size, layout.chunk_offset)
        self.chunk_scales = [guidance.scales(t) for t in self.grid[:-1]]
        self.on_step, self.should_stop = on_step, should_stop

        self.stats = SampleStats(mode="off" if policy is None else policy.mode)
        if record_masks:
            self.stats.masks = MaskRecorder(layout.chunk_num, self.cw, layout.latent_height // config.patch_size,
                                            layout.latent_width // config.patch_size)
        self._allocate(kv_offload)

    # ---------------------------------------------------------------------------------------------- setup
    def _captions(self, caption, caption_mask, negative_caption, negative_mask):
        """One table of distinct caption rows on the device (the null caption first) with their
        valid-token counts on the host (one sync, here), and each generated chunk's row per stream."""
        config, layout = self.config, self.layout
        generated = layout.chunk_num - layout.chunk_offset
        null, null_mask = null_caption(self.model.y_embedder.null_caption_embedding.to(self.device))
        length = null.shape[0]

        def rows_of(name, emb, mask):
            if mask is None:
                raise ValueError(f"{name} needs its mask (which caption tokens are valid)")
            if emb.dim() == 2:
                emb, mask = emb[None], mask[None]
            if emb.dim() != 3 or emb.shape[1:] != (length, config.caption_channels):
                raise ValueError(f"{name} must be (chunks, {length}, {config.caption_channels}) or ({length}, "
                                 f"{config.caption_channels}), got {list(emb.shape)}")
            if emb.shape[0] not in (1, generated):
                raise ValueError(f"{name} has {emb.shape[0]} chunks; this video generates {generated} "
                                 f"(give one per generated chunk, or one for all)")
            if tuple(mask.shape) != tuple(emb.shape[:2]):
                raise ValueError(f"{name} mask must be {list(emb.shape[:2])}, got {list(mask.shape)}")
            return emb.to(self.device, torch.float32), mask.to(self.device).bool()

        embeddings, masks = [null[None]], [null_mask[None]]

        def add(emb, mask):
            """Table rows of the generated chunks for these captions (one row may serve all)."""
            first = sum(e.shape[0] for e in embeddings)
            embeddings.append(emb)
            masks.append(mask)
            return [first + (i if emb.shape[0] > 1 else 0) for i in range(generated)]

        positive, positive_mask = rows_of("caption", caption, caption_mask)
        # An empty prompt: the released pipeline then uses the null caption.
        self.positive_rows = add(positive, positive_mask) if bool(positive_mask.any()) else [0] * generated
        self.negative_rows = [0] * generated
        if negative_caption is not None:
            self.negative_rows = add(*rows_of("negative_caption", negative_caption, negative_mask))
        self.caption_table = torch.cat(embeddings)
        self.caption_mask_table = torch.cat(masks)
        self.caption_lengths = self.caption_mask_table.sum(dim=1).tolist()

    def _caption_row(self, chunk, stream):
        """Row of the caption table for a noisy chunk in a stream ("positive" or "negative")."""
        rows = self.positive_rows if stream == "positive" else self.negative_rows
        return rows[chunk - self.layout.chunk_offset]

    def _allocate(self, offload):
        model, layout, ct = self.model, self.layout, self.ct
        # The main cache; with caching, distilled runs also keep the nearly-clean copy's keys/values
        # in the block just after the window (capacity for one more chunk).
        extra = 1 if self.caching and self.passes == 1 else 0
        self.main = KVCache.for_model(model, (layout.chunk_num + extra) * ct, offload=offload)
        self.cond_cache = self.uncond_caches = None
        if self.caching and self.passes == 3:
            self.cond_cache = KVCache.for_model(model, layout.chunk_num * ct, offload=offload)
            if self.token_mode:
                self.uncond_caches = [KVCache.for_model(model, ct, offload=offload) for _ in range(self.window_size)]
        caches = [self.main, self.cond_cache] + (self.uncond_caches or [])
        self.stats.kv_cache_bytes = sum(c.nbytes for c in caches if c is not None)
        self.state = None
        if self.caching:
            self.state = self.policy.new_state(
                num_steps=self.steps, chunk_shape=(self.latent_shape[0], self.cw) + self.latent_shape[2:],
                patch=(self.config.patch_size, self.config.patch_size))
        self.near_clean_rows = None  # (chunk, block) whose nearly-clean copy's keys/values are cached

    def close(self):
        self.main = self.cond_cache = self.uncond_caches = self.state = None
        self.x = self.prefix = self.caption_table = self.caption_mask_table = None
        self.model = None

    # ---------------------------------------------------------------------------------------------- run
    def sample(self):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        if self.layout.chunk_offset:
            self._encode_prefix()
        for step in range(self.total_steps):
            if self.should_stop is not None and self.should_stop():
                raise SamplingInterrupted(f"sampling interrupted before step {step + 1} of {self.total_steps}")
            self._step(step)
        latent = self.x[:, self.layout.output_start:].clone()
        if cuda:
            torch.cuda.synchronize(self.device)
            self.stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        self.stats.wall_seconds = time.perf_counter() - began
        return SampleResult(latent, self.stats)

    def _encode_prefix(self):
        """Write the clean prefix chunks' keys/values into the cache (null caption, t = clean_t, each
        chunk sees itself), as ``extract_prefix_video_feature``; the output is not used."""
        n, cw, ct = self.layout.chunk_offset, self.cw, self.ct
        x = self.prefix[None, :, : n * cw]
        t = torch.full((1, n), CLEAN_T)
        ranges = [(max(0, j + 1 - CLEAN_CHUNK_KVRANGE) * ct, (j + 1) * ct) for j in range(n)]
        before = self.stats.flops
        self._call(x, t.tolist(), [0] * n, ranges, slice_point=0, unconditional=self.passes == 3, cache=self.main,
                   write=n, stage=0, counts=[ct] * n)
        self.stats.dense_flops += self.stats.flops - before
        if self.cond_cache is not None:
            self._copy_rows(0, n)

    def _distill_dt(self, stage_index):
        if not self.model.distill:
            return None
        return distill_dt(self.steps, self.intervals[stage_index])

    def _step(self, step):
        layout, cw = self.layout, self.cw
        plan = window_step(step, chunk_num=layout.chunk_num, num_steps=self.steps, window_size=self.window_size,
                           chunk_offset=layout.chunk_offset)
        refresh = int(plan.refresh_clean)
        call_start = plan.slice_point
        noisy = list(range(plan.start, plan.end))
        x_call = self.x[:, call_start * cw: plan.end * cw].clone()
        self._pad_prefix(x_call, call_start * cw)
        x_noisy = x_call[:, refresh * cw:]
        t_noisy = [self.grid[s] for s in plan.steps]

        decisions = None
        if self.caching:
            features = self._change_features(x_noisy, len(noisy))
            decisions = self.state.decide([(c, s, f) for c, s, f in zip(noisy, plan.steps, features)])

        velocity = self._velocities(plan, x_call, t_noisy, decisions)
        if self.stats.masks is not None:
            self.stats.masks.start_step()

        x_new = torch.empty_like(x_noisy)
        used = [] if self.on_step is not None or (self.caching and self.policy.proxy == "denoised") else None
        for j, (c, s) in enumerate(zip(noisy, plan.steps)):
            frames = slice(j * cw, (j + 1) * cw)
            dt = self.grid32[s + 1] - self.grid32[s]
            v = velocity[j]
            if self.caching:
                v = self.state.velocity(decisions[j], v, float(dt))
            x_new[:, frames] = x_noisy[:, frames] + v * dt
            if used is not None:
                used.append(v)
        self.x[:, plan.start * cw: plan.end * cw] = x_new

        if self.caching:  # the token weights of the next step, from the updated latents
            self.state.observe_window(
                [(c, s, x_new[:, j * cw:(j + 1) * cw], None if used is None else used[j], self.grid[s + 1])
                 for j, (c, s) in enumerate(zip(noisy, plan.steps))], self._previous_frame(plan.start))
        for j, (c, s) in enumerate(zip(noisy, plan.steps)):
            self._record(step, c, s, t_noisy[j], None if decisions is None else decisions[j])
        for c, s in zip(noisy, plan.steps):
            if s + 1 == self.steps and self.caching:
                self.state.release(c)

        if self.on_step is not None:
            preview = torch.cat([x_new[:, j * cw:(j + 1) * cw] + (1 - self.grid[s + 1]) * used[j]
                                 for j, s in enumerate(plan.steps)], dim=1)
            self.on_step(StepProgress(step, self.total_steps, (plan.start, plan.end), preview))

    def _change_features(self, x_noisy, chunks):
        """Each noisy chunk's patch embedding in the model dtype (what the cache compares between
        steps, as released): one convolution for a small window, chunk by chunk for a large one so
        that the float32 intermediate stays chunk-sized."""
        model, cw = self.model, self.cw
        if self.ct * chunks * self.config.hidden_size * 4 <= FEATURE_BATCH_BYTES:
            embedded = model.patch_embedding(x_noisy[None])[0]
            return [embedded[:, j * cw:(j + 1) * cw].to(model.dtype) for j in range(chunks)]
        return [model.patch_embedding(x_noisy[None, :, j * cw:(j + 1) * cw])[0].to(model.dtype) for j in range(chunks)]

    def _pad_prefix(self, x_call, first_frame):
        """Image-to-video / continuation: the prefix latents overwrite their frames before every forward."""
        if self.prefix is None or self.layout.prefix_frames <= first_frame:
            return
        n = min(self.layout.prefix_frames - first_frame, x_call.shape[1])
        x_call[:, :n] = self.prefix[:, first_frame:first_frame + n]

    def _previous_frame(self, chunk):
        """The frame before ``chunk`` in the cache's proxy space (for its motion weights)."""
        if chunk == 0:
            return None
        tail = self.state.proxy_tail(chunk - 1)
        if tail is not None:
            return tail
        frame = chunk * self.cw - 1  # the previous chunk is clean: its last frame
        return self.prefix[:, frame] if frame < self.layout.prefix_frames else self.x[:, frame]

    def _record(self, step, chunk, chunk_step, t, decision):
        if decision is None:
            record = ChunkStepRecord(step, chunk, chunk_step, t, "off", "dense", self.ct, self.ct)
        else:
            record = ChunkStepRecord(step, chunk, chunk_step, t, decision.phase, decision.action,
                                     decision.n_active, decision.n_tokens)
        self.stats.records.append(record)
        if self.stats.masks is not None:
            self.stats.masks.record(chunk, record.action, None if decision is None else decision.active)

    # ---------------------------------------------------------------------------------------------- passes
    def _velocities(self, plan, x_call, t_noisy, decisions):
        """The guided velocity ``[C, chunk_width, H, W]`` of each noisy chunk of the window (zero at the
        tokens not computed), or None for a chunk not computed at all."""
        n = len(t_noisy)
        if decisions is None:
            entries, queries = [None] * n, [self.ct] * n
        else:
            entries = [None if d.action == "dense" else d.active_indices if d.action == "sparse"
                       else torch.empty(0, dtype=torch.long, device=self.device) for d in decisions]
            queries = [d.n_active for d in decisions]
        self._count_dense_step(plan, t_noisy)
        if not any(queries) and not plan.refresh_clean:
            return [None] * n  # the whole window is reused: no DiT call at all
        if self.passes == 1:
            velocities = self._single_pass(plan, x_call, t_noisy, entries, queries)
        else:
            velocities = self._three_pass(plan, x_call, t_noisy, entries, queries)
        return [v if q else None for v, q in zip(velocities, queries)]

    def _single_pass(self, plan, x_call, t_noisy, entries, queries):
        cw, ct, refresh = self.cw, self.ct, int(plan.refresh_clean)
        noisy = range(plan.start, plan.end)
        n_call = len(plan.kv_ranges)
        t = [CLEAN_T] * refresh + t_noisy
        rows = [0] * refresh + [self._caption_row(c, "positive") for c in noisy]
        ranges = [(a * ct, b * ct) for a, b in plan.kv_ranges]
        active = [None] * refresh + entries
        counts = [ct] * refresh + queries
        write = n_call
        near_clean = t_noisy[0] > self.guidance.near_clean_threshold
        x = x_call
        if near_clean:  # append the oldest noisy chunk again, seeing only itself
            block = plan.slice_point + n_call
            x = torch.cat([x_call, x_call[:, refresh * cw:(refresh + 1) * cw]], dim=1)
            t.append(t_noisy[0])
            rows.append(rows[refresh])
            ranges.append((block * ct, (block + 1) * ct))
            copy = entries[0]
            if self.caching:
                write += 1  # its keys/values are kept too, so that it can be sparse like its chunk
                owner = (plan.start, block)
                if copy is not None and copy.numel() and self.near_clean_rows != owner:
                    copy = None  # the cached rows belong to another chunk: compute the copy whole once
                if copy is None or copy.numel():
                    self.near_clean_rows = owner
            active.append(copy)
            counts.append(ct if copy is None else int(copy.numel()))
        out = self._call(x[None], [t], rows, ranges, slice_point=plan.slice_point, unconditional=False,
                         cache=self.main, write=write, stage=plan.stage_index, active=active, counts=counts)
        v = out[0, :, refresh * cw:]
        velocities = [v[:, j * cw:(j + 1) * cw] for j in range(len(t_noisy))]
        if near_clean:
            scale = self.guidance.near_clean_context_scale
            alone = v[:, len(t_noisy) * cw:]
            velocities[0] = velocities[0] * scale + alone * (1 - scale)
        return velocities

    def _three_pass(self, plan, x_call, t_noisy, entries, queries):
        cw, ct, refresh = self.cw, self.ct, int(plan.refresh_clean)
        noisy = list(range(plan.start, plan.end))
        n_call = len(plan.kv_ranges)
        t = [[CLEAN_T] * refresh + t_noisy]
        ranges = [(a * ct, b * ct) for a, b in plan.kv_ranges]
        active = [None] * refresh + entries
        counts = [ct] * refresh + queries
        computed = [j for j, q in enumerate(queries) if q]
        common = dict(slice_point=plan.slice_point, stage=plan.stage_index, active=active, counts=counts)
        cond = None
        if computed:
            rows = [0] * refresh + [self._caption_row(c, "positive") for c in noisy]
            cond_cache = self.cond_cache if self.cond_cache is not None else self.main
            cond = self._call(x_call[None], t, rows, ranges, unconditional=False, cache=cond_cache,
                              write=n_call if self.caching else 0, **common)[0, :, refresh * cw:]
        rows = [0] * refresh + [self._caption_row(c, "negative") for c in noisy]
        cond_pre = self._call(x_call[None], t, rows, ranges, unconditional=True, cache=self.main, write=n_call,
                              **common)[0, :, refresh * cw:]
        if self.cond_cache is not None and refresh:  # the cond stream reads the clean chunk as cond_pre wrote it
            self._copy_rows(plan.slice_point, plan.slice_point + 1)
        if not computed:
            return [None] * len(noisy)

        # Unconditional pass: every computed chunk alone, at positions from 0, with the null caption.
        x_noisy = x_call[:, refresh * cw:]
        uncond = {}
        if self.uncond_caches is None:
            x = torch.stack([x_noisy[:, j * cw:(j + 1) * cw] for j in computed])
            out = self._call(x, [[t_noisy[j]] for j in computed], [self._caption_row(noisy[j], "negative")
                                                                  for j in computed],
                             [(0, ct)], slice_point=0, unconditional=True, cache=None, write=0,
                             stage=plan.stage_index, counts=[ct] * len(computed), sequences=len(computed))
            uncond = {j: out[i] for i, j in enumerate(computed)}
        else:
            for j in computed:
                chunk = noisy[j]
                out = self._call(x_noisy[None, :, j * cw:(j + 1) * cw], [[t_noisy[j]]],
                                 [self._caption_row(chunk, "negative")], [(0, ct)], slice_point=0, unconditional=True,
                                 cache=self.uncond_caches[chunk % self.window_size], write=1, stage=plan.stage_index,
                                 active=[entries[j]], counts=[queries[j]])
                uncond[j] = out[0]

        velocities = [None] * len(noisy)
        for j in computed:
            prev_scale, text_scale = self.chunk_scales[plan.steps[j]]
            frames = slice(j * cw, (j + 1) * cw)
            velocities[j] = ((1 - prev_scale) * uncond[j] + (prev_scale - text_scale) * cond_pre[:, frames]
                             + text_scale * cond[:, frames])
        return velocities

    # ---------------------------------------------------------------------------------------------- calls
    def _call(self, x, t, rows, ranges, *, slice_point, unconditional, cache, write, stage, active=None,
              counts, sequences=1):
        """One DiT call; ``rows`` index the caption table per (sequence, chunk), ``counts`` are the
        query tokens per chunk (for the FLOP count)."""
        if active is not None and all(a is None for a in active):
            active = None  # every token of every chunk: the dense path
        chunks = len(t[0])
        caption = self.caption_table[rows].view(sequences, chunks, *self.caption_table.shape[1:])
        mask = self.caption_mask_table[rows].view(sequences, chunks, -1)
        t = torch.tensor(t, dtype=torch.float32).to(self.device, non_blocking=True)
        out = self.model(x, t, caption, mask, ranges, slice_point=slice_point, unconditional=unconditional,
                         distill_dt=self._distill_dt(stage), cache=cache, cache_write_chunks=write, active=active)
        self.stats.model_calls += 1
        per_sequence = len(rows) // sequences
        for i, row in enumerate(rows):
            start, end = ranges[i % per_sequence]
            self.stats.flops += self._flops(counts[i % per_sequence], end - start, row)
        return out

    def _flops(self, queries, keys, row):
        return flops(self.config, query_tokens=queries, key_tokens=keys, caption_tokens=self.caption_lengths[row]).total

    def _count_dense_step(self, plan, t_noisy):
        """FLOPs the released sampler spends on this step (every token of every call)."""
        ct, refresh = self.ct, int(plan.refresh_clean)
        noisy = range(plan.start, plan.end)
        ranges = [(b - a) * ct for a, b in plan.kv_ranges]
        total = 0.0
        streams = ("positive",) if self.passes == 1 else ("positive", "negative")
        for stream in streams:
            rows = [0] * refresh + [self._caption_row(c, stream) for c in noisy]
            total += sum(self._flops(ct, keys, row) for keys, row in zip(ranges, rows))
        if self.passes == 1 and t_noisy[0] > self.guidance.near_clean_threshold:
            total += self._flops(ct, ct, self._caption_row(plan.start, "positive"))
        if self.passes == 3:
            total += sum(self._flops(ct, ct, self._caption_row(c, "negative")) for c in noisy)
        self.stats.dense_flops += total

    def _copy_rows(self, first_chunk, end_chunk):
        rows = slice(first_chunk * self.ct, end_chunk * self.ct)
        for layer in range(len(self.main.keys)):
            self.cond_cache.keys[layer][rows].copy_(self.main.keys[layer][rows])
            self.cond_cache.values[layer][rows].copy_(self.main.values[layer][rows])
