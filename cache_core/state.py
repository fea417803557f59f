"""CacheState: the per-run memory of a CachePolicy, and its step-by-step decisions.

One sampling run creates one state (``policy.new_state(...)``) and drops it at the end; nothing is ever
stored on a model or on the policy. Per window step the sampler makes three calls:

1. ``decide([ChunkStep(chunk_id, step, feature, t), ...])`` → one ``Decision`` per chunk, saying which
   tokens to compute (``Decision.active``);
2. after running its model, ``velocity(decision, v, dt)`` per chunk → the velocity to integrate with
   (fresh where computed, remembered where reused);
3. after integrating, ``observe([ChunkObservation(...), ...], frame_before)`` → the token weights of
   the next step, from the updated latents; chunks that took their last step are forgotten.

``decide`` compares each chunk's feature with its previous one by relative L1 (Δ). Everything lives
on the tensors' device; ``decide`` makes at most one host sync per call, for the whole window.
"""

from __future__ import annotations

import torch

from . import planning
from .checks import check_int
from .decision import ChunkObservation, ChunkStep
from .velocity_reuse import ChunkMemory, VelocityReuse
from .token_weights import (
    _combine_unchecked,
    _detail_weights_unchecked,
    _motion_weights_unchecked,
    check_grid,
    check_patch,
    check_window,
)


