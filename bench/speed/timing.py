"""How the benchmarks time things: the median of repeated calls (CUDA events on a GPU, warm-up excluded),
and the time a sampler spends inside its DiT."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, repeats, device, warmup=2):
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


class InsideDiT:
    """Adds up the seconds spent inside a DiT's forward (synchronised on CUDA) until ``remove()``."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0
        original = model.forward
        cuda = model.device.type == "cuda"

        def forward(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = original(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - began
            return out

        model.forward = forward

    def remove(self):
        del self.model.forward  # back to the class's forward
