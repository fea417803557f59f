"""Token reuse during sampling: the only code that talks to a cache policy (``reuse_contract``).

``start_reuse`` reads the policy once (is it on, does it reuse single tokens, its name for reports);
the driver it returns turns the policy state's decisions into the DiT's ``active`` argument, hands back
the velocities to integrate with (fresh or reused), and hands the state the chunks after every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..distributed.parallel import collective_buffers

FEATURE_BATCH_BYTES = 64 * 2**20  # change features of a window up to this size come from one convolution


def start_reuse(policy, model, layout, num_steps, parallel=None):
    """The driver of one run: ``PolicyReuse`` for a policy that is on, else ``NoReuse``. Over several
    processes (``parallel``) rank 0 alone runs the policy (``LeadingReuse``) and the others follow its
    decisions and latents (``FollowingReuse``)."""
    if policy is None or not policy.enabled:
        return NoReuse(layout, "off" if policy is None else policy.mode)
    if parallel is None or parallel.world == 1:
        return PolicyReuse(policy, model, layout, num_steps)
    if parallel.rank == 0:
        return LeadingReuse(policy, model, layout, num_steps, parallel)
    return FollowingReuse(policy, model, layout, num_steps, parallel)


class NoReuse:
    """Without a policy (or with one that is off): every token of every chunk is computed."""

    reusing = False  # some chunks or tokens may be reused (guidance keeps more KV caches then)
    token_level = False  # single tokens may be reused, not only whole chunks

    def __init__(self, layout, mode="off"):
        self.tokens = layout.tokens_per_chunk
        self.mode = mode  # the policy's name in reports

    def decide(self, chunks, chunk_steps, x_noisy, times):
        return None

    def active(self, decisions, chunks):
        """Per chunk: the DiT's ``active`` entry (None: all) and the tokens computed."""
        return [None] * chunks, [self.tokens] * chunks

    def velocities(self, decisions, fresh, dts):
        return fresh

    def observe(self, chunks, chunk_steps, x_new, velocities, times_after, frame_before):
        pass

    def share(self, x_new):
        """The window's latents after the step, as every process integrates them (rank 0's, when a policy
        runs on several processes); changed in place."""

    def close(self):
        pass


class PolicyReuse(NoReuse):
    """A policy's per-run state driven through one generation of ``model``."""

    reusing = True

    def __init__(self, policy, model, layout, num_steps):
        super().__init__(layout, policy.mode)
        self.token_level = policy.uses_token_weights
        self.model, self.cw = model, layout.chunk_width
        chunk_shape = (model.config.latent_channels, layout.chunk_width,
                       layout.latent_height, layout.latent_width)
        patch = (model.config.patch_size, model.config.patch_size)
        self.state = policy.new_state(num_steps=num_steps, chunk_shape=chunk_shape, patch=patch)

    def decide(self, chunks, chunk_steps, x_noisy, times):
        """The decisions for the window's noisy chunks (at ``times``), from how much their input moved."""
        features = self._change_features(x_noisy, len(chunks))
        return self.state.decide(list(zip(chunks, chunk_steps, features, times)))

    def active(self, decisions, chunks):
        return [d.active for d in decisions], [d.n_active for d in decisions]

    def velocities(self, decisions, fresh, dts):
        return [self.state.velocity(d, v, dt) for d, v, dt in zip(decisions, fresh, dts)]

    def observe(self, chunks, chunk_steps, x_new, velocities, times_after, frame_before):
        cw = self.cw
        self.state.observe([(c, s, x_new[:, j * cw:(j + 1) * cw], velocities[j], times_after[j])
                            for j, (c, s) in enumerate(zip(chunks, chunk_steps))], frame_before)

    def close(self):
        self.state = None

    def _change_features(self, x_noisy, chunks):
        """Each noisy chunk's patch embedding in the model dtype (what the policy compares between
        steps, as released): one convolution for a small window, chunk by chunk for a large one so
        that the float32 intermediate stays chunk-sized."""
        model, cw = self.model, self.cw
        if self.tokens * chunks * model.config.hidden_size * 4 <= FEATURE_BATCH_BYTES:
            embedded = model.patch_embedding(x_noisy[None])[0]
            return [embedded[:, j * cw:(j + 1) * cw].to(model.dtype) for j in range(chunks)]
        return [model.patch_embedding(x_noisy[None, :, j * cw:(j + 1) * cw])[0].to(model.dtype) for j in range(chunks)]


