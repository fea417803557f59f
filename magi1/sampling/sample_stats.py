"""What a sampling run did: per chunk and step, how much was computed; FLOPs against the dense run;
time and memory; and, on request, the active-token masks as frames to watch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

# Mask frame values: computed, reused, and "not denoised at this step" (clean, or not started yet).
COMPUTED, REUSED, IDLE = 1.0, 0.0, 0.25


@dataclass(frozen=True)
class ChunkStepRecord:
    """One noisy chunk at one forward step of the window."""

    step: int  # forward step of the whole run
    chunk: int  # chunk index in the latent video
    chunk_step: int  # the chunk's own step counter (0 .. num_steps - 1)
    t: float  # the chunk's time before the step (0 = noise, 1 = clean)
    phase: str  # cache phase ("off", "warmup", "chunk", "token", "final", ...)
    action: str  # "dense", "sparse" or "skip"
    n_active: int  # tokens computed
    n_tokens: int

    @property
    def fraction(self):
        return self.n_active / self.n_tokens


@dataclass
class SampleStats:
    """Filled in by ``magi1.sampling.sampler.generate``."""

    mode: str
    records: List[ChunkStepRecord] = field(default_factory=list)
    flops: float = 0.0  # analytic FLOPs of the DiT calls made
    dense_flops: float = 0.0  # the same run with every token computed (the released sampler)
    model_calls: int = 0
    wall_seconds: float = 0.0
    peak_memory_bytes: Optional[int] = None  # CUDA only
    kv_cache_bytes: int = 0  # all key/value buffers of the run
    masks: Optional["MaskRecorder"] = None

    @property
    def token_steps_computed(self):
        return sum(r.n_active for r in self.records)

    @property
    def token_steps_total(self):
        return sum(r.n_tokens for r in self.records)

    @property
    def computed_fraction(self):
        total = self.token_steps_total
        return self.token_steps_computed / total if total else 1.0

    @property
    def flop_ratio(self):
        """Dense FLOPs / FLOPs spent (2.0 = half the work)."""
        return self.dense_flops / self.flops if self.flops else float("inf")

    def action_counts(self):
        counts = {"dense": 0, "sparse": 0, "skip": 0}
        for r in self.records:
            counts[r.action] += 1
        return counts

    def per_chunk(self):
        """``{chunk: fraction of its token-steps computed}``."""
        done, total = {}, {}
        for r in self.records:
            done[r.chunk] = done.get(r.chunk, 0) + r.n_active
            total[r.chunk] = total.get(r.chunk, 0) + r.n_tokens
        return {c: done[c] / total[c] for c in sorted(total)}

    def summary(self):
        counts = self.action_counts()
        line = (f"MAGI-1 cache {self.mode}: computed {self.computed_fraction:.0%} of token-steps, "
                f"{self.flop_ratio:.2f}x fewer FLOPs ({self.flops / 1e12:.3g} of {self.dense_flops / 1e12:.3g} TFLOP); "
                f"chunk-steps {counts['dense']} dense, {counts['sparse']} sparse, {counts['skip']} skipped; "
                f"{self.model_calls} DiT calls, {self.wall_seconds:.1f} s")
        if self.peak_memory_bytes is not None:
            line += f", peak {self.peak_memory_bytes / 2**30:.2f} GiB"
        return line


class MaskRecorder:
    """The active tokens of every forward step, as one greyscale frame per step.

    A frame has one row of tiles per chunk and one tile per latent frame of the chunk, each
    ``grid_h x grid_w`` tokens: white = computed, black = reused, grey = not denoised at this step.
    ``frames`` shows every chunk of the video (top = first chunk), ``window_frames`` only the chunks of
    the window (top = the oldest one denoised at that step): the same size whatever the video's length.

    Each step keeps only its window's tiles, one byte per token, so a long run's record stays small.
    """

    def __init__(self, chunk_num, chunk_width, grid_h, grid_w, window_size=4):
        self.chunk_num, self.chunk_width, self.grid_h, self.grid_w = chunk_num, chunk_width, grid_h, grid_w
        self.window_size = window_size
        self._steps = []  # per step: {chunk: uint8 tile (grid_h, chunk_width * grid_w) of 0 reused, 1 computed}

    def start_step(self):
        self._steps.append({})

    def record(self, chunk, action, active=None):
        """``active``: the computed token indices of a sparse decision (ignored otherwise)."""
        tile_shape = (self.grid_h, self.chunk_width * self.grid_w)
        if action == "sparse":
            mask = torch.zeros(self.chunk_width * self.grid_h * self.grid_w, dtype=torch.uint8)
            mask[active.detach().cpu()] = 1
            mask = mask.view(self.chunk_width, self.grid_h, self.grid_w)
            tile = mask.permute(1, 0, 2).reshape(tile_shape)
        else:
            tile = torch.full(tile_shape, int(action == "dense"), dtype=torch.uint8)
        self._steps[-1][chunk] = tile

    def frames(self):
        """``(steps, chunks * grid_h, chunk_width * grid_w)`` float32 in [0, 1]: every chunk of the video
        at every step (its size grows with the square of the video's length: for short runs)."""
        return self._stack(lambda tiles: 0, self.chunk_num)

    def window_frames(self):
        """``(steps, window_size * grid_h, chunk_width * grid_w)`` float32 in [0, 1]: the chunks denoised at
        each step, oldest on top (grey rows below when the window is not full)."""
        return self._stack(lambda tiles: min(tiles, default=0), self.window_size)

    def _stack(self, first_row_chunk, rows):
        out = torch.full((len(self._steps), rows * self.grid_h, self.chunk_width * self.grid_w), IDLE)
        for step, tiles in enumerate(self._steps):
            top = first_row_chunk(tiles)
            for chunk, tile in tiles.items():
                row = (chunk - top) * self.grid_h
                out[step, row:row + self.grid_h] = torch.where(tile.bool(), COMPUTED, REUSED)
        return out
