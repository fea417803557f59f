"""Several processes, one generation: context parallelism (Ulysses) over ``torch.distributed``.

A run of ``world = cfg * cp`` processes (one GPU each with NCCL, or CPU processes with gloo):

* **Guidance groups** (``cfg`` of them, ranks ``[g * cp, (g + 1) * cp)``): base models' three guidance
  streams are dealt out to the groups (``magi1.sampling.guidance.ThreePass``); with ``cfg = 1`` every rank runs
  every stream.
* **Context parallel** inside a group (``cp`` ranks): each DiT call's query tokens are split into ``cp``
  contiguous shards (uneven when the count does not divide: sizes differ by at most one). Every
  per-token operation (norms, projections, MLP, cross-attention) runs on the rank's own tokens;
  self-attention exchanges heads with one all-to-all before it (every rank then holds the whole
  sequence for its share of the heads) and one after it, as the official ``cp_ulysses`` does.
* **KV cache by head group**: a rank keeps the keys/values of the KV heads its query heads read. When
  ``cp`` exceeds the KV head count, several ranks read the same KV head, and each keeps a copy of it
  (replicated, not sequence-sharded: a rank's cache is then ``1 / kv_heads`` of the whole instead of
  ``1 / cp``; see ``kv_heads_of``).
* **Weights by layer** (``magi1.weights.layer_sharding``): each transformer layer is owned by one rank of the
  group, which alone reads it from the checkpoint and keeps it; the owner broadcasts it to the group just
  before the layer runs. ``shard_weights=False`` keeps every layer on every rank instead (no weight
  traffic: the faster choice when the weights fit each GPU, above all without NVLink).
* **Cache decisions**: rank 0 alone runs the cache policy; its decisions and the latents it integrates
  are broadcast (``magi1.sampling.reuse``), so every rank computes the same tokens.

Only ``torch.distributed`` collectives are used (``all_to_all_single``, ``all_gather_into_tensor``,
``broadcast``, ``all_reduce``), so the same code runs on NCCL and on gloo (CPU tests).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

BACKEND_ENV = "MAGI1_DIST_BACKEND"  # overrides the backend (nccl on CUDA, gloo on CPU)
# torch 2.13 renamed all_gather_into_tensor (still there, deprecated); torch 2.4 has only the old name.
# (getattr: torch builds without distributed support still import the pack)
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def collective_buffers():
    """Where to make the tensors a collective writes into: normal tensors even under ``torch.inference_mode``
    (gloo on torch 2.4 writes them from its own threads, outside inference mode, which refuses to update
    inference tensors in place)."""
    return torch.inference_mode(False)


def split_sizes(total, parts):
    """``parts`` contiguous shard sizes of ``total`` items, differing by at most one."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def kv_heads_of(q_heads, kv_heads, first, end):
    """The KV heads ``[start, stop)`` that query heads ``[first, end)`` read (grouped-query attention:
    query head ``i`` reads KV head ``i // (q_heads // kv_heads)``)."""
    group = q_heads // kv_heads
    return first // group, (end - 1) // group + 1


