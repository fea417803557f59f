"""The DiT's transformer layers spread over the processes of a context-parallel group, one owner each.

Layer ``i`` belongs to rank ``i % cp`` of its group: that rank alone reads the layer from the checkpoint
(``magi1.load_dit(parallel=...)``) and keeps it. Every other rank holds the layer's parameters as meta
tensors (no memory). The owner broadcasts the layer to the group as one flat byte buffer (float8 and
float32 alike) while the layer before it computes (on a communicator of its own, beside the all-to-alls);
the others point the layer's parameters at views of that buffer when it runs and drop it when it is done.
Weight memory per rank is about ``1 / cp`` of the layers plus at most two in flight (the running one and
the next), and everything outside the layers (embedders, final layer: about 1% of the weights) stays
replicated. The bytes broadcast per DiT call equal the layers' size, as an FSDP all-gather's would.

Every rank of the group must run the same DiT calls in the same order (the sampler guarantees it), so
that the broadcasts pair up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.parallel import collective_buffers
from .tensor_slots import slot_tensor, tensor_slots

ALIGN = 16  # bytes: each tensor starts aligned in the flat buffer, so that typed views of it are allowed


def _set_parameter(slot, tensor):
    """Point a parameter slot at ``tensor`` (a new Parameter: ``.data`` cannot switch devices to meta)."""
    owner, name, _ = slot
    owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)


def layer_prefix(index):
    return f"videodit_blocks.layers.{index}."


def owned_layers(num_layers, parallel):
    """Indices of the transformer layers this rank owns."""
    return [i for i in range(num_layers) if i % parallel.cp == parallel.cp_rank]


class _SharedLayer:
    """One layer's tensor slots, their shapes and dtypes, and their places in the flat buffer."""

    def __init__(self, module, owner):
        self.owner = owner
        self.slots, _ = tensor_slots(module)
        self.meta = [torch.empty(slot_tensor(s).shape, dtype=slot_tensor(s).dtype, device="meta") for s in self.slots]
        self.offsets, offset = [], 0
        for t in self.meta:
            self.offsets.append(offset)
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self.nbytes = offset

    def pack(self, device):
        flat = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        for slot, offset in zip(self.slots, self.offsets):
            t = slot_tensor(slot)
            flat[offset: offset + t.numel() * t.element_size()] = t.reshape(-1).view(torch.uint8)
        return flat

    def point_at(self, flat):
        for slot, meta, offset in zip(self.slots, self.meta, self.offsets):
            size = meta.numel() * meta.element_size()
            _set_parameter(slot, flat[offset: offset + size].view(meta.dtype).view(meta.shape))

    def drop(self):
        for slot, meta in zip(self.slots, self.meta):
            _set_parameter(slot, meta)


class LayerSharding:
    """The hooks that fetch each layer from its owner (see the module docstring)."""

    def __init__(self, model, parallel):
        if getattr(model, "_layer_streamer", None) is not None:
            raise ValueError("a model whose layers stream (resident_layers) cannot also be shared between processes")
        self.parallel = parallel
        layers = model.videodit_blocks.layers
        self.layers = [_SharedLayer(layer, i % parallel.cp) for i, layer in enumerate(layers)]
        self.broadcast_bytes = 0  # counted per call, for the scaling report
        self._pending = {}  # layer -> (work, buffer) of a broadcast started ahead of the layer
        self._hooks = [model.register_forward_hook(self._end_of_call, always_call=True)]
        self._flat = {}  # the owned layers' weights, each in the flat buffer it is broadcast from
        for index, layer in enumerate(layers):
            shared = self.layers[index]
            if shared.owner == parallel.cp_rank:
                self._flat[index] = shared.pack(parallel.device)
                shared.point_at(self._flat[index])
            else:
                shared.drop()  # frees a full copy this rank may hold (e.g. a built-in model)
            self._hooks.append(layer.register_forward_pre_hook(self._before(index)))
            self._hooks.append(layer.register_forward_hook(self._after(index), always_call=True))

    def _fetch(self, index):
        """Start broadcasting layer ``index`` from its owner: ``(work, buffer)``."""
        shared, par = self.layers[index], self.parallel
        mine = shared.owner == par.cp_rank
        with collective_buffers():
            flat = self._flat[index] if mine else torch.empty(shared.nbytes, dtype=torch.uint8, device=par.device)
        source = dist.get_global_rank(par.weights_group, shared.owner)
        self.broadcast_bytes += shared.nbytes
        return dist.broadcast(flat, source, group=par.weights_group, async_op=True), flat

    def _before(self, index):
        def hook(module, args):
            work, flat = self._pending.pop(index, None) or self._fetch(index)
            work.wait()
            if index + 1 < len(self.layers):  # the next layer travels while this one computes
                self._pending[index + 1] = self._fetch(index + 1)
            shared = self.layers[index]
            if shared.owner != self.parallel.cp_rank:
                shared.point_at(flat)
        return hook

    def _end_of_call(self, module, args, output):
        """A call that stopped midway leaves the next layer's broadcast started: finish and drop it."""
        for work, _ in self._pending.values():
            work.wait()
        self._pending.clear()

    def _after(self, index):
        def hook(module, args, output):
            shared = self.layers[index]
            if shared.owner != self.parallel.cp_rank:
                shared.drop()
        return hook

    def remove(self):
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def distribute(model, parallel):
    """Share ``model`` (a ``MagiDiT`` on ``parallel.device``) between the processes of ``parallel``:
    context parallel calls, and each transformer layer kept by its owner only. Returns the model."""
    if parallel is None:
        return model
    if getattr(model, "parallel", None) is not None or getattr(model, "_layer_streamer", None) is not None:
        raise ValueError("this model is already shared between processes or streams its layers: distribute a "
                         "freshly loaded model")
    model.parallel = parallel
    if parallel.cp > 1:  # (one process per guidance group: nothing to exchange inside a call)
        model.context_parallel = parallel.context(model.config)
        if parallel.shard_weights:
            model._layer_sharding = LayerSharding(model, parallel)
    return model
