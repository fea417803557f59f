"""What a sampling run records about itself: the analytic FLOPs of every DiT call and of the dense run
it replaces, one record per chunk and step, the active-token masks, time and memory."""

from __future__ import annotations

import time

import torch

from ..network.flops import flops
from .sample_stats import ChunkStepRecord, MaskRecorder, SampleStats


class Recorder:
    """Fills one ``SampleStats``; the caption lengths decide each call's cross-attention FLOPs."""

    def __init__(self, mode, config, captions, layout, record_masks, window_size=4):
        self.config, self.captions, self.tokens = config, captions, layout.tokens_per_chunk
        self.stats = SampleStats(mode=mode)
        if record_masks:
            self.stats.masks = MaskRecorder(layout.chunk_num, layout.chunk_width,
                                            layout.latent_height // config.patch_size,
                                            layout.latent_width // config.patch_size, window_size)
        self._began = None

    def start(self, device):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._began = time.perf_counter()

    def finish(self, device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        self.stats.wall_seconds = time.perf_counter() - self._began
        return self.stats

    def flops_of(self, queries, keys, row):
        return flops(self.config, query_tokens=queries, key_tokens=keys,
                     caption_tokens=self.captions.lengths[row]).total

    def count_call(self, rows, ranges, counts, sequences=1):
        """One DiT call: ``rows`` per (sequence, chunk); each chunk's key ``ranges`` and query ``counts``,
        the same for every sequence."""
        self.stats.model_calls += 1
        per_sequence = len(rows) // sequences
        for i, row in enumerate(rows):
            start, end = ranges[i % per_sequence]
            self.stats.flops += self.flops_of(counts[i % per_sequence], end - start, row)

    def count_dense(self, groups):
        """What the released sampler spends on a step: ``groups`` of ``(queries, keys, row)`` per call."""
        total = 0.0
        for group in groups:
            total += sum(self.flops_of(*call) for call in group)
        self.stats.dense_flops += total

    def count_as_dense(self, encode):
        """Run ``encode`` (the prefix's cache writes, never skipped): its FLOPs count as dense ones too."""
        before = self.stats.flops
        encode()
        self.stats.dense_flops += self.stats.flops - before

    def record_step(self, step, chunks, chunk_steps, times, decisions):
        """The window's chunks at this step; ``decisions`` None without a cache policy."""
        masks = self.stats.masks
        if masks is not None:
            masks.start_step()
        for j, (chunk, chunk_step, t) in enumerate(zip(chunks, chunk_steps, times)):
            decision = None if decisions is None else decisions[j]
            if decision is None:
                record = ChunkStepRecord(step, chunk, chunk_step, t, "off", "dense", self.tokens, self.tokens)
            else:
                record = ChunkStepRecord(step, chunk, chunk_step, t, decision.phase, decision.action,
                                         decision.n_active, decision.n_tokens)
            self.stats.records.append(record)
            if masks is not None:
                masks.record(chunk, record.action, None if decision is None else decision.active)
