"""What a cache state remembers of one chunk between its steps, and how a reused velocity is made
from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .decision import Decision

# A reused velocity is extrapolated at most this many spans (t1 - t0 of its last two computes) beyond
# its last compute: the schedule's steps grow about geometrically, so a fit over two early, tiny steps
# would otherwise be stretched over a late, large one (measured in bench/results/ablation1_every_variant: uncapped
# extrapolation loses 1-4 dB where the cap gains).
EXTRAPOLATION_SPANS = 1.0


@dataclass
class ChunkMemory:
    """One chunk's reuse memory, from its first decision to its last step."""

    prev_feature: Optional[torch.Tensor] = None
    chunk_acc: Optional[torch.Tensor] = None  # scalar float32: accumulated Δ since the last compute
    chunk_reuses: int = 0  # consecutive whole-chunk reuses
    token_acc: Optional[torch.Tensor] = None  # [N] float32: accumulated W·Δ since each token's last compute
    token_reuses: Optional[torch.Tensor] = None  # [N] int32: consecutive reuses of each token
    velocity: Optional[torch.Tensor] = None  # [C, T, H, W]: each pixel's last computed velocity
    # Extrapolation only: the computed velocity before the last, and each token's times of both
    velocity_prev: Optional[torch.Tensor] = None
    t_last: Optional[torch.Tensor] = None  # [N] float32
    t_prev: Optional[torch.Tensor] = None  # [N] float32 (NaN: computed only once so far)
    # Second-order extrapolation only: the computed velocity before those two, and its times
    velocity_prev2: Optional[torch.Tensor] = None
    t_prev2: Optional[torch.Tensor] = None  # [N] float32 (NaN: computed fewer than three times so far)
    t_now: Optional[float] = None  # the chunk's time at the step being decided
    velocity_dt: Optional[torch.Tensor] = None  # [N]: step size of each token's velocity (rescale_reused_velocity=False only)
    weights: Optional[torch.Tensor] = None  # [N] float32: token weights for the next decision
    pending: Optional[Decision] = field(default=None, repr=False)  # decided, velocity not yet handed back
    pending_mask: Optional[torch.Tensor] = field(default=None, repr=False)  # bool [N] of a pending sparse decision

    def start_token_phase(self, n_tokens, device):
        """First token-wise step: zero accumulators; reuse counts carry over from the chunk-wise phase."""
        if self.token_acc is None:
            self.token_acc = torch.zeros(n_tokens, device=device)
            self.token_reuses = torch.full((n_tokens,), self.chunk_reuses, dtype=torch.int32, device=device)


