"""The captions of one generation as a table of distinct rows on the device: the null caption first,
then the prompt's rows and the negative prompt's, and for every generated chunk its row per stream."""

from __future__ import annotations

import torch

from .text import null_caption


class CaptionRows:
    """``table`` ``(rows, L, D)`` and ``masks`` ``(rows, L)`` on the device, each row's valid-token count
    on the host (``lengths``, one sync here), and the row a chunk reads in the "positive" stream (the
    prompt) or the "negative" one (the negative prompt, else the null caption)."""

    NULL = 0  # clean and prefix chunks, and unconditional passes without a negative prompt

    def __init__(self, model, layout, caption, caption_mask, negative_caption=None, negative_mask=None):
        config, device = model.config, model.device
        self.chunk_offset = layout.chunk_offset
        self._generated = layout.chunk_num - layout.chunk_offset
        null, null_mask = null_caption(model.y_embedder.null_caption_embedding.to(device))
        self._shape = (null.shape[0], config.caption_channels)
        self._device = device
        embeddings, masks = [null[None]], [null_mask[None]]

        positive, positive_mask = self._checked("caption", caption, caption_mask)
        # An empty prompt: the released pipeline then uses the null caption.
        self.positive = [self.NULL] * self._generated
        if bool(positive_mask.any()):
            self.positive = self._append(embeddings, masks, positive, positive_mask)
        self.negative = [self.NULL] * self._generated
        if negative_caption is not None:
            negative, negative_mask = self._checked("negative_caption", negative_caption, negative_mask)
            self.negative = self._append(embeddings, masks, negative, negative_mask)
        self.table = torch.cat(embeddings)
        self.masks = torch.cat(masks)
        self.lengths = self.masks.sum(dim=1).tolist()

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
        caption = self.table[rows].view(sequences, chunks, *self.table.shape[1:])
        return caption, self.masks[rows].view(sequences, chunks, -1)

    def close(self):
        """Drop the device tensors (the run is over)."""
        self.table = self.masks = None

    def _checked(self, name, emb, mask):
        length, width = self._shape
        if mask is None:
            raise ValueError(f"{name} needs its mask (which caption tokens are valid)")
        if emb.dim() == 2:
            emb, mask = emb[None], mask[None]
        if emb.dim() != 3 or emb.shape[1:] != (length, width):
            raise ValueError(f"{name} must be (chunks, {length}, {width}) or ({length}, {width}), got {list(emb.shape)}")
        if emb.shape[0] not in (1, self._generated):
            raise ValueError(f"{name} has {emb.shape[0]} chunks; this video generates {self._generated} "
                             f"(give one per generated chunk, or one for all)")
        if tuple(mask.shape) != tuple(emb.shape[:2]):
            raise ValueError(f"{name} mask must be {list(emb.shape[:2])}, got {list(mask.shape)}")
        return emb.to(self._device, torch.float32), mask.to(self._device).bool()

    def _append(self, embeddings, masks, emb, mask):
        """Append captions to the table's parts; their rows for the generated chunks (one may serve all)."""
        first = sum(e.shape[0] for e in embeddings)
        embeddings.append(emb)
        masks.append(mask)
        return [first + (i if emb.shape[0] > 1 else 0) for i in range(self._generated)]
