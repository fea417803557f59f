"""What the sampler needs from a token-reuse (cache) policy and its per-run state: the contract that
``cache_core.CachePolicy`` fulfils without either package importing the other.

Per window step, ``magi1.sampling.reuse`` makes three calls on the state: ``decide`` (which tokens of each chunk
to compute), ``velocity`` (per chunk: the velocity to integrate with) and ``observe`` (the chunks after
the step; chunks that took their last step are forgotten).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch


@runtime_checkable
class ReuseDecision(Protocol):
    """Which tokens of one chunk to compute at one step."""

    chunk_id: int
    step: int
    phase: str  # why: "warmup", "chunk", "token", "final", ... (reported per step)
    n_active: int  # tokens computed (a host number)
    n_tokens: int
    active: Optional[torch.Tensor]  # None: every token; else ascending int64 indices (empty: none)

    @property
    def action(self) -> str:
        """ "dense", "sparse" or "skip"."""


@runtime_checkable
class ReuseState(Protocol):
    """The memory of one sampling run; created by ``ReusePolicy.new_state`` and dropped with the run."""

    def decide(self, chunk_steps: Sequence[Tuple[int, int, torch.Tensor, float]]) -> Sequence[ReuseDecision]:
        """``(chunk_id, step, change feature, t)`` of each window chunk, oldest first (``t``: its time
        before the step) → its decision."""

    def velocity(self, decision: ReuseDecision, velocity: Optional[torch.Tensor], dt: float) -> torch.Tensor:
        """The model's velocity ``[C, T, H, W]`` of the decided tokens (None when none was computed) → the
        velocity to integrate with over ``dt``."""

    def observe(self, chunks: Sequence[Tuple[int, int, torch.Tensor, torch.Tensor, float]],
                frame_before: Optional[torch.Tensor] = None) -> None:
        """``(chunk_id, step, latent, velocity, t)`` of each window chunk after the step (``t``: its time
        after it), oldest first; ``frame_before``: the clean latent frame before the first of them (None
        for the first chunk of the video)."""


@runtime_checkable
class ReusePolicy(Protocol):
    """The configuration: immutable, shared between runs."""

    mode: str  # its name in reports

    @property
    def enabled(self) -> bool:
        """False: compute everything (the sampler then runs without a state)."""

    @property
    def uses_token_weights(self) -> bool:
        """True when decisions are per token (weighted by motion and detail), so single tokens may be
        reused, not only whole chunks: base models then need a KV cache per window slot too."""

    def new_state(self, *, num_steps: int, chunk_shape: Tuple[int, int, int, int],
                  patch: Tuple[int, int]) -> ReuseState:
        """A fresh state for chunks of latent shape ``chunk_shape`` and ``num_steps`` steps each."""
