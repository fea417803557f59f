"""Classifier-free guidance as released: the 1-pass rule of distilled models and the 3-pass rule of base
models, and which KV cache each guidance stream reads and writes.

* base models, 3 passes: ``cond`` (prompt, reads the KV cache), ``cond_pre`` (the negative prompt,
  else the null caption, with the unconditional adaLN token; reads and writes the KV cache) and
  ``uncond`` (the same caption, each chunk alone). Per chunk, with scales chosen by the chunk's time:
  ``v = (1 - s_prev) * v_uncond + (s_prev - s_text) * v_cond_pre + s_text * v_cond``.
* distilled models, 1 pass with the prompt; while the oldest chunk is nearly clean (t > 0.3) a copy of
  it that sees only itself is appended, and its velocity is blended in: ``0.7 * v + 0.3 * v_alone``.

When chunks or tokens may be reused, a chunk computed in one stream but not another would leave KV rows
written by the wrong stream, and the sparse forward reads the keys/values of the tokens it does not
recompute from the KV cache: so 3-pass runs keep one KV cache per stream (``cond_pre`` the official
one, ``cond`` its own whose clean rows are copied from it, and, when single tokens may be reused,
``uncond`` one chunk-sized cache per window slot), and 1-pass runs keep the nearly-clean copy's
keys/values in one more block after the window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..distributed.parallel import collective_buffers
from ..network.kv_cache import KVCache
from .caption_rows import CaptionRows
from .schedule import CLEAN_CHUNK_KVRANGE, CLEAN_T, prefix_pieces


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance as released (``runtime_config`` of the official example configs).

    ``passes``: 3 for base models, 1 for distilled ones; None picks from the model. The scales apply
    per chunk by its time: ``scales[i]`` for ``t_range[i] <= t < t_range[i + 1]``.
    """

    passes: Optional[int] = None
    t_range: Sequence[float] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: Sequence[float] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: Sequence[float] = (7.5, 7.5, 7.5, 0.0, 0.0)
    near_clean_threshold: float = 0.3  # 1 pass: the oldest chunk gets its self-only copy above this t
    near_clean_context_scale: float = 0.7  # share of the in-context velocity in that blend

    def __post_init__(self):
        if self.passes not in (None, 1, 3):
            raise ValueError(f"guidance passes must be 1 (distilled models), 3 (base models) or None, got {self.passes!r}")
        n = len(self.t_range)
        if n < 1 or len(self.prev_chunk_scales) != n or len(self.text_scales) != n:
            raise ValueError(f"t_range, prev_chunk_scales and text_scales must have the same length, got "
                             f"{len(self.t_range)}, {len(self.prev_chunk_scales)}, {len(self.text_scales)}")
        if list(self.t_range) != sorted(self.t_range) or self.t_range[0] > 0:
            raise ValueError(f"t_range must be ascending and start at 0, got {list(self.t_range)}")
        if not 0.0 <= self.near_clean_context_scale <= 1.0:
            raise ValueError(f"near_clean_context_scale must be in [0, 1], got {self.near_clean_context_scale}")

    def with_text_scale(self, scale):
        """A copy whose text scale is ``scale`` wherever the release guides by text (its 7.5 entries;
        the nearly-clean ranges stay unguided)."""
        text_scales = tuple(float(scale) if s else 0.0 for s in self.text_scales)
        return dataclasses.replace(self, text_scales=text_scales)

    def scales(self, t):
        """``(s_prev, s_text)`` for a chunk at time ``t`` (a float32 value), as the official lookup."""
        edges = torch.tensor(list(self.t_range), dtype=torch.float32) - 1e-7
        index = int(torch.searchsorted(edges, torch.tensor([t], dtype=torch.float32))) - 1
        index = min(max(index, 0), len(edges) - 1)
        return float(self.prev_chunk_scales[index]), float(self.text_scales[index])