class Parallel:
    """This process's place in a multi-process run (see the module docstring).

    Build it with ``Parallel.start`` (explicit rank and rendezvous) or ``Parallel.from_environment``
    (torchrun's variables); ``close()`` when done.
    """

    def __init__(self, cfg=1, device=None, shard_weights=True):
        if not dist.is_initialized():
            raise RuntimeError("magi1.Parallel needs torch.distributed initialised: use Parallel.start or "
                               "Parallel.from_environment")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg not in (1, 2, 3) or self.world % cfg:
            raise ValueError(f"cfg parallel must be 1, 2 or 3 and divide the {self.world} processes, got {cfg}")
        self.cfg, self.cp = cfg, self.world // cfg
        self.cfg_index, self.cp_rank = divmod(self.rank, self.cp)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.shard_weights = bool(shard_weights)  # False: every rank keeps every layer (no weight broadcasts)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        self.cp_group = self._groups([[g * self.cp + r for r in range(self.cp)] for g in range(cfg)],
                                     self.cfg_index)
        self.peer_group = self._groups([[g * self.cp + r for g in range(cfg)] for r in range(self.cp)],
                                       self.cp_rank)
        # The layer broadcasts get communicators of their own, so that they overlap the all-to-alls.
        self.weights_group = self._groups([[g * self.cp + r for r in range(self.cp)] for g in range(cfg)],
                                          self.cfg_index, separate=True)

    @staticmethod
    def _groups(members, mine, separate=False):
        if len(members[0]) == dist.get_world_size() and not separate:
            return dist.group.WORLD
        groups = [dist.new_group(ranks) for ranks in members]
        return groups[mine]

    @classmethod
    def start(cls, rank, world_size, init_method, *, cfg=1, backend=None, device=None, shard_weights=True,
              timeout_s=1800):
        """Join a run of ``world_size`` processes at ``init_method`` (e.g. ``tcp://127.0.0.1:29500``)."""
        device = torch.device(device) if device is not None else default_device(rank)
        backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        return cls(cfg, device, shard_weights)

    @classmethod
    def from_environment(cls, *, cfg=1, backend=None, device=None, shard_weights=True):
        """The run torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``);
        None for a single process (``WORLD_SIZE`` unset or 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        return cls.start(int(os.environ["RANK"]), world, "env://", cfg=cfg, backend=backend,
                         device=device if device is not None else default_device(local), shard_weights=shard_weights)

    @property
    def is_main(self):
        return self.rank == 0

    def close(self, wait=True):
        """Leave the run: after a run that went well (``wait``) every process waits for the others, then the
        groups go, subgroups first (torch 2.4's gloo could hang in a process that tore its groups down while
        another still used them). After an error, no waiting: the others may never come."""
        if not dist.is_initialized():
            return
        try:
            if wait:
                dist.barrier()
        finally:
            for group in {self.cp_group, self.peer_group, self.weights_group} - {dist.group.WORLD}:
                dist.destroy_process_group(group)
            self.cp_group = self.peer_group = self.weights_group = None
            dist.destroy_process_group()

    def context(self, config):
        """The per-model context-parallel plan (heads of this rank) for a ``ModelConfig``."""
        return ContextParallel(self, config)

    def __repr__(self):
        return f"Parallel(rank {self.rank} of {self.world}: cfg {self.cfg_index}/{self.cfg}, cp {self.cp_rank}/{self.cp})"


def default_device(local_rank):
    """``cuda:local_rank`` where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class ContextParallel:
    """One model's Ulysses plan on one rank: which query and KV heads it attends with, and the exchanges
    between token shards and head shards inside its group."""

    def __init__(self, parallel, config):
        heads, kv = config.num_attention_heads, config.num_query_groups
        cp = parallel.cp
        if cp > heads:
            raise ValueError(f"context parallel over {cp} processes needs at least {cp} attention heads; the model "
                             f"has {heads}: use at most {heads} processes per guidance group")
        self.parallel, self.group, self.size, self.rank = parallel, parallel.cp_group, cp, parallel.cp_rank
        sizes = split_sizes(heads, cp)
        starts = [sum(sizes[:r]) for r in range(cp)]
        self.q_heads = [(s, s + n) for s, n in zip(starts, sizes)]  # per rank
        self.kv_heads = [kv_heads_of(heads, kv, a, b) for a, b in self.q_heads]
        a, b = self.q_heads[self.rank]
        ka, kb = self.kv_heads[self.rank]
        self.local_kv_heads = kb - ka
        # Query head -> local KV head. SDPA's grouped heads need a regular pattern; otherwise expand.
        index = [h // (heads // kv) - ka for h in range(a, b)]
        group = (b - a) // (kb - ka) if (b - a) % (kb - ka) == 0 else 0
        regular = group and index == [i // group for i in range(b - a)]
        self.kv_expand = None if regular else torch.tensor(index)
        self._expand_on = {}  # device -> kv_expand there

    def expand_index(self, device):
        """``kv_expand`` on ``device`` (copied there once)."""
        if device not in self._expand_on:
            self._expand_on[device] = self.kv_expand.to(device)
        return self._expand_on[device]

    def token_range(self, total):
        """This rank's tokens ``[start, end)`` of ``total``."""
        sizes = split_sizes(total, self.size)
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    def to_heads(self, x, kind):
        """``x (N, my tokens, all heads, D)`` -> ``(N, all tokens, my heads, D)``; ``kind``: "q" or "kv"."""
        ranges = self.q_heads if kind == "q" else self.kv_heads
        n, _, _, d = x.shape
        sends = [x[:, :, a:b].reshape(-1) for a, b in ranges]
        mine = ranges[self.rank][1] - ranges[self.rank][0]
        tokens = split_sizes(self._total, self.size)
        received = self._exchange(sends, [n * s * mine * d for s in tokens], x)
        return torch.cat([r.view(n, s, mine, d) for r, s in zip(received, tokens)], dim=1)

    def to_tokens(self, y):
        """The self-attention output ``(N, all tokens, my query heads, D)`` -> ``(N, my tokens, all heads, D)``."""
        n, _, mine, d = y.shape
        tokens = split_sizes(self._total, self.size)
        starts = [sum(tokens[:r]) for r in range(self.size)]
        sends = [y[:, s:s + t].reshape(-1) for s, t in zip(starts, tokens)]
        local = tokens[self.rank]
        counts = [b - a for a, b in self.q_heads]
        received = self._exchange(sends, [n * local * c * d for c in counts], y)
        return torch.cat([r.view(n, local, c, d) for r, c in zip(received, counts)], dim=2)

    def begin_call(self, total_tokens):
        """Start a DiT call over ``total_tokens`` tokens per sequence: this rank's ``[start, end)``."""
        self._total = total_tokens
        return self.token_range(total_tokens)

    def gather_tokens(self, x):
        """``(N, my tokens, F)`` on every rank -> ``(N, all tokens, F)`` on every rank."""
        tokens = split_sizes(self._total, self.size)
        longest = max(tokens)
        n, local, f = x.shape
        padded = x.new_zeros(n, longest, f)
        padded[:, :local] = x
        with collective_buffers():
            out = x.new_empty(self.size * n * longest * f)
        _all_gather(out, padded.reshape(-1).contiguous(), group=self.group)
        out = out.view(self.size, n, longest, f)
        return torch.cat([out[r, :, :t] for r, t in enumerate(tokens)], dim=1)

    def _exchange(self, sends, receive_numels, like):
        """One ``all_to_all_single``: ``sends[r]`` (flat) to rank ``r``; returns what each rank sent here."""
        send = torch.cat(sends).contiguous()
        with collective_buffers():
            out = like.new_empty(sum(receive_numels))
        dist.all_to_all_single(out, send, output_split_sizes=list(receive_numels),
                               input_split_sizes=[s.numel() for s in sends], group=self.group)
        return list(out.split(list(receive_numels)))