class CacheState:
    """Per-run cache memory for chunks of latent shape ``chunk_shape = (C, T, H, W)``."""

    def __init__(self, policy, *, num_steps, chunk_shape, patch=(2, 2)):
        check_int("num_steps", num_steps, low=1)
        if len(chunk_shape) != 4 or any(int(s) < 1 for s in chunk_shape):
            raise ValueError(f"chunk_shape must be (C, T, H, W) of one chunk's latent, got {tuple(chunk_shape)!r}")
        self.policy = policy
        self.num_steps = num_steps
        self.patch = check_patch(patch)
        self.chunk_shape = tuple(int(s) for s in chunk_shape)
        _, T, H, W = self.chunk_shape
        check_grid(H, W, self.patch)
        if policy.uses_detail_weights:
            check_window("detail_window_size", policy.detail_window_size, H, W)
        self.token_grid = (T, H // self.patch[0], W // self.patch[1])
        self.n_tokens = T * self.token_grid[1] * self.token_grid[2]
        self._reuse = VelocityReuse(self.token_grid, self.patch, policy.rescale_reused_velocity,
                                    policy.velocity_extrapolation, policy.extrapolation_order)
        self._chunks: dict[int, ChunkMemory] = {}
        self._window_acc = None  # teacache: one accumulator for the whole window

    def decide(self, chunk_steps):
        """Decide, for every chunk of the window at this step, what to compute. One host sync at most.

        ``chunk_steps``: ``ChunkStep``s, or ``(chunk_id, step, feature[, t])`` tuples.
        """
        policy, n = self.policy, self.n_tokens
        chunk_steps = [cs if isinstance(cs, ChunkStep) else ChunkStep(*cs) for cs in chunk_steps]
        self._check_window(chunk_steps)  # before anything changes: a bad call leaves the state as it was
        plans = [planning.plan_chunk(policy, self._chunks.setdefault(cs.chunk_id, ChunkMemory()), cs, self.num_steps)
                 for cs in chunk_steps]

        sync = planning.HostSync()
        window = [p for p in plans if p.phase == "window"]
        if window:
            window_acc, window_slot = planning.queue_window(policy, window, self._window_acc, sync)
        for plan in plans:
            if plan.phase == "chunk":
                planning.queue_chunk(policy, plan, sync)
            elif plan.phase == "token":
                planning.queue_token(policy, plan, sync, self.token_grid)
            elif plan.phase == "hybrid":
                planning.queue_hybrid(policy, plan, sync, self.token_grid)
        synced = sync.read()
        planning.check_finite(plans, synced)

        window_reuse = bool(window) and synced[window_slot] > 0.5
        if window:
            self._window_acc = window_acc if window_reuse else None
        decisions = []
        for plan in plans:
            if plan.phase == "window":
                decision = planning.whole_chunk(plan, "skip" if window_reuse else "dense", n)
            elif plan.phase == "chunk":
                reuse = synced[plan.slot] > 0.5
                plan.mem.chunk_acc = plan.cand if reuse else None
                decision = planning.whole_chunk(plan, "skip" if reuse else "dense", n)
            elif plan.phase in planning.TOKEN_PHASES:
                chunk_reuse = plan.phase == "hybrid" and synced[plan.slot + 3] > 0.5
                decision = planning.token_decision(policy, plan, int(synced[plan.slot]), int(synced[plan.slot + 1]), n,
                                                   chunk_reuse)
            else:
                decision = planning.computed_whole(plan, n)
            plan.mem.pending = decision
            decisions.append(decision)
        return decisions

    def velocity(self, decision, velocity, dt):
        """The velocity to integrate this chunk with: fresh where computed, remembered where reused.

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
        if not self.policy.enabled:
            return velocity
        out = self._reuse(mem, decision.action, velocity, dt)
        mem.pending_mask = None
        return out

    def observe(self, chunks, frame_before=None):
        """Record the window's chunks after this step, oldest first (consecutive ``ChunkObservation``s or
        ``(chunk_id, step, latent, velocity, t)`` tuples): the token weights of the next step come from
        their latents. ``frame_before`` is the frame before the first chunk's first frame (the previous
        chunk's clean last frame; None for the first chunk of the video). Chunks that took their last
        step are forgotten.

        The weights of the whole window are computed in one pass (each frame's weights depend only on it
        and the frame before), which keeps this cheap for small chunks.
        """
        chunks = [c if isinstance(c, ChunkObservation) else ChunkObservation(*c) for c in chunks]
        ids = [c.chunk_id for c in chunks]
        if ids and ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"observe needs consecutive chunks, oldest first; got {ids}")
        memories = []
        for chunk_id in ids:
            mem = self._chunks.get(chunk_id)
            if mem is None:
                raise RuntimeError(f"observe() for chunk {chunk_id}, which decide() has not seen (or which finished)")
            memories.append(mem)
        if self.policy.uses_token_weights and chunks:
            self._update_weights(chunks, memories, frame_before)
        for c in chunks:
            if c.step + 1 >= self.num_steps:
                del self._chunks[c.chunk_id]

    def _update_weights(self, chunks, memories, frame_before):
        policy = self.policy
        needed = [policy.phase(c.step + 1, self.num_steps) in planning.TOKEN_PHASES for c in chunks]
        for mem, need in zip(memories, needed):
            if not need:
                mem.weights = None  # the next step does not read weights
        if not any(needed):
            return
        proxies = [self._proxy(c) for c in chunks]
        proxy = proxies[0] if len(proxies) == 1 else torch.cat(proxies, dim=1)
        weights = _motion_weights_unchecked(proxy, frame_before, self.patch, policy.motion_floor, policy.motion_power)
        if policy.uses_detail_weights:
            detail = _detail_weights_unchecked(proxy, policy.detail_window_size, self.patch, policy.detail_alpha)
            weights = _combine_unchecked(weights, detail, policy.weight_combine_mode, policy.detail_lambda)
        for mem, need, w in zip(memories, needed, torch.split(weights, [p.shape[1] for p in proxies])):
            if need:
                mem.weights = w.reshape(-1)

    def _proxy(self, chunk):
        """What the weights are measured on: the latent, or the denoised estimate x + (1 - t)·v."""
        if self.policy.proxy != "denoised":
            return chunk.latent
        if chunk.velocity is None or chunk.t is None:
            raise ValueError('proxy="denoised" needs the velocity and the time t after the step')
        return chunk.latent + (1.0 - float(chunk.t)) * chunk.velocity

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
            if self.policy.velocity_extrapolation and cs.t is None:
                raise ValueError(f"velocity_extrapolation needs each chunk's time t in decide(); chunk {cs.chunk_id} "
                                 "has none (pass ChunkStep(chunk_id, step, feature, t))")
            prev = None if mem is None else mem.prev_feature
            if prev is not None and prev.shape != cs.feature.shape:
                raise ValueError(f"chunk {cs.chunk_id}: feature shape changed between steps: "
                                 f"{tuple(prev.shape)} -> {tuple(cs.feature.shape)}")