@dataclass(frozen=True)
class SharedDecision:
    """Rank 0's decision for one chunk, as the other processes receive it (``magi1.sampling.reuse_contract``)."""

    chunk_id: int
    step: int
    phase: str
    n_active: int
    n_tokens: int
    active: Optional[torch.Tensor]

    @property
    def action(self):
        if self.n_active == self.n_tokens:
            return "dense"
        return "skip" if self.n_active == 0 else "sparse"


FAILED = -2  # in a decision table's first entry: rank 0's policy raised


def _active_of(table, device):
    """Per chunk of a decision table: None (every token) or the ascending indices of its computed tokens."""
    return [None if int(row[0]) < 0 else row[1:].nonzero()[:, 0].to(device) for row in table]


def _decision_table(parallel, tokens, chunks):
    """The buffer decisions travel in: per chunk ``[n_active or -1 for all, mask of tokens]``."""
    with collective_buffers():
        return torch.zeros(chunks, 1 + tokens, dtype=torch.int64, device=parallel.device)


class LeadingReuse(PolicyReuse):
    """Rank 0 of a multi-process run: the policy's decisions and latents, broadcast to every process."""

    def __init__(self, policy, model, layout, num_steps, parallel):
        super().__init__(policy, model, layout, num_steps)
        self.parallel = parallel

    def decide(self, chunks, chunk_steps, x_noisy, times):
        table = _decision_table(self.parallel, self.tokens, len(chunks))
        try:
            decisions = super().decide(chunks, chunk_steps, x_noisy, times)
        except Exception:
            table[0, 0] = FAILED  # the other processes raise too, instead of waiting for decisions
            dist.broadcast(table, 0)
            raise
        for row, d in zip(table, decisions):
            row[0] = -1 if d.active is None else d.n_active
            if d.active is None:
                row[1:] = 1
            else:
                row[1 + d.active.to(row.device)] = 1
        dist.broadcast(table, 0)
        self._active = _active_of(table, x_noisy.device)  # what the others read: the same tokens everywhere
        return decisions

    def active(self, decisions, chunks):
        return self._active, [d.n_active for d in decisions]

    def share(self, x_new):
        _broadcast_latents(x_new)


class FollowingReuse(NoReuse):
    """The other processes: rank 0's decisions and latents, no policy state of their own."""

    reusing = True

    def __init__(self, policy, model, layout, num_steps, parallel):
        super().__init__(layout, policy.mode)
        PolicyReuse(policy, model, layout, num_steps).close()  # refuses (raises) the videos rank 0's policy refuses
        self.token_level = policy.uses_token_weights
        self.parallel, self.device = parallel, model.device
        self.chunk_shape = (model.config.latent_channels, layout.chunk_width, layout.latent_height,
                            layout.latent_width)

    def decide(self, chunks, chunk_steps, x_noisy, times):
        table = _decision_table(self.parallel, self.tokens, len(chunks))
        dist.broadcast(table, 0)
        if int(table[0, 0]) == FAILED:
            raise RuntimeError("rank 0's cache policy failed at this step (its error is in rank 0's output)")
        counts = table[:, 0].tolist()
        return [SharedDecision(chunk, step, "shared", self.tokens if count < 0 else count, self.tokens, active)
                for chunk, step, count, active in zip(chunks, chunk_steps, counts, _active_of(table, x_noisy.device))]

    def active(self, decisions, chunks):
        return [d.active for d in decisions], [d.n_active for d in decisions]

    def velocities(self, decisions, fresh, dts):
        """Placeholders where rank 0 reuses (its latents replace this process's after the step)."""
        return [v if v is not None else torch.zeros(self.chunk_shape, device=self.device) for v in fresh]

    def share(self, x_new):
        _broadcast_latents(x_new)


def _broadcast_latents(x_new):
    """Rank 0's ``x_new`` into every process's (through a normal tensor: see ``collective_buffers``)."""
    with collective_buffers():
        shared = x_new.clone()
    dist.broadcast(shared, 0)
    x_new.copy_(shared)
