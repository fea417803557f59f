"""How one window step becomes decisions: each chunk's phase and change (Δ), the reuse accumulators
that would result, every number the host needs gathered for one sync, then the decisions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .decision import ChunkStep, Decision
from .velocity_reuse import ChunkMemory


TOKEN_PHASES = ("token", "hybrid")  # phases whose decisions are per token (they read the token weights)


class Delta(NamedTuple):
    value: torch.Tensor  # Σ|f − f_prev| / (Σ|f_prev| + 1e-8), as means
    num: torch.Tensor
    den: torch.Tensor


@dataclass
class Plan:
    """One chunk of the window while its decision is being made."""

    cs: ChunkStep
    mem: ChunkMemory
    phase: str
    delta: Optional[Delta]
    cand: Optional[torch.Tensor] = None  # accumulator value if reused
    chunk_cand: Optional[torch.Tensor] = None  # hybrid: the chunk's accumulator if it is reused whole
    active_mask: Optional[torch.Tensor] = None  # token phase: bool [N], the tokens to compute
    tau: float = 0.0  # the token threshold at this step
    slot: int = 0  # where this plan's numbers sit in the synced list
    finite_slot: Optional[int] = None  # where the finiteness flag of its Δ sits, if one was synced


class HostSync:
    """Device scalars queued for one ``.tolist()``: the only host sync of a window step."""

    def __init__(self):
        self._values = []

    def add(self, *values):
        """Queue scalars; returns the slot of the first."""
        slot = len(self._values)
        self._values += [v.float() for v in values]
        return slot

    def read(self):
        return torch.stack(self._values).tolist() if self._values else []


def relative_change(mem, feature):
    """Relative L1 change of the feature since the chunk's previous step (None on its first); the
    feature is remembered for the next step."""
    feature = feature.detach()
    prev, mem.prev_feature = mem.prev_feature, feature
    if prev is None:
        return None
    num = (feature.float() - prev.float()).abs().mean()
    den = prev.float().abs().mean()
    return Delta(num / (den + 1e-8), num, den)


def plan_chunk(policy, mem, cs, num_steps):
    """The chunk's phase at this step, demoted where nothing can be reused yet or reuse is capped."""
    delta = relative_change(mem, cs.feature) if policy.enabled else None
    phase = policy.phase(cs.step, num_steps)
    mem.t_now = cs.t  # the time a reused velocity is extrapolated to
    if phase in ("window", "chunk", *TOKEN_PHASES) and (delta is None or mem.velocity is None):
        phase = "warmup"  # nothing to compare against or to reuse yet
    if phase in ("window", "chunk") and policy.max_reuse is not None and mem.chunk_reuses >= policy.max_reuse:
        phase = "forced"  # max_reuse reached: this chunk must be computed
    return Plan(cs, mem, phase, delta, tau=policy.token_threshold(cs.step, num_steps))


def queue_window(policy, plans, window_acc, sync):
    """TeaCache: one accumulator over the whole window. Returns ``(accumulator if reused, slot)``."""
    delta = sum(p.delta.num for p in plans) / (sum(p.delta.den for p in plans) + 1e-8)
    acc = delta if window_acc is None else window_acc + delta
    slot = sync.add(acc < policy.chunk_threshold, torch.isfinite(delta))
    for plan in plans:
        plan.finite_slot = slot + 1
    return acc, slot


def queue_chunk(policy, plan, sync):
    """Whole-chunk reuse: the chunk's accumulator if it is reused this step; queues whether it is."""
    delta = plan.delta.value
    plan.cand = delta if plan.mem.chunk_acc is None else plan.mem.chunk_acc + delta
    plan.slot = sync.add(plan.cand < policy.chunk_threshold, torch.isfinite(delta))
    plan.finite_slot = plan.slot + 1


