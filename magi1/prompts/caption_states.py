"""Caption-states files: a prompt's encoded text, saved so that MAGI-1 can generate without a text encoder
(``python -m magi1 --caption-states FILE``; ComfyUI's MAGI-1 Save Caption States node writes them).

Format, version 1: a ``.safetensors`` file (never a pickle) with

metadata (strings):
    ``magi1_caption_states``: ``"1"``, the format version; a file without it is not a caption-states file
    ``positive_prompts``: ``"N"``, N >= 1 scheduled prompts (1 for a plain prompt)
    ``negative_prompts``: ``"M"``, M >= 0 (0: no negative prompt; the sampler then uses the null caption)

tensors, for ``SIDE`` = ``positive`` (i < N) and ``negative`` (i < M; none when M = 0):
    ``SIDE.first_chunks``: int64 ``(N,)``, the chunk each prompt starts at (counted from 0, the first chunk
        generated): 0 first, then increasing (``magi1.parse_prompt_schedule``; ``[0]`` for a plain prompt)
    ``SIDE.i.states``: float32, float16 or bfloat16 ``(L_i, D)``, the text encoder's states of prompt i
        (T5-XXL: D = 4096; a built-in model's encoder: its width), as encoded (before MAGI-1's special
        tokens: ``scheduled_captions`` adds them per chunk)
    ``SIDE.i.mask``: bool ``(L_i,)``, its attention mask (valid tokens first)
    Every prompt of a file has the same width D.

These are the entries of a MAGI-1 Text Encode CONDITIONING as the sampler node reads them
(``[(first_chunk, states, mask), ...]``); ``CaptionStates.captions`` and ``negative_captions`` build the
sampler's ``caption, caption_mask`` from them exactly as MAGI-1 Sampler does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .text import CAPTION_LENGTH, scheduled_captions

FORMAT_KEY = "magi1_caption_states"
FORMAT_VERSION = "1"
SIDES = ("positive", "negative")
STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CaptionStates:
    """A caption-states file's content: each side a schedule ``((first_chunk, states, mask), ...)``."""

    positive: Tuple[Tuple[int, torch.Tensor, torch.Tensor], ...]
    negative: Optional[Tuple[Tuple[int, torch.Tensor, torch.Tensor], ...]] = None

    @property
    def width(self):
        """The text states' width (4096 for T5-XXL)."""
        return self.positive[0][1].shape[1]

    def captions(self, chunks, special_tokens, length=CAPTION_LENGTH):
        """The prompt's ``caption, caption_mask`` for ``chunks`` chunks, with MAGI-1's per-chunk tokens."""
        return scheduled_captions(list(self.positive), chunks, special_tokens, length=length)

    def negative_captions(self, chunks, length=CAPTION_LENGTH):
        """The negative prompt's ``caption, caption_mask`` (no special tokens, as the sampler node builds
        them), or ``(None, None)`` without one."""
        if self.negative is None:
            return None, None
        return scheduled_captions(list(self.negative), chunks, length=length)

    def unused_prompts(self, chunks):
        """The first chunks of scheduled prompts that a run of ``chunks`` chunks does not reach."""
        return [first for first, _, _ in self.positive if first >= chunks]


def _tensors(side, schedule):
    """The file's tensors of one side, from a schedule ``[(first_chunk, states, mask), ...]``."""
    tensors = {f"{side}.first_chunks": torch.tensor([int(first) for first, _, _ in schedule], dtype=torch.int64)}
    for i, (_, states, mask) in enumerate(schedule):  # copies: safetensors refuses tensors that share memory
        tensors[f"{side}.{i}.states"] = torch.as_tensor(states).detach().cpu().contiguous().clone()
        tensors[f"{side}.{i}.mask"] = torch.as_tensor(mask).detach().cpu().bool().contiguous().clone()
    return tensors


