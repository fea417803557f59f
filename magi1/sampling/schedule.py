"""The autoregressive denoising schedule of MAGI-1, as released: the time grid, and for every forward
step which chunks are in the window, at which of their own steps, and which keys each one sees.

Chunks are denoised in a sliding window of ``window_size`` chunks, staggered by
``num_steps // window_size`` steps (one "stage"): the oldest window chunk is the most denoised. When a
chunk has had all ``num_steps`` updates it leaves the window, and at the first step of the next stage
it is re-run once at ``clean_t`` to refresh its keys/values in the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from ..checks import check_int

NOISE2CLEAN_KVRANGE = (5, 4, 3, 2)  # key range, in chunks (itself included), per stage of a chunk
CLEAN_CHUNK_KVRANGE = 1
CLEAN_T = 0.9999


def time_grid(num_steps, shortcut_mode="8,16,16", shift=3.0):
    """The ``num_steps + 1`` times ``t_0 = 0 .. t_N = 1`` (float32): ``u**2`` warped by the SD3 shift.

    12 steps use the released shortcut spacing (per quarter: 1/8, 1/16, 1/16 of u; "16,16,8" reverses).
    ``shifted_time`` is the same warp of a continuous ``u``, in the training's arithmetic.
    """
    if num_steps == 12:
        base = torch.linspace(0, 1, 5) / 4
        base = base[:3] if shortcut_mode == "16,16,8" else torch.cat([base[:1], base[2:4]])
        u = torch.cat([base + offset for offset in torch.linspace(0, 1, 5)])[: num_steps + 1]
    else:
        u = torch.linspace(0, 1, num_steps + 1)
    s = u ** 2
    inv = 1.0 / shift
    return inv * s / (1 + (inv - 1) * s)


def shifted_time(u, shift=3.0):
    """The schedule's time for a continuous position ``u`` in [0, 1] of the step grid (tensor or float):
    ``u**2`` warped by the SD3 shift, ``s / shift / (1 + (1 / shift - 1) s)`` with ``s = u**2``.

    This is how the tiny model's training (``train/tiny.py``) warps the positions it draws anywhere in
    [0, 1]; the weights were trained with exactly this arithmetic. It is ``time_grid``'s function, but
    ``time_grid`` writes it ``(1 / shift) s / (1 + (1 / shift - 1) s)``: in float32 the two agree at the
    grid points to two ulps (most points bit for bit, a few one ulp apart, rarely two), not exactly, so
    neither replaces the other without changing the sampler's or the training's numbers.
    """
    s = u ** 2
    return s / shift / (1 + (1 / shift - 1) * s)


def unshifted_position(t, shift=3.0):
    """The inverse of ``shifted_time``: the step-grid position ``u`` of a time ``t`` in [0, 1] (a tensor)."""
    return torch.sqrt(shift * t / (1 + (shift - 1) * t))


def kv_range_chunks(step, num_steps, noise2clean_kvrange=NOISE2CLEAN_KVRANGE,
                    clean_chunk_kvrange=CLEAN_CHUNK_KVRANGE):
    """How many chunks (itself included) a chunk attends to at its own step ``step`` of ``num_steps``:
    ``clean_chunk_kvrange`` once clean (``step == num_steps``), else the range of its stage, the
    ``noise2clean_kvrange`` entry of the ``len(noise2clean_kvrange)`` equal spans of steps it is in."""
    if num_steps % len(noise2clean_kvrange):
        raise ValueError(f"num_steps ({num_steps}) must be a multiple of the {len(noise2clean_kvrange)} "
                         f"kv-range stages")
    if not 0 <= step <= num_steps:
        raise ValueError(f"step must be in [0, {num_steps}], got {step}")
    if step == num_steps:
        return clean_chunk_kvrange
    return noise2clean_kvrange[step // (num_steps // len(noise2clean_kvrange))]


def chunk_kv_range(chunk, step, num_steps, noise2clean_kvrange=NOISE2CLEAN_KVRANGE,
                   clean_chunk_kvrange=CLEAN_CHUNK_KVRANGE):
    """The chunks ``[first, chunk + 1)`` that chunk ``chunk`` attends to at its own step ``step``: itself
    and the ``kv_range_chunks - 1`` before it (fewer at the start of the video)."""
    width = kv_range_chunks(step, num_steps, noise2clean_kvrange, clean_chunk_kvrange)
    return max(0, chunk + 1 - width), chunk + 1


def check_steps(num_steps, window_size, stages=len(NOISE2CLEAN_KVRANGE)):
    """Steps per chunk must be a positive multiple of ``window_size`` (one stage per window slot) and of
    the key-range ``stages``; the error names the nearest valid value."""
    check_int("steps", num_steps, low=1)
    check_int("window_size", window_size, low=1)
    if num_steps % window_size or num_steps % stages:
        valid = math.lcm(window_size, stages)
        raise ValueError(f"steps must be a multiple of {valid} (window_size {window_size} and the {stages} "
                         f"key-range stages); the nearest valid value is {max(valid, round(num_steps / valid) * valid)}")


def step_intervals(num_steps, shortcut_mode="8,16,16"):
    """The shortcut interval of each sub-step of a stage (what distilled models embed; 1 unless 12 steps)."""
    if num_steps % 3 == 0:
        pattern = [1, 1, 2] if shortcut_mode == "16,16,8" else [2, 1, 1]
        return pattern * (num_steps // 3)
    return [1] * num_steps


@dataclass(frozen=True)
class WindowStep:
    """One forward step of the window.

    ``chunks``: the noisy chunks ``[start, end)`` denoised at this step, oldest first, and ``steps``
    their own step indices (how many updates each has had). ``refresh_clean`` says the call also
    re-encodes chunk ``start - 1``, now clean, in front of them. ``kv_ranges`` gives, for every chunk of
    the call (the clean one first when refreshed), the chunks ``[first, end)`` its queries attend to.
    """

    start: int
    end: int
    steps: Tuple[int, ...]
    refresh_clean: bool
    stage_index: int  # sub-step within the stage, 0 .. num_steps // window_size - 1
    kv_ranges: Tuple[Tuple[int, int], ...]

    @property
    def slice_point(self):
        """Chunks before the call's first chunk (all clean, read from the cache)."""
        return self.start - 1 if self.refresh_clean else self.start