def queue_token(policy, plan, sync, grid):
    """Token-wise reuse over a chunk of ``grid = (T, H, W)`` tokens: every token's accumulator and which
    tokens are computed (those reaching τ, with their neighbours and within the budget where the policy
    says so, and those the reuse cap forces); queues how many are computed and how many the cap forced."""
    n_tokens = grid[0] * grid[1] * grid[2]
    delta = plan.delta.value
    mem = plan.mem
    mem.start_token_phase(n_tokens, delta.device)
    weights = mem.weights if mem.weights is not None else 1.0
    plan.cand = mem.token_acc + weights * delta
    due = plan.cand >= plan.tau
    if policy.refresh_neighbours:
        due = F.max_pool2d(due.view(grid).float()[:, None], 3, stride=1, padding=1).view(-1) > 0
    if policy.max_active_ratio is not None:
        budget = max(1, int(policy.max_active_ratio * n_tokens))
        if budget < n_tokens:  # the budget's largest accumulators among the tokens due
            best = torch.topk(torch.where(due, plan.cand, -torch.inf), budget).indices
            due = due & torch.zeros_like(due).index_fill_(0, best, True)
    plan.active_mask = due
    n_forced = delta.new_zeros(())
    if policy.max_reuse is not None:
        forced = mem.token_reuses >= policy.max_reuse
        plan.active_mask = plan.active_mask | forced
        n_forced = forced.sum().float()
    plan.slot = sync.add(plan.active_mask.sum().float(), n_forced, torch.isfinite(delta))
    plan.finite_slot = plan.slot + 2


def queue_hybrid(policy, plan, sync, grid):
    """Hybrid: the token rule as in ``queue_token``, and whether the chunk's accumulated change stays
    under the chunk threshold (then the whole chunk may be reused). Its slot follows the token counts."""
    delta = plan.delta.value
    plan.chunk_cand = delta if plan.mem.chunk_acc is None else plan.mem.chunk_acc + delta
    queue_token(policy, plan, sync, grid)
    sync.add(plan.chunk_cand < policy.chunk_threshold)


def check_finite(plans, synced):
    bad = [p.cs.chunk_id for p in plans if p.finite_slot is not None and synced[p.finite_slot] < 0.5]
    if bad:
        raise ValueError(f"non-finite values (NaN or Inf) in the change feature of chunk(s) {bad}; "
                         "the latent diverged, so the cache cannot decide")


def whole_chunk(plan, action, n_tokens):
    """A dense or skip decision; the reuse counters follow it."""
    cs, mem = plan.cs, plan.mem
    if action == "skip":
        mem.chunk_reuses += 1
        if mem.token_reuses is not None:
            mem.token_reuses += 1
        nothing = torch.empty(0, dtype=torch.long, device=plan.delta.value.device)
        return Decision(cs.chunk_id, cs.step, plan.phase, 0, n_tokens, nothing)
    mem.chunk_reuses = 0
    if mem.token_reuses is not None:
        mem.token_reuses.zero_()
    return Decision(cs.chunk_id, cs.step, plan.phase, n_tokens, n_tokens)


def computed_whole(plan, n_tokens):
    """off, warm-up, final and forced steps: computed, accumulators cleared."""
    plan.mem.chunk_acc = None
    if plan.mem.token_acc is not None:
        plan.mem.token_acc.zero_()
    return whole_chunk(plan, "dense", n_tokens)


def token_decision(policy, plan, n_active, n_forced, n_tokens, chunk_reuse=False):
    """The token phase's decision from the synced counts; accumulators reset where computed. In the
    hybrid phase ``chunk_reuse`` (the chunk's change stayed under the chunk threshold) reuses the whole
    chunk unless the reuse cap forces a token."""
    cs, mem, cand, active = plan.cs, plan.mem, plan.cand, plan.active_mask
    mem.chunk_reuses = 0  # the chunk-wise counter only spans the chunk-wise phase
    deferred = 0 < n_active < policy.min_active_ratio * n_tokens and n_forced == 0
    if n_active == 0 or deferred or (chunk_reuse and n_forced == 0):
        # nothing (or too little) to compute: every token keeps accumulating, and so does the chunk
        mem.token_acc = cand
        mem.token_reuses += 1
        mem.chunk_acc = plan.chunk_cand
        nothing = torch.empty(0, dtype=torch.long, device=active.device)
        return Decision(cs.chunk_id, cs.step, plan.phase, 0, n_tokens, nothing)
    mem.chunk_acc = None
    mem.token_acc = torch.where(active, 0.0, cand)
    mem.token_reuses = torch.where(active, 0, mem.token_reuses + 1)
    if n_active == n_tokens:
        return Decision(cs.chunk_id, cs.step, plan.phase, n_tokens, n_tokens)
    mem.pending_mask = active
    # Active indices in ascending order without a second sync (n_active is already on the host).
    indices = torch.argsort((~active).to(torch.uint8), stable=True)[:n_active]
    return Decision(cs.chunk_id, cs.step, plan.phase, n_active, n_tokens, indices)