def save_caption_states(path, positive, negative=None):
    """Write a caption-states file (format above). ``positive``: a schedule ``[(first_chunk, states (L, D),
    mask (L,)), ...]`` (one entry ``(0, states, mask)`` for a plain prompt); ``negative``: the same or None.
    What would not load back is refused before anything is written."""
    if not positive:
        raise ValueError("caption states need at least one positive prompt")
    tensors = _tensors("positive", positive)
    tensors.update(_tensors("negative", negative) if negative else {})
    metadata = {FORMAT_KEY: FORMAT_VERSION, "positive_prompts": str(len(positive)),
                "negative_prompts": str(len(negative) if negative else 0)}
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    _check_layout(os.fspath(path), shapes, metadata, what="cannot be saved")
    for side in SIDES:
        if f"{side}.first_chunks" in tensors:
            _check_first_chunks(os.fspath(path), "cannot be saved", side, tensors[f"{side}.first_chunks"].tolist())
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_caption_states(path):
    """Read and check a caption-states file (never unpickles): a ``CaptionStates``. A ``ValueError`` naming
    the file and what is wrong for anything else (``FileNotFoundError`` without a file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption states: no file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            # Another kind of file (a large checkpoint, say) is refused without reading its tensors.
            tensors = {k: f.get_tensor(k) for k in f.keys()} if FORMAT_KEY in metadata else {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a caption-states file: not a readable .safetensors file ({error})") from error
    layout = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    counts = _check_layout(path, layout, metadata, what="is not a valid caption-states file")
    sides = {}
    for side, count in zip(SIDES, counts):
        firsts = tensors[f"{side}.first_chunks"].tolist() if count else []
        _check_first_chunks(path, "is not a valid caption-states file", side, firsts)
        sides[side] = tuple((firsts[i], tensors[f"{side}.{i}.states"], tensors[f"{side}.{i}.mask"])
                            for i in range(count)) or None
    return CaptionStates(sides["positive"], sides["negative"])


def _check_layout(path, layout, metadata, what):
    """Check tensor names, shapes and dtypes (``layout``: name -> (shape, dtype)) and the metadata against
    the format; ``(positive count, negative count)``, else a ValueError naming ``path`` and the problem."""
    def fail(problem):
        raise ValueError(f"{path} {what}: {problem}")

    version = metadata.get(FORMAT_KEY)
    if version is None:
        fail(f"no '{FORMAT_KEY}' metadata (save one with MAGI-1 Save Caption States in ComfyUI, or "
             "magi1.prompts.caption_states.save_caption_states)")
    if version != FORMAT_VERSION:
        fail(f"format version {version!r}; this pack reads version {FORMAT_VERSION} (a newer pack may read it)")
    counts = []
    for side in SIDES:
        text = metadata.get(f"{side}_prompts", "")
        if not text.isdigit() or (side == "positive" and int(text) < 1):
            fail(f"metadata '{side}_prompts' must be a whole number{' >= 1' if side == 'positive' else ''}, "
                 f"got {text!r}")
        counts.append(int(text))
    expected = {f"{side}.first_chunks" for side, n in zip(SIDES, counts) if n}
    expected |= {f"{side}.{i}.{part}" for side, n in zip(SIDES, counts) for i in range(n)
                 for part in ("states", "mask")}
    missing, unexpected = sorted(expected - set(layout)), sorted(set(layout) - expected)
    if missing:
        fail(f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        fail(f"unexpected tensor {unexpected[0]!r} (the metadata counts {counts[0]} positive and {counts[1]} "
             "negative prompts)")
    widths = set()
    for side, n in zip(SIDES, counts):
        if n:
            _check_side(side, n, layout, fail)
            widths |= {layout[f"{side}.{i}.states"][0][1] for i in range(n)}
    if len(widths) > 1:
        fail(f"the prompts' states differ in width {sorted(widths)}; they must all come from one text encoder")
    return tuple(counts)


def _check_side(side, count, layout, fail):
    """The shapes and dtypes of one side's tensors (see ``_check_layout``)."""
    shape, dtype = layout[f"{side}.first_chunks"]
    if shape != (count,) or dtype != torch.int64:
        fail(f"'{side}.first_chunks' must be int64 of shape ({count},), got {_describe(shape, dtype)}")
    for i in range(count):
        states_shape, states_dtype = layout[f"{side}.{i}.states"]
        mask_shape, mask_dtype = layout[f"{side}.{i}.mask"]
        if len(states_shape) != 2 or states_dtype not in STATE_DTYPES:
            fail(f"'{side}.{i}.states' must be float32, float16 or bfloat16 of shape (tokens, width), got "
                 f"{_describe(states_shape, states_dtype)}")
        if mask_shape != states_shape[:1] or mask_dtype != torch.bool:
            fail(f"'{side}.{i}.mask' must be bool of shape ({states_shape[0]},) like its states, got "
                 f"{_describe(mask_shape, mask_dtype)}")


def _check_first_chunks(path, what, side, firsts):
    """A schedule starts at chunk 0 and its prompts follow in order (``scheduled_captions`` needs it)."""
    if firsts and (firsts[0] != 0 or any(b <= a for a, b in zip(firsts, firsts[1:]))):
        raise ValueError(f"{path} {what}: '{side}.first_chunks' must start at chunk 0 and increase, got {firsts}")


def _describe(shape, dtype):
    return f"{str(dtype).replace('torch.', '')} of shape {tuple(shape)}"
