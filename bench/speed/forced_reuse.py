"""A reuse policy that computes a fixed share of every chunk's tokens (a random set each step) after the
chunk's first step, and reuses the rest's last velocity. Not a cache: a probe that measures wall time
against FLOPs at a chosen active fraction, whatever a real policy would decide on random weights. It
follows ``magi1.sampling.reuse_contract``, with ``cache_core``'s ``Decision``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache_core import Decision


@dataclass(frozen=True)
class ForcedFraction:
    fraction: float  # share of a chunk's tokens computed at every step after its first
    seed: int = 0
    mode: str = "forced"

    @property
    def enabled(self):
        return True

    @property
    def uses_token_weights(self):
        return True  # single tokens are reused: the sampler keeps the per-slot KV caches a real policy needs

    def new_state(self, *, num_steps, chunk_shape, patch):
        return _ForcedState(self, num_steps, chunk_shape, patch)


class _ForcedState:
    def __init__(self, policy, num_steps, chunk_shape, patch):
        _, frames, height, width = chunk_shape
        self.grid = (frames, height // patch[0], width // patch[1])
        self.patch, self.num_steps, self.fraction = patch, num_steps, policy.fraction
        self.n_tokens = frames * self.grid[1] * self.grid[2]
        self.generator = torch.Generator().manual_seed(policy.seed)
        self.velocities = {}  # chunk -> its last velocity

    def decide(self, chunk_steps):
        decisions = []
        for chunk_id, step, feature, *_ in chunk_steps:
            n = self.n_tokens
            if chunk_id not in self.velocities:
                decisions.append(Decision(chunk_id, step, "warmup", n, n))
                continue
            k = min(n, max(1, round(self.fraction * n)))
            chosen = torch.randperm(n, generator=self.generator)[:k].sort().values.to(feature.device)
            decisions.append(Decision(chunk_id, step, "forced", k, n, None if k == n else chosen))
        return decisions

    def velocity(self, decision, velocity, dt):
        if decision.active is not None:
            mask = torch.zeros(self.n_tokens, dtype=torch.bool, device=velocity.device)
            mask[decision.active] = True
            (t, h, w), (ph, pw) = self.grid, self.patch
            mask = mask.view(t, h, 1, w, 1).expand(t, h, ph, w, pw).reshape(t, h * ph, w * pw)
            velocity = torch.where(mask[None], velocity, self.velocities[decision.chunk_id])
        self.velocities[decision.chunk_id] = velocity
        return velocity

    def observe(self, chunks, frame_before=None):
        for chunk_id, step, *_ in chunks:
            if step + 1 >= self.num_steps:
                self.velocities.pop(chunk_id, None)
