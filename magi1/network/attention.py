"""Attention kernels for the DiT: flash-attn when it is installed and the tensors are on CUDA in half
precision, torch SDPA otherwise. Both compute full (non-causal) softmax attention with grouped-query
heads: query head ``i`` reads key/value head ``i // (query_heads // kv_heads)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: pip install flash-attn
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # also covers a flash-attn built against another torch
    flash_attn_func = flash_attn_varlen_func = None

BACKENDS = ("auto", "flash", "sdpa")


def _sdpa_has_gqa():
    """Whether this torch's SDPA takes ``enable_gqa`` (torch 2.5 and newer)."""
    try:
        x = torch.zeros(1, 1, 1, 1)
        F.scaled_dot_product_attention(x, x, x, enable_gqa=False)
    except TypeError:
        return False
    return True


SDPA_GQA = _sdpa_has_gqa()


def flash_available():
    return flash_attn_func is not None


def resolve_backend(name, device, dtype):
    """The kernel family to use for tensors on ``device`` in ``dtype``: "flash" or "sdpa"."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    flash_ok = flash_available() and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name == "flash" and not flash_ok:
        if not flash_available():
            raise ValueError("attention backend 'flash' needs the flash-attn package (pip install flash-attn); "
                             "use 'sdpa' or 'auto'")
        raise ValueError(f"attention backend 'flash' needs CUDA tensors in float16/bfloat16, got {device.type} "
                         f"{dtype}; use 'sdpa' or 'auto'")
    if name == "sdpa" or not flash_ok:
        return "sdpa"
    return "flash"


def attend(q, k, v, backend):
    """Full attention. q ``(B, Sq, Hq, D)``, k and v ``(B, Sk, Hkv, D)`` -> ``(B, Sq, Hq, D)``."""
    if backend == "flash":
        return flash_attn_func(q, k, v)
    return _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sdpa(q, k, v, gqa=None):
    """SDPA on ``(B, H, S, D)`` tensors with grouped-query heads. ``gqa``: use SDPA's own ``enable_gqa``
    (torch >= 2.5; the default where available) or repeat each key/value head for its query heads."""
    grouped = q.shape[1] != k.shape[1]
    if SDPA_GQA if gqa is None else gqa:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)
    if grouped:  # torch 2.4: no enable_gqa; the same grouping, made explicit
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v)


def attend_segments(q, k, v, q_lengths, k_lengths, backend):
    """Packed variable-length attention: segment ``i`` of ``q`` attends to segment ``i`` of ``k``/``v``.

    q ``(Sq, Hq, D)`` and k, v ``(Sk, Hkv, D)`` hold their segments back to back; the lengths are host
    integers. Used for cross-attention, where every chunk reads only its own valid caption tokens.
    """
    if q.shape[0] == 0:  # a context-parallel rank without queries in this call
        return torch.empty_like(q)
    if backend == "flash":
        cu_q = _cumulative(q_lengths, q.device)
        cu_k = _cumulative(k_lengths, q.device)
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lengths), max(k_lengths))
    out = torch.empty_like(q)
    q_start = k_start = 0
    for q_len, k_len in zip(q_lengths, k_lengths):
        if q_len:
            rows = slice(q_start, q_start + q_len)
            keys = slice(k_start, k_start + k_len)
            out[rows] = attend(q[None, rows], k[None, keys], v[None, keys], backend)[0]
        q_start += q_len
        k_start += k_len
    return out


def _cumulative(lengths, device):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True)