def total_forward_steps(chunk_num, num_steps, window_size, chunk_offset=0):
    return num_steps // window_size * (chunk_num + window_size - 1 - chunk_offset)


def window_step(step, *, chunk_num, num_steps, window_size, chunk_offset=0,
                noise2clean_kvrange=NOISE2CLEAN_KVRANGE, clean_chunk_kvrange=CLEAN_CHUNK_KVRANGE):
    """The window at forward step ``step`` (0 .. ``total_forward_steps`` - 1).

    ``chunk_offset``: leading chunks that are already clean (a prefix video), never denoised.
    """
    check_steps(num_steps, window_size, len(noise2clean_kvrange))
    total = total_forward_steps(chunk_num, num_steps, window_size, chunk_offset)
    if not 0 <= step < total:
        raise ValueError(f"step must be in [0, {total}), got {step}")
    per_stage = num_steps // window_size
    stage, index = divmod(step, per_stage)
    i = chunk_offset + stage
    start, end = max(chunk_offset, i - window_size + 1), min(chunk_num, i + 1)
    t_start = max(0, i - chunk_num + 1)
    t_end = min(window_size, i - chunk_offset + 1)
    steps = tuple(s * per_stage + index for s in reversed(range(t_start, t_end)))
    refresh = start > chunk_offset and index == 0
    kv_steps = ((num_steps,) if refresh else ()) + steps
    first_chunk = start - 1 if refresh else start
    ranges = tuple(chunk_kv_range(first_chunk + j, s, num_steps, noise2clean_kvrange, clean_chunk_kvrange)
                   for j, s in enumerate(kv_steps))
    return WindowStep(start, end, steps, refresh, index, ranges)


def call_rows(plan, extra_blocks=0):
    """The chunks ``[first, end)`` of key/value rows one call of ``plan`` (a ``WindowStep``) reads and writes:
    from the earliest chunk a key range reaches to the end of its window, plus ``extra_blocks`` chunk-sized
    blocks after it (the nearly-clean copy of a 1-pass run that keeps its keys/values)."""
    first = min([a for a, _ in plan.kv_ranges] + [plan.slice_point])
    return first, plan.slice_point + len(plan.kv_ranges) + extra_blocks


def kv_span(chunk_num, num_steps, window_size, chunk_offset=0, extra_blocks=0, noise2clean_kvrange=NOISE2CLEAN_KVRANGE):
    """The most chunks of key/value rows a run keeps at once: the widest ``call_rows`` of any forward step
    of the schedule, and of the encoding of a prefix of ``chunk_offset`` chunks (each sees itself: at most
    this many at a time, ``prefix_pieces``). Derived by walking the schedule, so it follows the key ranges
    and the window. A call never reads a row before an earlier call's first (checked): rows before the
    current call's first are never needed again, which is what lets a cache slide (``KVCache.reserve``)."""
    span, floor = 1, 0
    for step in range(total_forward_steps(chunk_num, num_steps, window_size, chunk_offset)):
        plan = window_step(step, chunk_num=chunk_num, num_steps=num_steps, window_size=window_size,
                           chunk_offset=chunk_offset, noise2clean_kvrange=noise2clean_kvrange)
        first, end = call_rows(plan, extra_blocks)
        if first < floor:
            raise ValueError(f"the key ranges read chunk {first} after a call that began at chunk {floor}: "
                             "a sliding KV cache cannot serve them")
        floor, span = first, max(span, end - first)
    return span


def prefix_pieces(chunks, span):
    """The prefix's ``chunks`` clean chunks in calls of at most ``span`` chunks: ``[(first, end), ...]``
    (one call for a prefix that fits, as the release encodes it)."""
    return [(first, min(first + span, chunks)) for first in range(0, chunks, span)]
