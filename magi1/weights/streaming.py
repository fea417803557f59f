"""Layer streaming ("block swap"): run a DiT whose transformer layers do not all fit on the GPU.

``stream_layers(model, device, resident_layers)`` keeps the first ``resident_layers`` transformer layers
(``model.videodit_blocks.layers``) and everything outside them (embedders, RoPE, final norm and linear)
on ``device``; every other layer lives in host memory (pinned when ``device`` is CUDA) and is copied to
the device just before it runs, then released after it. While a streamed layer computes, the next
streamed one is copied on a side CUDA stream, so at most ``resident_layers + 2`` layers hold device
memory at once (``streamed_device_bytes``). Outputs equal those of the fully resident model bit for bit:
the same weights meet the same kernels.

On the CPU (``device="cpu"``) the same bookkeeping runs with clones for the "device" copies and no
streams, so that it can be tested anywhere.

Inference only: call the model under ``torch.no_grad()`` / ``torch.inference_mode()`` (``generate``
does). Do not ``.to()`` / ``load_state_dict`` the model while streaming; ``streamer.remove()`` first.

CUDA ordering, for the reader: a prefetch allocates its device copies on the compute stream, then the
side stream waits for the compute stream (so memory freed by earlier layers is no longer read) and
copies; the compute stream waits on the copy's event before the layer runs. The copies are freed on the
compute stream after the layer's kernels were queued, so the caching allocator's stream-ordered reuse
is safe without ``record_stream``. An abandoned prefetch (an exception midway) is waited for before its
memory is returned.
"""

from __future__ import annotations

import torch
from torch import nn

from .tensor_slots import set_slot_tensor, slot_key, slot_tensor, tensor_slots


def _host_copy(tensor, pin):
    """A host copy of ``tensor``: pinned (for asynchronous copies) when ``pin``, else the CPU tensor."""
    if not pin:
        return tensor.detach().to("cpu")
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor.detach())


def _nbytes(module):
    return sum(slot_tensor(slot).numel() * slot_tensor(slot).element_size() for slot in tensor_slots(module)[0])


def streamed_device_bytes(model, resident_layers, in_flight=2):
    """Bytes of the model's weights on the compute device at once when streaming with
    ``resident_layers``: everything outside the transformer layers, the first ``resident_layers``
    layers, and the ``in_flight`` (2: the running layer and the one being prefetched) largest
    streamed layers. Works on a ``device="meta"`` model (plan before loading). Activations, KV caches
    and the allocator's slack are not included."""
    layers = list(model.videodit_blocks.layers)
    resident = max(0, min(int(resident_layers), len(layers)))
    sizes = [_nbytes(layer) for layer in layers]
    rest = _nbytes(model) - sum(sizes)
    streamed = sorted(sizes[resident:], reverse=True)[:max(0, int(in_flight))]
    return rest + sum(sizes[:resident]) + sum(streamed)


class _StreamedLayer:
    """One streamed layer: its tensor slots, their host copies, and the device copies while it is
    loaded or being prefetched (``ready``: the CUDA event of a pending prefetch)."""

    def __init__(self, module, pin):
        self.slots, self.names = tensor_slots(module)
        self.requires_grad = any(slot[2] and slot[0]._parameters[slot[1]].requires_grad for slot in self.slots)
        self.host = [_host_copy(slot_tensor(slot), pin) for slot in self.slots]
        self.device_copies = None
        self.ready = None
        self.point(self.host)

    def point(self, tensors):
        for slot, tensor in zip(self.slots, tensors):
            set_slot_tensor(slot, tensor)