class VelocityReuse:
    """Fresh velocities where computed, remembered ones where reused, for chunks of ``token_grid``
    tokens of ``patch`` latent pixels. With ``extrapolation`` e > 0 a reused token's velocity at time t
    is ``v1 + e·(v1 − v0)·min((t − t1)/(t1 − t0), 1)`` from its last two computed velocities v1 (at t1)
    and v0 (at t0): first order in time, each token with its own times, never beyond one span. With
    ``order`` 2 the quadratic through the last three computes (Newton's form) adds
    ``e·s·(s + 1)·(t1 − t0)²·D2`` where ``s = min((t − t1)/(t1 − t0), 1)`` and ``D2`` is the second
    divided difference of the three; a token computed only twice falls back to first order."""

    def __init__(self, token_grid, patch, rescale, extrapolation=0.0, order=1):
        self.token_grid, self.patch, self.rescale = token_grid, patch, rescale
        self.extrapolation = float(extrapolation)
        self.order = int(order)
        self.n_tokens = token_grid[0] * token_grid[1] * token_grid[2]

    def __call__(self, mem, action, velocity, dt):
        if self.extrapolation:
            return self._extrapolating(mem, action, velocity)
        if action == "dense":
            mem.velocity = velocity.detach()
            if not self.rescale:
                mem.velocity_dt = torch.full((self.n_tokens,), dt, device=velocity.device)
            return velocity
        if action == "sparse":
            mem.velocity = torch.where(self._to_pixels(mem.pending_mask), velocity.detach(), mem.velocity)
            if not self.rescale:
                mem.velocity_dt = torch.where(mem.pending_mask, dt, mem.velocity_dt)
        if self.rescale:
            return mem.velocity
        # Released behaviour: each token re-applies the displacement v·dt of the step it was computed at.
        return mem.velocity * (self._to_pixels(mem.velocity_dt) / dt)

    def _extrapolating(self, mem, action, velocity):
        if action != "skip":
            self._remember(mem, velocity.detach(), mem.pending_mask if action == "sparse" else None)
        if action == "dense":
            return velocity
        span = mem.t_last - mem.t_prev
        valid = torch.isfinite(span) & (span != 0)
        factor = torch.where(valid, (mem.t_now - mem.t_last) / torch.where(valid, span, 1.0), 0.0)
        factor = factor.clamp(max=EXTRAPOLATION_SPANS)
        out = mem.velocity + self._to_pixels(self.extrapolation * factor) * (mem.velocity - mem.velocity_prev)
        if self.order < 2:
            return out
        # Newton's second term over (t0, t1, t2) = (t_prev2, t_prev, t_last), at t2 + s·(t2 − t1):
        # (t − t2)(t − t1)·D2 with D2 = ((v2 − v1)/(t2 − t1) − (v1 − v0)/(t1 − t0)) / (t2 − t0).
        older = mem.t_prev - mem.t_prev2
        whole = mem.t_last - mem.t_prev2
        valid2 = valid & torch.isfinite(older) & (older != 0) & (whole != 0)
        safe = lambda x: torch.where(valid2, x, 1.0)  # noqa: E731
        # per token: s·(s + 1)·span² / whole, times the velocities' divided differences
        a = torch.where(valid2, factor * (factor + 1.0) * span * span / safe(whole), 0.0)
        first = (mem.velocity - mem.velocity_prev) / self._to_pixels(safe(span))
        second = (mem.velocity_prev - mem.velocity_prev2) / self._to_pixels(safe(older))
        return out + self._to_pixels(self.extrapolation * a) * (first - second)

    def _remember(self, mem, velocity, mask):
        """The computed tokens' new velocity and time; their previous ones move one place back."""
        now = torch.full((self.n_tokens,), float(mem.t_now), device=velocity.device)
        second = self.order >= 2
        if mem.velocity is None:
            mem.velocity, mem.velocity_prev = velocity, velocity
            mem.t_last, mem.t_prev = now, torch.full_like(now, float("nan"))
            if second:
                mem.velocity_prev2, mem.t_prev2 = velocity, torch.full_like(now, float("nan"))
            return
        if mask is None:
            if second:
                mem.velocity_prev2, mem.t_prev2 = mem.velocity_prev, mem.t_prev
            mem.velocity_prev, mem.velocity = mem.velocity, velocity
            mem.t_prev, mem.t_last = mem.t_last, now
            return
        pixels = self._to_pixels(mask)
        if second:
            mem.velocity_prev2 = torch.where(pixels, mem.velocity_prev, mem.velocity_prev2)
            mem.t_prev2 = torch.where(mask, mem.t_prev, mem.t_prev2)
        mem.velocity_prev = torch.where(pixels, mem.velocity, mem.velocity_prev)
        mem.velocity = torch.where(pixels, velocity, mem.velocity)
        mem.t_prev = torch.where(mask, mem.t_last, mem.t_prev)
        mem.t_last = torch.where(mask, now, mem.t_last)

    def _to_pixels(self, token_values):
        """[N] per-token values → [1, T, H, W] per latent pixel (broadcasts over channels)."""
        ph, pw = self.patch
        grid = token_values.view(self.token_grid)
        return grid.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2).unsqueeze(0)
