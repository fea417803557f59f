"""One DiT call in the sampler's terms: caption rows instead of caption tensors, the distilled step
size of the stage, and its FLOPs counted."""

from __future__ import annotations

import torch

from ..network.dit import distill_dt
from .schedule import step_intervals


class DiTCall:
    """Calls ``model`` for one run of ``num_steps`` steps a chunk, reading ``captions`` (``CaptionRows``)
    and counting into ``recorder``."""

    def __init__(self, model, captions, recorder, num_steps, stop=None):
        self.model, self.captions, self.recorder, self.stop = model, captions, recorder, stop
        self.device = model.device
        self.distill_dts = [distill_dt(num_steps, i) for i in step_intervals(num_steps)] if model.distill else None

    def __call__(self, x, t, rows, ranges, *, slice_point, unconditional, kv_cache, kv_write, stage, counts,
                 active=None, sequences=1):
        """``x`` ``(sequences, C, frames, H, W)``; ``t`` per (sequence, chunk); ``rows`` index the caption
        table per (sequence, chunk); ``ranges`` are each chunk's key rows; ``counts`` its query tokens (for
        the FLOP count) and ``active`` its computed tokens (None: all)."""
        if active is not None and all(a is None for a in active):
            active = None  # every token of every chunk: the dense path
        caption, mask = self.captions.tensors(rows, sequences)
        t = torch.tensor(t, dtype=torch.float32).to(self.device, non_blocking=True)
        out = self.model(x, t, caption, mask, ranges, slice_point=slice_point, unconditional=unconditional,
                         distill_dt=None if self.distill_dts is None else self.distill_dts[stage], kv_cache=kv_cache,
                         kv_write_chunks=kv_write, active=active, stop=self.stop)
        self.recorder.count_call(rows, ranges, counts, sequences)
        return out