class LayerStreamer:
    """The hooks and state of one streamed model (see the module docstring). ``max_resident``: the
    most transformer layers whose weights were on the device at once (counting a prefetch);
    ``resident_now``: how many are now; ``streamed``: the indices of the streamed layers."""

    def __init__(self, model, device, resident_layers):
        layers = model.videodit_blocks.layers
        if int(resident_layers) < 0:
            raise ValueError(f"resident_layers must be >= 0, got {resident_layers}")
        if getattr(model, "_layer_streamer", None) is not None:
            raise RuntimeError("this model already streams its layers: call its streamer's remove() first")
        if getattr(model, "parallel", None) is not None:
            raise ValueError("a model shared between processes (magi1.distributed.parallel) cannot also stream its layers")
        self.model, self.device = model, torch.device(device)
        self.resident_layers = min(int(resident_layers), len(layers))
        self.streamed = list(range(self.resident_layers, len(layers)))
        cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(self.device) if cuda and self.streamed else None
        with torch.no_grad(), torch.inference_mode(False):
            self._layers = {i: _StreamedLayer(layers[i], pin=cuda) for i in self.streamed}
            skip = {slot_key(slot) for layer in self._layers.values() for slot in layer.slots}
            for slot in tensor_slots(model)[0]:
                if slot_key(slot) not in skip:
                    set_slot_tensor(slot, slot_tensor(slot).to(self.device))
        self.resident_now = self.max_resident = self.resident_layers
        self._needs_grad = any(layer.requires_grad for layer in self._layers.values())
        self._hooks = []
        if self.streamed:
            self._attach(model, layers)
        model._layer_streamer = self

    def _attach(self, model, layers):
        self._hooks.append(model.register_forward_pre_hook(self._begin))
        self._hooks.append(model.register_forward_hook(self._end, always_call=True))
        for index, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            if index in self._layers:
                self._hooks.append(layer.register_forward_hook(self._post_hook(index), always_call=True))

    def _pre_hook(self, index):
        def hook(module, args):
            self._check_no_grad()
            if index in self._layers:
                self._load(index)
            self._prefetch(max(index + 1, self.resident_layers))
        return hook

    def _post_hook(self, index):
        def hook(module, args, output):
            self._release(index)
        return hook

    def _begin(self, module, args):
        """Start of a model call: drop what an interrupted call left, prefetch the first streamed layer."""
        self._check_no_grad()
        self.release_all()
        self._prefetch(self.resident_layers)

    def _end(self, module, args, output):
        self.release_all()

    def _check_no_grad(self):
        if self._needs_grad and torch.is_grad_enabled():
            raise RuntimeError("layer streaming is for inference: call the model under torch.no_grad() or "
                               "torch.inference_mode()")

    def _copy_now(self, layer):
        """Device copies of a layer's host tensors on the current stream (clones on the CPU)."""
        with torch.no_grad(), torch.inference_mode(False):
            if self.device.type == "cpu":
                return [h.clone() for h in layer.host]
            return [h.to(self.device, non_blocking=True) for h in layer.host]

    def _prefetch(self, index):
        """Start copying streamed layer ``index`` to the device (side stream on CUDA; at once elsewhere)."""
        layer = self._layers.get(index)
        if layer is None or layer.device_copies is not None:
            return
        if self._side is None:
            layer.device_copies = self._copy_now(layer)
        else:
            compute = torch.cuda.current_stream(self.device)
            with torch.no_grad(), torch.inference_mode(False):
                copies = [torch.empty_like(h, device=self.device) for h in layer.host]  # on the compute stream
                self._side.wait_stream(compute)
                with torch.cuda.stream(self._side):
                    for copy, host in zip(copies, layer.host):
                        copy.copy_(host, non_blocking=True)
                    layer.ready = torch.cuda.Event()
                    layer.ready.record(self._side)
            layer.device_copies = copies
        self._count()

    def _load(self, index):
        """Point streamed layer ``index`` at device copies, waiting for its prefetch or copying now."""
        for other in [i for i, layer in self._layers.items() if layer.device_copies is not None]:
            if other not in (index, index + 1):  # left over by a call that stopped midway
                self._release(other)
        layer = self._layers[index]
        if layer.device_copies is None:
            layer.device_copies = self._copy_now(layer)
        self._wait(layer)
        layer.point(layer.device_copies)
        self._count()

    def _wait(self, layer):
        if layer.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
            layer.ready = None

    def _release(self, index):
        """Point streamed layer ``index`` back at its host copies and free its device copies."""
        layer = self._layers[index]
        if layer.device_copies is None:
            return
        self._wait(layer)  # an abandoned prefetch: its memory must not be reused before the copy ends
        layer.point(layer.host)
        layer.device_copies = None
        self._count()

    def release_all(self):
        """Free every streamed layer's device copies (between calls nothing streamed stays on the device)."""
        for index in self._layers:
            self._release(index)

    def _count(self):
        loaded = sum(layer.device_copies is not None for layer in self._layers.values())
        self.resident_now = self.resident_layers + loaded
        self.max_resident = max(self.max_resident, self.resident_now)

    def host_copies(self, index):
        """``{name: host tensor}`` of streamed layer ``index`` (names as in the layer's ``state_dict``)."""
        layer = self._layers[index]
        return dict(zip(layer.names, layer.host))

    def remove(self):
        """Detach the hooks and leave the whole model resident on the device."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.release_all()
        with torch.no_grad(), torch.inference_mode(False):
            for layer in self._layers.values():
                layer.point([h.to(self.device) for h in layer.host])
        self._layers = {}
        self.resident_now = len(self.model.videodit_blocks.layers)
        if getattr(self.model, "_layer_streamer", None) is self:
            del self.model._layer_streamer


def stream_layers(model: nn.Module, device, resident_layers: int) -> LayerStreamer:
    """Stream ``model``'s transformer layers through ``device``, keeping its first ``resident_layers``
    layers (and all non-layer modules) resident; ``resident_layers >= num_layers`` streams nothing
    and just moves the model. Returns the ``LayerStreamer``; ``remove()`` it to undo."""
    return LayerStreamer(model, device, resident_layers)
