"""The DiT's key/value cache: every layer's keys (after norm and RoPE) and values at absolute token
positions of the video, allocated once per generation.

Token ``p`` of the video is ``chunk * chunk_tokens + offset`` (offset in (frame, row, column) order). A
call reads the clean chunks before its window from here, and a call that updates the cache writes its
window's fresh keys and values at their positions, as the official pipeline does. Because those rows
then hold the latest keys and values of every window chunk, the sparse forward also reads the keys and
values of the tokens it does not recompute from here.
"""

from __future__ import annotations

import torch

from .checks import check_int


class KVCache:
    """Preallocated per-layer buffers ``(capacity, kv_heads, head_dim)`` for keys and for values.

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

    def read(self, layer, start, end):
        """Rows ``[start, end)`` of one layer on the compute device: views of the buffers, or copies
        when offloaded (then write changed rows back with ``write``)."""
        k, v = self.keys[layer][start:end], self.values[layer][start:end]
        if self.offload:
            k = k.to(self.device, non_blocking=True)
            v = v.to(self.device, non_blocking=True)
        return k, v

    def write(self, layer, start, k, v):
        """Store rows ``[start, start + len(k))`` of one layer."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"KVCache write of rows [{start}, {end}) exceeds its capacity {self.capacity}")
        self.keys[layer][start:end].copy_(k, non_blocking=True)
        self.values[layer][start:end].copy_(v, non_blocking=True)
