"""What a cache state and a sampler hand each other at every window step: the chunk steps to decide
on, the decisions, and the chunks as they are after the step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ChunkStep:
    """One chunk of the window before a step: its id, its own step counter, its change feature (any
    tensor whose change between steps measures how much the chunk's input moved) and its time before
    the step (0 = noise, 1 = clean; needed only to extrapolate reused velocities)."""

    chunk_id: int
    step: int
    feature: Optional[torch.Tensor] = None
    t: Optional[float] = None


@dataclass(frozen=True)
class ChunkObservation:
    """One chunk of the window after a step: its latent, the velocity it was integrated with and its
    time after the step (0 = noise, 1 = clean; the "denoised" proxy needs both)."""

    chunk_id: int
    step: int
    latent: torch.Tensor
    velocity: Optional[torch.Tensor] = None
    t: Optional[float] = None


@dataclass(frozen=True)
class Decision:
    """Which tokens of one chunk to compute at one step.

    ``active`` is the one representation of the computed tokens: None when every token is computed,
    else their indices (int64, ascending; empty when nothing is computed).
    """

    chunk_id: int
    step: int
    phase: str  # "off", "warmup", "final", "forced", "window", "chunk", "token" or "hybrid"
    n_active: int  # tokens computed this step (a host number)
    n_tokens: int
    active: Optional[torch.Tensor] = None

    @property
    def action(self):
        """ "dense" (every token), "sparse" (some) or "skip" (none)."""
        if self.n_active == self.n_tokens:
            return "dense"
        return "skip" if self.n_active == 0 else "sparse"

    @property
    def active_fraction(self):
        return self.n_active / self.n_tokens


ACTIONS = ("dense", "sparse", "skip")
