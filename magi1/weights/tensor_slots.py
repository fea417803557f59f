"""Where a module keeps each of its tensors, so that layer streaming and layer sharding can swap the tensor
behind a parameter or buffer without rebuilding the module.

A slot is ``(owner module, attribute name, is_parameter)``.
"""

from __future__ import annotations


def tensor_slots(module):
    """``(slots, names)``: the slot of every parameter and buffer of ``module`` and its name (as in the
    module's ``state_dict``)."""
    slots, names = [], []
    for prefix, owner in module.named_modules():
        for name, is_parameter in [(n, True) for n in owner._parameters] + [(n, False) for n in owner._buffers]:
            if (owner._parameters if is_parameter else owner._buffers)[name] is not None:
                slots.append((owner, name, is_parameter))
                names.append(f"{prefix}.{name}" if prefix else name)
    return slots, names


def slot_key(slot):
    """A hashable identity of a slot."""
    return id(slot[0]), slot[1]


def slot_tensor(slot):
    """The tensor a slot holds (a parameter's data)."""
    owner, name, is_parameter = slot
    return owner._parameters[name].data if is_parameter else owner._buffers[name]


def set_slot_tensor(slot, tensor):
    """Point a slot at ``tensor``; a parameter keeps its Parameter object, so ``module.weight`` reads stay valid."""
    owner, name, is_parameter = slot
    if is_parameter:
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor
