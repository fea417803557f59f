"""The DiT's key/value cache: every layer's keys (after norm and RoPE) and values of a sliding span of
token positions of the video.

Token ``p`` of the video is ``chunk * chunk_tokens + offset`` (offset in (frame, row, column) order). A
call reads the clean chunks before its window from here, and a call that updates the cache writes its
window's fresh keys and values at their positions, as the official pipeline does. Because those rows
then hold the latest keys and values of every window chunk, the sparse forward also reads the keys and
values of the tokens it does not recompute from here.

The official pipeline allocates rows for the whole video. Here the buffers hold ``capacity`` rows: the
positions ``[base, base + capacity)``. The sampler sizes them by the widest span of rows one call
touches (``magi1.sampling.schedule.kv_span``: the schedule's key ranges reach a few chunks back, never the whole
video), and when a call needs rows past the end, ``reserve`` slides the span forward: the rows still
needed move to the front (an exact copy), the slots of chunks that no later call reads are reused. So
memory does not grow with the video, and every value read is the one that was written.
"""

from __future__ import annotations

import torch

from ..checks import check_int


class KVCache:
    """Per-layer buffers ``(capacity, kv_heads, head_dim)`` for keys and for values, holding the absolute
    rows ``[base, base + capacity)`` (``base`` starts at 0 and only grows, by ``reserve``).

    ``offload=True`` keeps them in (pinned, when CUDA is present) host memory and copies the rows a
    call needs to the compute device and back: slower, for GPUs too small for the cache.
    """

    def __init__(self, num_layers, capacity, kv_heads, head_dim, *, device=None, dtype=torch.float32,
                 offload=False):
        for name, value in (("num_layers", num_layers), ("capacity", capacity), ("kv_heads", kv_heads),
                            ("head_dim", head_dim)):
            check_int(f"KVCache {name}", value, low=1)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.capacity = capacity
        self.base = 0
        self.offload = bool(offload)
        storage = torch.device("cpu") if self.offload else self.device
        pin = self.offload and torch.cuda.is_available()

        def buffer():
            return torch.zeros(capacity, kv_heads, head_dim, dtype=dtype, device=storage, pin_memory=pin)

        self.keys = [buffer() for _ in range(num_layers)]
        self.values = [buffer() for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model, capacity, *, device=None, dtype=None, offload=False):
        """A cache shaped for ``model`` (a ``MagiDiT``), on its device and in its compute dtype by default.
        Under context parallelism it holds only the KV heads this process attends with."""
        config = model.config
        cp = getattr(model, "context_parallel", None)
        kv_heads = config.num_query_groups if cp is None else cp.local_kv_heads
        return cls(config.num_layers, capacity, kv_heads, config.kv_channels,
                   device=device if device is not None else model.device,
                   dtype=dtype if dtype is not None else model.dtype, offload=offload)

    @property
    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.keys + self.values)

    @property
    def end(self):
        """One past the last absolute row the buffers hold now."""
        return self.base + self.capacity

    def reserve(self, first, end):
        """Make the absolute rows ``[first, end)`` addressable. When ``end`` is past the rows held, the span
        slides forward just enough: the rows kept move to the front (an exact copy) and the earliest ones
        are given up for good (a later access to them raises), never any from ``first`` on."""
        if end - first > self.capacity:
            raise ValueError(f"KVCache rows [{first}, {end}) do not fit its capacity of {self.capacity} rows")
        self._check_held(first, first)
        if end <= self.end:
            return
        base = min(first, max(self.base, end - self.capacity))
        shift, kept = base - self.base, self.end - base
        if self.offload and torch.cuda.is_available():
            torch.cuda.synchronize()  # offloaded rows are written by asynchronous device-to-host copies
        for buffer in self.keys + self.values:
            _move_to_front(buffer, shift, kept)
        self.base = base

    def stored(self, layer, start, end):
        """Views of the stored rows ``[start, end)`` of one layer (host memory when offloaded)."""
        self._check_held(start, end)
        rows = slice(start - self.base, end - self.base)
        return self.keys[layer][rows], self.values[layer][rows]

    def read(self, layer, start, end):
        """Rows ``[start, end)`` of one layer on the compute device: views of the buffers, or copies
        when offloaded (then write changed rows back with ``write``)."""
        k, v = self.stored(layer, start, end)
        if self.offload:
            k = k.to(self.device, non_blocking=True)
            v = v.to(self.device, non_blocking=True)
        return k, v

    def write(self, layer, start, k, v):
        """Store rows ``[start, start + len(k))`` of one layer (they must be held)."""
        keys, values = self.stored(layer, start, start + k.shape[0])
        keys.copy_(k, non_blocking=True)
        values.copy_(v, non_blocking=True)

    def copy_rows(self, source, start, end):
        """Rows ``[start, end)`` of every layer from another cache of the same shape (made addressable here)."""
        self.reserve(start, end)
        if source.offload and torch.cuda.is_available():
            torch.cuda.synchronize()
        for layer in range(len(self.keys)):
            keys, values = self.stored(layer, start, end)
            source_keys, source_values = source.stored(layer, start, end)
            keys.copy_(source_keys)
            values.copy_(source_values)

    def _check_held(self, start, end):
        if start < self.base or end > self.end:
            raise ValueError(f"KVCache rows [{start}, {end}) are not held: it holds rows [{self.base}, {self.end}) "
                             "(rows before are given up once a call reserves past them)")


def _move_to_front(buffer, shift, kept):
    """Rows ``[shift, shift + kept)`` of ``buffer`` to ``[0, kept)``, in pieces that do not overlap."""
    if shift <= 0 or kept <= 0:
        return
    for first in range(0, kept, shift):
        n = min(shift, kept - first)
        buffer[first:first + n].copy_(buffer[shift + first:shift + first + n])