def write_prefix(call, kv_cache, prefix, chunks, chunk_width, chunk_tokens, *, unconditional):
    """Write the clean prefix chunks' keys/values into ``kv_cache`` (null caption, t = clean_t, each chunk
    sees itself), as ``extract_prefix_video_feature``; the output is not used. A prefix longer than the
    cache's span goes in several calls of whole chunks (the release makes one)."""
    ct = chunk_tokens
    for first, end in prefix_pieces(chunks, kv_cache.capacity // ct):
        n = end - first
        t = torch.full((1, n), CLEAN_T).tolist()
        ranges = [(max(0, j + 1 - CLEAN_CHUNK_KVRANGE) * ct, (j + 1) * ct) for j in range(first, end)]
        call(prefix[None, :, first * chunk_width: end * chunk_width].to(call.device), t, [CaptionRows.NULL] * n, ranges,
             slice_point=first, unconditional=unconditional, kv_cache=kv_cache, kv_write=n, stage=0, counts=[ct] * n)


class SinglePass:
    """Distilled models: one pass with the prompt, and the nearly-clean copy of the oldest chunk.

    ``call`` is the run's ``DiTCall``; ``reusing``: chunks or tokens may be reused, so the copy's
    keys/values are kept as well (one more block after the window), and it may be computed sparsely like
    its chunk. ``kv_chunks``: the KV cache's span in chunks (``magi1.sampling.schedule.kv_span``).
    """

    def __init__(self, guidance, model, layout, captions, call, *, reusing, kv_offload, kv_chunks):
        self.guidance, self.captions, self.call, self.reusing = guidance, captions, call, reusing
        self.cw, self.ct = layout.chunk_width, layout.tokens_per_chunk
        self.kv_main = KVCache.for_model(model, kv_chunks * self.ct, offload=kv_offload)
        self.copy_rows_owner = None  # (chunk, block) whose nearly-clean copy's keys/values are in the KV cache

    @property
    def kv_caches(self):
        return [self.kv_main]

    def close(self):
        self.kv_main = None

    def encode_prefix(self, prefix, chunks):
        write_prefix(self.call, self.kv_main, prefix, chunks, self.cw, self.ct, unconditional=False)

    def near_clean(self, t_noisy):
        return t_noisy[0] > self.guidance.near_clean_threshold

    def dense_calls(self, plan, t_noisy):
        """``(queries, keys, caption row)`` of every chunk of every call the released sampler makes."""
        ct = self.ct
        rows = self.captions.call_rows(plan, "positive")
        groups = [[(ct, (b - a) * ct, row) for (a, b), row in zip(plan.kv_ranges, rows)]]
        if self.near_clean(t_noisy):
            groups.append([(ct, ct, self.captions.row(plan.start, "positive"))])
        return groups

    def velocities(self, plan, x_call, t_noisy, active, counts):
        """The guided velocity of each noisy chunk (``active``/``counts``: its computed tokens)."""
        cw, ct, refresh = self.cw, self.ct, int(plan.refresh_clean)
        n_call = len(plan.kv_ranges)
        t = [CLEAN_T] * refresh + t_noisy
        rows = self.captions.call_rows(plan, "positive")
        ranges = [(a * ct, b * ct) for a, b in plan.kv_ranges]
        active, counts = [None] * refresh + active, [ct] * refresh + counts
        kv_write, x = n_call, x_call
        near_clean = self.near_clean(t_noisy)
        if near_clean:  # append the oldest noisy chunk again, seeing only itself
            block = plan.slice_point + n_call
            x = torch.cat([x_call, x_call[:, refresh * cw:(refresh + 1) * cw]], dim=1)
            t.append(t_noisy[0])
            rows.append(rows[refresh])
            ranges.append((block * ct, (block + 1) * ct))
            copy = self._copy_active(active[refresh], (plan.start, block))
            kv_write += int(self.reusing)
            active.append(copy)
            counts.append(ct if copy is None else int(copy.numel()))
        out = self.call(x[None], [t], rows, ranges, slice_point=plan.slice_point, unconditional=False,
                        kv_cache=self.kv_main, kv_write=kv_write, stage=plan.stage_index, active=active, counts=counts)
        v = out[0, :, refresh * cw:]
        velocities = [v[:, j * cw:(j + 1) * cw] for j in range(len(t_noisy))]
        if near_clean:
            scale = self.guidance.near_clean_context_scale
            velocities[0] = velocities[0] * scale + v[:, len(t_noisy) * cw:] * (1 - scale)
        return velocities

    def _copy_active(self, chunk_active, owner):
        """The copy computes its chunk's tokens, but whole while its cached rows belong to another chunk."""
        if not self.reusing:
            return chunk_active
        if chunk_active is not None and chunk_active.numel() and self.copy_rows_owner != owner:
            chunk_active = None
        if chunk_active is None or chunk_active.numel():
            self.copy_rows_owner = owner
        return chunk_active


STREAM_GROUP = {"cond": 0, "cond_pre": 1, "uncond": 2}  # stream -> its group (mod the number of groups)


class StreamGroups:
    """Guidance parallel: which process group runs which guidance stream, and what the groups exchange.

    With ``parallel.cfg`` groups (2 or 3), stream ``s`` runs in group ``STREAM_GROUP[s] % cfg`` (2 groups:
    cond and uncond together, cond_pre alone). Each group's outputs reach every process through one
    sum over the peer group (the processes of the same context-parallel rank, one per group; the other
    groups add zeros, so the sum is exact), and the clean chunks' keys/values that cond_pre writes are
    broadcast to the group running cond.
    """

    def __init__(self, parallel, model, chunk_tokens):
        self.parallel = parallel
        self.split = parallel is not None and parallel.cfg > 1
        self.num_layers = model.config.num_layers
        cp = getattr(model, "context_parallel", None)
        kv_heads = model.config.num_query_groups if cp is None else cp.local_kv_heads
        self.row_shape = (chunk_tokens, kv_heads, model.config.kv_channels)
        self.dtype, self.device = model.dtype, model.device

    def runs(self, stream):
        par = self.parallel
        return not self.split or STREAM_GROUP[stream] % par.cfg == par.cfg_index

    def share_rows(self, held, is_source):
        """One clean chunk's rows of one layer (``held`` on the cond_pre group), on every peer."""
        par = self.parallel
        if is_source:
            with collective_buffers():
                rows = held.to(self.device).clone()
        else:
            with collective_buffers():
                rows = torch.empty(self.row_shape, dtype=self.dtype, device=self.device)
        source = (STREAM_GROUP["cond_pre"] % par.cfg) * par.cp + par.cp_rank
        dist.broadcast(rows, source, group=par.peer_group)
        return rows

    def gather(self, cond, cond_pre, uncond, computed, cw, like):
        """Every stream's velocities of the computed chunks on every process (None where not run here)."""
        if not self.split:
            return cond, cond_pre, uncond
        c, _, h, w = like.shape
        with collective_buffers():
            table = torch.zeros(3, len(computed), c, cw, h, w, device=like.device)
        for i, j in enumerate(computed):
            frames = slice(j * cw, (j + 1) * cw)
            for s, stream in enumerate((cond, cond_pre)):
                if stream is not None:
                    table[s, i] = stream[:, frames]
            if uncond is not None:
                table[2, i] = uncond[j]
        dist.all_reduce(table, group=self.parallel.peer_group)
        window = (max(computed) + 1) * cw
        cond, cond_pre = torch.zeros(2, c, window, h, w, device=like.device)
        for i, j in enumerate(computed):
            cond[:, j * cw:(j + 1) * cw], cond_pre[:, j * cw:(j + 1) * cw] = table[0, i], table[1, i]
        return cond, cond_pre, {j: table[2, i] for i, j in enumerate(computed)}


class ThreePass:
    """Base models: ``cond``, ``cond_pre`` and ``uncond`` passes, combined per chunk by its time.

    ``reusing``: chunks or tokens may be reused, so ``cond`` keeps its own KV cache (``cond_pre`` has the
    official one); ``token_level``: single tokens may be, so each window slot's ``uncond`` pass keeps one
    too. ``kv_chunks``: the span of the first two in chunks (``magi1.sampling.schedule.kv_span``).
    """

    def __init__(self, guidance, model, layout, captions, call, *, reusing, token_level, kv_offload, window_size,
                 kv_chunks, parallel=None):
        self.guidance, self.captions, self.call = guidance, captions, call
        self.cw, self.ct, self.window_size = layout.chunk_width, layout.tokens_per_chunk, window_size
        self.groups = StreamGroups(parallel, model, self.ct)
        runs = self.groups.runs
        capacity = kv_chunks * self.ct
        self.kv_cond_pre = KVCache.for_model(model, capacity, offload=kv_offload) if runs("cond_pre") else None
        # cond keeps its own cache when it may be reused, or when cond_pre runs in another process group
        # (its clean rows then arrive from there: ``_clean_rows``).
        own = runs("cond") and (reusing or not runs("cond_pre"))
        self.kv_cond = KVCache.for_model(model, capacity, offload=kv_offload) if own else None
        self.kv_uncond = None
        if token_level and runs("uncond"):
            self.kv_uncond = [KVCache.for_model(model, self.ct, offload=kv_offload) for _ in range(window_size)]
        self.reusing = reusing
        self._scale_table = {}  # time -> (s_prev, s_text)

    @property
    def kv_caches(self):
        return [c for c in [self.kv_cond_pre, self.kv_cond] + (self.kv_uncond or []) if c is not None]

    def close(self):
        self.kv_cond_pre = self.kv_cond = self.kv_uncond = None

    def encode_prefix(self, prefix, chunks):
        if self.kv_cond_pre is None:  # cond_pre runs elsewhere: the same prefix keys/values, computed here
            if self.kv_cond is not None:
                write_prefix(self.call, self.kv_cond, prefix, chunks, self.cw, self.ct, unconditional=True)
            return
        write_prefix(self.call, self.kv_cond_pre, prefix, chunks, self.cw, self.ct, unconditional=True)
        if self.kv_cond is not None:
            self._copy_rows(0, chunks)

    def dense_calls(self, plan, t_noisy):
        ct = self.ct
        noisy = range(plan.start, plan.end)
        groups = []
        for stream in ("positive", "negative"):
            rows = self.captions.call_rows(plan, stream)
            groups.append([(ct, (b - a) * ct, row) for (a, b), row in zip(plan.kv_ranges, rows)])
        groups.append([(ct, ct, self.captions.row(c, "negative")) for c in noisy])
        return groups

    def velocities(self, plan, x_call, t_noisy, active, counts):
        cw, ct, refresh = self.cw, self.ct, int(plan.refresh_clean)
        noisy = list(range(plan.start, plan.end))
        t = [[CLEAN_T] * refresh + t_noisy]
        ranges = [(a * ct, b * ct) for a, b in plan.kv_ranges]
        computed = [j for j, q in enumerate(counts) if q]
        common = dict(slice_point=plan.slice_point, stage=plan.stage_index, active=[None] * refresh + active,
                      counts=[ct] * refresh + counts)
        kv_write = len(plan.kv_ranges)
        runs = self.groups.runs
        cond = cond_pre = uncond = None
        if computed and runs("cond"):
            rows = self.captions.call_rows(plan, "positive")
            kv_cond = self.kv_cond if self.kv_cond is not None else self.kv_cond_pre
            cond = self.call(x_call[None], t, rows, ranges, unconditional=False, kv_cache=kv_cond,
                             kv_write=kv_write if self.reusing else 0, **common)[0, :, refresh * cw:]
        if runs("cond_pre"):
            rows = self.captions.call_rows(plan, "negative")
            cond_pre = self.call(x_call[None], t, rows, ranges, unconditional=True, kv_cache=self.kv_cond_pre,
                                 kv_write=kv_write, **common)[0, :, refresh * cw:]
        if refresh:  # the cond stream reads the clean chunk as cond_pre wrote it
            self._clean_rows(plan.slice_point)
        if not computed:
            return [None] * len(noisy)
        if runs("uncond"):
            uncond = self._uncond(plan, x_call[:, refresh * cw:], t_noisy, active, counts, computed)
        cond, cond_pre, uncond = self.groups.gather(cond, cond_pre, uncond, computed, cw, x_call)
        velocities = [None] * len(noisy)
        for j in computed:
            prev_scale, text_scale = self._scales(t_noisy[j])
            frames = slice(j * cw, (j + 1) * cw)
            velocities[j] = ((1 - prev_scale) * uncond[j] + (prev_scale - text_scale) * cond_pre[:, frames]
                             + text_scale * cond[:, frames])
        return velocities

    def _scales(self, t):
        """``guidance.scales(t)``, looked up once per time of the grid."""
        if t not in self._scale_table:
            self._scale_table[t] = self.guidance.scales(t)
        return self._scale_table[t]

    def _uncond(self, plan, x_noisy, t_noisy, active, counts, computed):
        """Every computed chunk alone, at positions from 0, with the negative (or null) caption."""
        cw, ct = self.cw, self.ct
        noisy = list(range(plan.start, plan.end))
        rows = [self.captions.row(noisy[j], "negative") for j in computed]
        if self.kv_uncond is None:
            x = torch.stack([x_noisy[:, j * cw:(j + 1) * cw] for j in computed])
            out = self.call(x, [[t_noisy[j]] for j in computed], rows, [(0, ct)], slice_point=0, unconditional=True,
                            kv_cache=None, kv_write=0, stage=plan.stage_index, counts=[ct], sequences=len(computed))
            return {j: out[i] for i, j in enumerate(computed)}
        uncond = {}
        for row, j in zip(rows, computed):
            out = self.call(x_noisy[None, :, j * cw:(j + 1) * cw], [[t_noisy[j]]], [row], [(0, ct)], slice_point=0,
                            unconditional=True, kv_cache=self.kv_uncond[noisy[j] % self.window_size], kv_write=1,
                            stage=plan.stage_index, active=[active[j]], counts=[counts[j]])
            uncond[j] = out[0]
        return uncond

    def _clean_rows(self, chunk):
        """The clean chunk's keys/values, as cond_pre wrote them, into cond's own cache (from the process
        group that runs cond_pre when that is another one)."""
        if not self.groups.split:
            if self.kv_cond is not None:
                self._copy_rows(chunk, chunk + 1)
            return
        start, end = chunk * self.ct, (chunk + 1) * self.ct
        source = self.kv_cond_pre if self.kv_cond_pre is not None else self.kv_cond
        if self.kv_cond is not None:
            self.kv_cond.reserve(start, end)
        for layer in range(len(source.keys) if source is not None else self.groups.num_layers):
            held = source.stored(layer, start, end) if source is not None else (None, None)
            target = self.kv_cond.stored(layer, start, end) if self.kv_cond is not None else (None, None)
            for kind in (0, 1):  # keys, values
                rows_in = self.groups.share_rows(held[kind], self.kv_cond_pre is not None)
                if target[kind] is not None:
                    target[kind].copy_(rows_in)

    def _copy_rows(self, first_chunk, end_chunk):
        self.kv_cond.copy_rows(self.kv_cond_pre, first_chunk * self.ct, end_chunk * self.ct)
