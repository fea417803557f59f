"""CacheState: the per-run memory of a CachePolicy, and its step-by-step decisions.

One sampling run creates one state (``policy.new_state(...)``) and drops it at the end; nothing is ever
stored on a model or on the policy. Per step of the window, the sampler:

1. ``decide([ChunkStep(chunk_id, step, feature), ...])`` → one ``Decision`` per chunk: ``dense`` (run
   the model on every token), ``sparse`` (only ``active_indices``) or ``skip`` (no model call);
2. runs the model accordingly, then ``velocity(decision, v, dt)`` → the velocity to integrate with
   (fresh where computed, cached where reused);
3. integrates ``x + v·dt`` itself, then ``observe(chunk_id, step, x, v, t)`` so the token weights for
   the next step come from the updated latent;
4. ``release(chunk_id)`` once a chunk is clean.

``feature`` is any tensor whose change between steps measures how much the chunk's input moved (the
model's patch embedding of the noisy latent, or the latent itself); the state compares it with the
previous step's by relative L1 (Δ). Everything lives on the tensors' device; ``decide`` makes at most
one host sync per call, for the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from .weights import (
    _combine_unchecked,
    _detail_weights_unchecked,
    _motion_weights_unchecked,
    check_grid,
    check_patch,
    check_window,
)

ACTIONS = ("dense", "sparse", "skip")


@dataclass(frozen=True)
class ChunkStep:
    """One chunk of the window at this step: its id, its own step counter, and its change feature."""

    chunk_id: int
    step: int
    feature: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Decision:
    chunk_id: int
    step: int
    phase: str  # "off", "warmup", "final", "forced", "window", "chunk" or "token"
    action: str  # "dense", "sparse" or "skip"
    n_active: int  # tokens computed this step
    n_tokens: int
    active: Optional[torch.Tensor] = None  # bool [n_tokens], sparse only
    active_indices: Optional[torch.Tensor] = None  # int64 [n_active], ascending, sparse only

    @property
    def active_fraction(self):
        return self.n_active / self.n_tokens


@dataclass(frozen=True)
class StepRecord:
    """What happened to one chunk at one step (host numbers only)."""

    chunk_id: int
    step: int
    phase: str
    action: str
    n_active: int
    n_tokens: int


@dataclass
class _ChunkMemory:
    prev_feature: Optional[torch.Tensor] = None
    chunk_acc: Optional[torch.Tensor] = None  # scalar float32: accumulated Δ since the last compute
    chunk_reuses: int = 0  # consecutive whole-chunk reuses
    token_acc: Optional[torch.Tensor] = None  # [N] float32: accumulated W·Δ since each token's last compute
    token_reuses: Optional[torch.Tensor] = None  # [N] int32: consecutive reuses of each token
    velocity: Optional[torch.Tensor] = None  # [C, T, H, W]: each pixel's last computed velocity
    velocity_dt: Optional[torch.Tensor] = None  # [N]: step size each token's velocity was computed at (released mode)
    weights: Optional[torch.Tensor] = None  # [N] float32: token weights for the next decision
    proxy_tail: Optional[torch.Tensor] = None  # [C, H, W]: last frame of the latest weight proxy
    pending: Optional[Decision] = field(default=None, repr=False)


class _Delta(NamedTuple):
    value: torch.Tensor  # Σ|f − f_prev| / (Σ|f_prev| + 1e-8), as means
    num: torch.Tensor
    den: torch.Tensor


@dataclass
class _Plan:
    cs: ChunkStep
    mem: _ChunkMemory
    phase: str
    delta: Optional[_Delta]
    cand: Optional[torch.Tensor] = None  # accumulator value if reused
    active: Optional[torch.Tensor] = None  # token phase: bool [N]
    slot: int = 0  # where this plan's numbers sit in the synced list
    finite_slot: Optional[int] = None  # where the finiteness flag of its Δ sits, if one was synced


class CacheState:
    """Per-run cache memory for chunks of latent shape ``chunk_shape = (C, T, H, W)``."""

    def __init__(self, policy, *, num_steps, chunk_shape, patch=(2, 2)):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if len(chunk_shape) != 4 or any(int(s) < 1 for s in chunk_shape):
            raise ValueError(f"chunk_shape must be (C, T, H, W) of one chunk's latent, got {tuple(chunk_shape)!r}")
        self.policy = policy
        self.num_steps = num_steps
        self.patch = check_patch(patch)
        self.chunk_shape = tuple(int(s) for s in chunk_shape)
        _, T, H, W = self.chunk_shape
        check_grid(H, W, self.patch)
        if policy.mode == "motion_detail":
            check_window("detail_window_size", policy.detail_window_size, H, W)
        self.token_grid = (T, H // self.patch[0], W // self.patch[1])
        self.n_tokens = T * self.token_grid[1] * self.token_grid[2]
        self.records: list[StepRecord] = []
        self._chunks: dict[int, _ChunkMemory] = {}
        self._window_acc = None  # teacache: one accumulator for the whole window

    # ----------------------------------------------------------------------------------------------
    def decide(self, chunk_steps):
        """Decide, for every chunk of the window at this step, what to compute. One host sync at most.

        ``chunk_steps``: ``ChunkStep``s, or ``(chunk_id, step, feature)`` tuples (so that a sampler can
        drive a state without importing this package).
        """
        policy = self.policy
        chunk_steps = [cs if isinstance(cs, ChunkStep) else ChunkStep(*cs) for cs in chunk_steps]
        self._check_window(chunk_steps)  # before anything changes: a bad call leaves the state as it was
        plans = []
        for cs in chunk_steps:
            mem = self._chunks.setdefault(cs.chunk_id, _ChunkMemory())
            delta = self._delta(mem, cs.feature) if policy.enabled else None
            phase = policy.phase(cs.step, self.num_steps)
            if phase in ("window", "chunk", "token") and (delta is None or mem.velocity is None):
                phase = "warmup"  # nothing to compare against or to reuse yet
            if phase in ("window", "chunk") and self._reuse_capped(mem):
                phase = "forced"  # max_reuse reached: this chunk must be computed
            plans.append(_Plan(cs, mem, phase, delta))

        # Device-side candidates; every number the host needs goes into one stacked tensor, one sync.
        to_sync = []
        window = [p for p in plans if p.phase == "window"]
        if window:
            delta = sum(p.delta.num for p in window) / (sum(p.delta.den for p in window) + 1e-8)
            window_acc = delta if self._window_acc is None else self._window_acc + delta
            window_slot = len(to_sync)
            for plan in window:
                plan.finite_slot = window_slot + 1
            to_sync += [(window_acc < policy.chunk_threshold).float(), torch.isfinite(delta).float()]
        for plan in plans:
            delta = plan.delta
            if plan.phase == "chunk":
                mem = plan.mem
                plan.cand = delta.value if mem.chunk_acc is None else mem.chunk_acc + delta.value
                plan.slot, plan.finite_slot = len(to_sync), len(to_sync) + 1
                to_sync += [(plan.cand < policy.chunk_threshold).float(), torch.isfinite(delta.value).float()]
            elif plan.phase == "token":
                mem = self._token_memory(plan.mem, delta.value.device)
                weights = mem.weights if mem.weights is not None else 1.0
                plan.cand = mem.token_acc + weights * delta.value
                plan.active = plan.cand >= policy.tau
                n_forced = delta.value.new_zeros(())
                if policy.max_reuse is not None:
                    forced = mem.token_reuses >= policy.max_reuse
                    plan.active = plan.active | forced
                    n_forced = forced.sum().float()
                plan.slot, plan.finite_slot = len(to_sync), len(to_sync) + 2
                to_sync += [plan.active.sum().float(), n_forced, torch.isfinite(delta.value).float()]
        synced = torch.stack(to_sync).tolist() if to_sync else []

        bad = [p.cs.chunk_id for p in plans if p.finite_slot is not None and synced[p.finite_slot] < 0.5]
        if bad:
            raise ValueError(
                f"non-finite values (NaN or Inf) in the change feature of chunk(s) {bad}; "
                "the latent diverged, so the cache cannot decide"
            )

        window_reuse = False
        if window:
            window_reuse = synced[window_slot] > 0.5
            self._window_acc = window_acc if window_reuse else None
        decisions = []
        for plan in plans:
            cs, mem = plan.cs, plan.mem
            if plan.phase == "window":
                decision = self._whole_chunk(plan, "skip" if window_reuse else "dense")
            elif plan.phase == "chunk":
                reuse = synced[plan.slot] > 0.5
                mem.chunk_acc = plan.cand if reuse else None
                decision = self._whole_chunk(plan, "skip" if reuse else "dense")
            elif plan.phase == "token":
                decision = self._token_decision(plan, int(synced[plan.slot]), int(synced[plan.slot + 1]))
            else:  # off, warmup, final, forced: computed, accumulators cleared
                mem.chunk_acc = None
                if mem.token_acc is not None:
                    mem.token_acc.zero_()
                decision = self._whole_chunk(plan, "dense")
            mem.pending = decision
            self.records.append(
                StepRecord(cs.chunk_id, cs.step, decision.phase, decision.action, decision.n_active, self.n_tokens)
            )
            decisions.append(decision)
        return decisions

    def velocity(self, decision, velocity, dt):
        """The velocity to integrate this chunk with: fresh where computed, cached where reused.

        ``velocity`` is the model output in latent layout ``[C, T, H, W]`` (only the active tokens of a
        sparse decision are read; may be None for a skip). For a dense decision it is returned as is.
        Do not modify the returned tensor in place: the state keeps it for later reuse.
        """
        mem = self._chunks.get(decision.chunk_id)
        if mem is None or mem.pending is not decision:
            raise RuntimeError(f"chunk {decision.chunk_id}: velocity() needs the decision decide() just returned")
        if decision.action != "skip" and (velocity is None or tuple(velocity.shape) != self.chunk_shape):
            got = None if velocity is None else tuple(velocity.shape)
            raise ValueError(f"velocity shape {got} does not match chunk_shape {self.chunk_shape}")
        dt = float(dt)
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        mem.pending = None
        if decision.action == "dense":
            if not self.policy.enabled:
                return velocity
            mem.velocity = velocity.detach()
            if not self.policy.rescale_reused_velocity:
                mem.velocity_dt = torch.full((self.n_tokens,), dt, device=velocity.device)
            return velocity
        if decision.action == "sparse":
            mem.velocity = torch.where(self._to_pixels(decision.active), velocity.detach(), mem.velocity)
            if not self.policy.rescale_reused_velocity:
                mem.velocity_dt = torch.where(decision.active, dt, mem.velocity_dt)
        if self.policy.rescale_reused_velocity:
            return mem.velocity
        # Released behaviour: each token re-applies the displacement v·dt of the step it was computed at.
        return mem.velocity * (self._to_pixels(mem.velocity_dt) / dt)

    def observe(self, chunk_id, step, latent, velocity=None, t=None, prev_frame=None):
        """Record the chunk's latent after this step; computes the token weights the next step needs.

        ``velocity`` and ``t`` (time after the step, 0 = noise, 1 = clean) are needed for the
        "denoised" proxy. ``prev_frame`` is the frame before ``latent[:, 0]`` in the same proxy space
        (``proxy_tail(chunk_id - 1)`` while that chunk is still denoising, its clean latent's last frame
        once it is clean, or None for the first chunk of the video).
        """
        self.observe_window([(chunk_id, step, latent, velocity, t)], prev_frame)

    def observe_window(self, chunks, prev_frame=None):
        """``observe`` for consecutive chunks of one window at once, oldest first: ``chunks`` holds
        ``(chunk_id, step, latent, velocity, t)``; ``prev_frame`` is the frame before the first one.

        The weights are computed in one pass over the window's frames (each frame's weights depend
        only on it and the frame before), which is what keeps this cheap for small chunks.
        """
        policy = self.policy
        ids = [c[0] for c in chunks]
        if ids and ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"observe_window needs consecutive chunks, oldest first; got {ids}")
        memories = []
        for chunk_id, *_ in chunks:
            mem = self._chunks.get(chunk_id)
            if mem is None:
                raise RuntimeError(f"observe() for chunk {chunk_id}, which decide() has not seen (or which was released)")
            memories.append(mem)
        if not policy.uses_token_weights or not chunks:
            return
        proxies = []
        for (_, _, latent, velocity, t), mem in zip(chunks, memories):
            if policy.proxy == "denoised":
                if velocity is None or t is None:
                    raise ValueError('proxy="denoised" needs the velocity and the time t after the step')
                proxy = latent + (1.0 - float(t)) * velocity
            else:
                proxy = latent
            mem.proxy_tail = proxy[:, -1].detach()
            proxies.append(proxy)
        needed = [policy.phase(step + 1, self.num_steps) == "token" for _, step, *_ in chunks]
        for mem, need in zip(memories, needed):
            if not need:
                mem.weights = None  # the next step does not read weights
        if not any(needed):
            return
        proxy = proxies[0] if len(proxies) == 1 else torch.cat(proxies, dim=1)
        weights = _motion_weights_unchecked(proxy, prev_frame, self.patch, policy.motion_floor, policy.motion_power)
        if policy.mode == "motion_detail":
            detail = _detail_weights_unchecked(proxy, policy.detail_window_size, self.patch, policy.detail_alpha)
            weights = _combine_unchecked(weights, detail, policy.weight_combine_mode, policy.detail_lambda)
        frames = [p.shape[1] for p in proxies]
        for mem, need, w in zip(memories, needed, torch.split(weights, frames)):
            if need:
                mem.weights = w.reshape(-1)

    def proxy_tail(self, chunk_id):
        """Last frame of the chunk's latest weight proxy (None if unknown): the next chunk's prev_frame."""
        mem = self._chunks.get(chunk_id)
        return None if mem is None else mem.proxy_tail

    def release(self, chunk_id):
        """Forget a chunk that left the window (its memory is freed)."""
        self._chunks.pop(chunk_id, None)

    # ----------------------------------------------------------------------------------------------
    def _check_window(self, chunk_steps):
        ids = [cs.chunk_id for cs in chunk_steps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a chunk appears twice in one window step: {ids}")
        for cs in chunk_steps:
            mem = self._chunks.get(cs.chunk_id)
            if mem is not None and mem.pending is not None:
                raise RuntimeError(f"chunk {cs.chunk_id}: velocity() was not called for its previous decision")
            if not self.policy.enabled:
                continue
            if not isinstance(cs.feature, torch.Tensor):
                raise ValueError(f"mode {self.policy.mode!r} needs a change feature (a tensor) for every chunk step")
            prev = None if mem is None else mem.prev_feature
            if prev is not None and prev.shape != cs.feature.shape:
                raise ValueError(
                    f"chunk {cs.chunk_id}: feature shape changed between steps: "
                    f"{tuple(prev.shape)} -> {tuple(cs.feature.shape)}"
                )

    def _delta(self, mem, feature):
        """Relative L1 change of the feature since the chunk's previous step, or None on its first."""
        feature = feature.detach()
        prev, mem.prev_feature = mem.prev_feature, feature
        if prev is None:
            return None
        num = (feature.float() - prev.float()).abs().mean()
        den = prev.float().abs().mean()
        return _Delta(num / (den + 1e-8), num, den)

    def _reuse_capped(self, mem):
        cap = self.policy.max_reuse
        return cap is not None and mem.chunk_reuses >= cap

    def _token_memory(self, mem, device):
        if mem.token_acc is None:  # first token-wise step: reuse counts carry over from the chunk-wise phase
            mem.token_acc = torch.zeros(self.n_tokens, device=device)
            mem.token_reuses = torch.full((self.n_tokens,), mem.chunk_reuses, dtype=torch.int32, device=device)
        return mem

    def _whole_chunk(self, plan, action):
        cs, mem, phase = plan.cs, plan.mem, plan.phase
        if action == "skip":
            mem.chunk_reuses += 1
            if mem.token_reuses is not None:
                mem.token_reuses += 1
            return Decision(cs.chunk_id, cs.step, phase, "skip", 0, self.n_tokens)
        mem.chunk_reuses = 0
        if mem.token_reuses is not None:
            mem.token_reuses.zero_()
        return Decision(cs.chunk_id, cs.step, phase, "dense", self.n_tokens, self.n_tokens)

    def _token_decision(self, plan, n_active, n_forced):
        policy, cs, mem, cand, active = self.policy, plan.cs, plan.mem, plan.cand, plan.active
        mem.chunk_reuses = 0  # the chunk-wise counter only spans the chunk-wise phase
        deferred = 0 < n_active < policy.min_active_ratio * self.n_tokens and n_forced == 0
        if n_active == 0 or deferred:  # nothing (or too little) to compute: every token keeps accumulating
            mem.token_acc = cand
            mem.token_reuses += 1
            return Decision(cs.chunk_id, cs.step, "token", "skip", 0, self.n_tokens)
        mem.token_acc = torch.where(active, 0.0, cand)
        mem.token_reuses = torch.where(active, 0, mem.token_reuses + 1)
        if n_active == self.n_tokens:
            return Decision(cs.chunk_id, cs.step, "token", "dense", n_active, self.n_tokens)
        # Active indices in ascending order without a second sync (n_active is already on the host).
        indices = torch.argsort((~active).to(torch.uint8), stable=True)[:n_active]
        return Decision(cs.chunk_id, cs.step, "token", "sparse", n_active, self.n_tokens, active, indices)

    def _to_pixels(self, token_values):
        """[N] per-token values → [1, T, H, W] per latent pixel (broadcasts over channels)."""
        ph, pw = self.patch
        grid = token_values.view(self.token_grid)
        return grid.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2).unsqueeze(0)
