"""The captions of one generation as a table of distinct rows: the null caption first, then the prompt's
rows and the negative prompt's, and for every generated chunk its row per stream.

The table stays in host memory; a call's rows are copied to the device when it reads them and leave it
when a call no longer does, so that a prompt schedule's rows for a long video never crowd the device.
Chunks in a row that read the same caption (a prompt's chunks more than 7 ahead of the end all read the
same DURATION token) share one row."""

from __future__ import annotations

import torch

from ..prompts.text import ChunkCaptions, null_caption


class CaptionRows:
    """``table`` ``(rows, L, D)`` and ``masks`` ``(rows, L)`` in host memory, each row's valid-token count
    (``lengths``), and the row a chunk reads in the "positive" stream (the prompt) or the "negative" one
    (the negative prompt, else the null caption)."""

    NULL = 0  # clean and prefix chunks, and unconditional passes without a negative prompt

    def __init__(self, model, layout, caption, caption_mask, negative_caption=None, negative_mask=None):
        config, device = model.config, model.device
        self.chunk_offset = layout.chunk_offset
        self._generated = layout.chunk_num - layout.chunk_offset
        null, null_mask = null_caption(model.y_embedder.null_caption_embedding.to("cpu"))
        self._shape = (null.shape[0], config.caption_channels)
        self._device = device
        embeddings, masks = [null[None]], [null_mask[None]]

        positive = self._checked("caption", caption, caption_mask)
        # An empty prompt: the released pipeline then uses the null caption.
        self.positive = [self.NULL] * self._generated
        if bool(positive[1].any()):
            self.positive = self._append(embeddings, masks, *positive)
        self.negative = [self.NULL] * self._generated
        if negative_caption is not None:
            self.negative = self._append(embeddings, masks, *self._checked("negative_caption", negative_caption,
                                                                          negative_mask))
        self.table = torch.cat(embeddings)
        self.masks = torch.cat(masks)
        self.lengths = self.masks.sum(dim=1).tolist()
        self._on_device = {}  # row -> (caption, mask) on the device, for the rows the last call read

    def row(self, chunk, stream):
        """Row of a noisy chunk in a stream ("positive" or "negative")."""
        rows = self.positive if stream == "positive" else self.negative
        return rows[chunk - self.chunk_offset]

    def call_rows(self, plan, stream):
        """The rows of one call's chunks: the null caption for a refreshed clean chunk, then the window's."""
        return [self.NULL] * int(plan.refresh_clean) + [self.row(c, stream) for c in range(plan.start, plan.end)]

    def tensors(self, rows, sequences):
        """The captions and masks ``(sequences, chunks, L, D)``, ``(sequences, chunks, L)`` of ``rows``
        (per sequence, per chunk)."""
        chunks = len(rows) // sequences
        for row in [r for r in self._on_device if r not in rows]:
            del self._on_device[row]
        for row in rows:
            if row not in self._on_device:
                self._on_device[row] = (self.table[row].to(self._device), self.masks[row].to(self._device))
        caption = torch.stack([self._on_device[r][0] for r in rows]).view(sequences, chunks, *self.table.shape[1:])
        return caption, torch.stack([self._on_device[r][1] for r in rows]).view(sequences, chunks, -1)

    def close(self):
        """Drop the tables (the run is over)."""
        self.table = self.masks = None
        self._on_device = {}

    def _checked(self, name, emb, mask):
        """``(rows, masks, row of each chunk or None)``: a ``ChunkCaptions``' own, else the tensors' with one row
        per chunk (or one for all)."""
        if isinstance(emb, ChunkCaptions):
            if mask is not None:
                raise ValueError(f"{name} is a ChunkCaptions, which holds its masks: pass no {name}'s mask")
            self._count(name, len(emb))
            return (*self._tensors(name, emb.table, emb.masks), list(emb.rows))
        emb, mask = self._tensors(name, emb, mask)
        self._count(name, emb.shape[0])
        return emb, mask, None

    def _tensors(self, name, emb, mask):
        length, width = self._shape
        if mask is None:
            raise ValueError(f"{name} needs its mask (which caption tokens are valid)")
        if emb.dim() == 2:
            emb, mask = emb[None], mask[None]
        if emb.dim() != 3 or emb.shape[1:] != (length, width):
            raise ValueError(f"{name} must be (chunks, {length}, {width}) or ({length}, {width}), got {list(emb.shape)}")
        if tuple(mask.shape) != tuple(emb.shape[:2]):
            raise ValueError(f"{name} mask must be {list(emb.shape[:2])}, got {list(mask.shape)}")
        return emb.to("cpu", torch.float32), mask.to("cpu").bool()

    def _count(self, name, chunks):
        if chunks not in (1, self._generated):
            raise ValueError(f"{name} has {chunks} chunks; this video generates {self._generated} "
                             f"(give one per generated chunk, or one for all)")

    def _append(self, embeddings, masks, emb, mask, rows=None):
        """Append captions to the table's parts; their rows for the generated chunks (one may serve all).
        ``rows``: each chunk's row of ``emb`` (a ``ChunkCaptions``' own); None: one row per chunk, of which a
        chunk equal to the one before it shares that one's row."""
        if rows is None:
            emb, mask, rows = _consecutive_distinct(emb, mask)
        first = sum(e.shape[0] for e in embeddings)
        embeddings.append(emb)
        masks.append(mask)
        return [first + rows[i if len(rows) > 1 else 0] for i in range(self._generated)]


def _consecutive_distinct(emb, mask):
    """``(rows, masks, row of each chunk)`` of per-chunk captions, a chunk equal to the one before it sharing
    its row."""
    kept, row_of = [], []
    for i in range(emb.shape[0]):
        if not (i and torch.equal(emb[i], emb[i - 1]) and torch.equal(mask[i], mask[i - 1])):
            kept.append(i)
        row_of.append(len(kept) - 1)
    if len(kept) < emb.shape[0]:
        emb, mask = emb[kept], mask[kept]
    return emb, mask, row_of
