"""CacheState on small hand-computed sequences, and its invariants."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cache_core import CachePolicy, ChunkStep, combine_weights, detail_weights, motion_weights

# One chunk of 2 latent frames of 2x6 latent pixels, patch 2x2: 3 tokens per frame, 6 in all.
# Frame 0 has no previous frame (weight 1); frame 1 changes by 0, 0.5 and 1 in its three tokens,
# so with motion_floor 0.6 the token weights are exactly [1, 1, 1, 0.6, 0.8, 1].
SHAPE = (1, 2, 2, 6)
LATENT = torch.zeros(SHAPE)
LATENT[0, 1, :, 2:4] = 0.5
LATENT[0, 1, :, 4:6] = 1.0
WEIGHTS = [1.0, 1.0, 1.0, 0.6, 0.8, 1.0]


def features(deltas, size=8):
    """Features whose relative L1 change at step k is deltas[k - 1]."""
    out = [torch.ones(size)]
    for d in deltas:
        out.append(out[-1] * (1.0 + d))
    return out


def run(policy, num_steps, deltas, *, latent=LATENT, dt=0.1):
    """Drive one chunk through every step; returns the decisions and the velocities handed back."""
    state = policy.new_state(num_steps=num_steps, chunk_shape=tuple(latent.shape))
    feats = features(deltas)
    decisions, velocities = [], []
    for k in range(num_steps):
        (decision,) = state.decide([ChunkStep(0, k, feats[k])])
        fresh = torch.full(latent.shape, float(k + 1))
        velocities.append(state.velocity(decision, fresh, dt))
        state.observe([(0, k, latent)])
        decisions.append(decision)
    return decisions, velocities


def summary(decisions):
    return [
        (d.phase, d.action, d.active.tolist() if d.action == "sparse" else d.n_active) for d in decisions
    ]


def token_policy(**changes):
    """motion mode on the latent, one warm-up step, straight into token-wise decisions, nothing forced at the end."""
    base = dict(mode="motion", proxy="latent", tau=0.25, warmup_steps=1, chunk_wise_steps=0, final_full_steps=0)
    return CachePolicy(**{**base, **changes})


def test_observed_weights_are_the_hand_computed_ones():
    state = token_policy().new_state(num_steps=4, chunk_shape=SHAPE)
    state.decide([ChunkStep(0, 0, torch.ones(3))])
    state.observe([(0, 0, LATENT)])
    torch.testing.assert_close(state._chunks[0].weights, torch.tensor(WEIGHTS))


def test_phase_boundaries_follow_each_chunks_own_step_counter():
    policy = CachePolicy(proxy="latent", mode="motion", warmup_steps=2, chunk_wise_steps=3, final_full_steps=1, tau=1e9)
    decisions, _ = run(policy, 10, [0.01] * 9)
    assert [d.phase for d in decisions] == ["warmup"] * 2 + ["chunk"] * 3 + ["token"] * 4 + ["final"]
    assert [policy.phase(k, 10) for k in range(10)] == [d.phase for d in decisions]


def test_chunk_level_accumulator_crosses_tau_and_resets():
    policy = CachePolicy(proxy="latent", mode="flowcache", tau=0.25, warmup_steps=1, final_full_steps=0)
    # accumulator: .1 skip, .2 skip, .3 recompute (reset), .3 recompute, .05 skip, .1 skip, .3 recompute
    decisions, _ = run(policy, 8, [0.1, 0.1, 0.1, 0.3, 0.05, 0.05, 0.2])
    assert [d.action for d in decisions] == ["dense", "skip", "skip", "dense", "dense", "skip", "skip", "dense"]
    assert [d.phase for d in decisions] == ["warmup"] + ["chunk"] * 7


def test_chunk_tau_overrides_tau_for_whole_chunk_decisions():
    policy = CachePolicy(proxy="latent", mode="flowcache", tau=0.0, chunk_tau=0.25, warmup_steps=1, final_full_steps=0)
    decisions, _ = run(policy, 4, [0.1, 0.1, 0.1])
    assert [d.action for d in decisions] == ["dense", "skip", "skip", "dense"]


def test_token_accumulators_cross_tau_and_reset_where_recomputed():
    # A += W·0.1 each step, active where A >= 0.25, A = 0 where recomputed (see the module docstring):
    # k1 [.1 .1 .1 .06 .08 .1] none; k2 [.2 .2 .2 .12 .16 .2] none; k3 [.3 .3 .3 .18 .24 .3] → 0,1,2,5;
    # k4 [.1 .1 .1 .24 .32 .1] → 4; k5 [.2 .2 .2 .30 .08 .2] → 3; k6 [.3 .3 .3 .06 .16 .3] → 0,1,2,5.
    decisions, _ = run(token_policy(), 7, [0.1] * 6)
    assert summary(decisions) == [
        ("warmup", "dense", 6),
        ("token", "skip", 0),
        ("token", "skip", 0),
        ("token", "sparse", [0, 1, 2, 5]),
        ("token", "sparse", [4]),
        ("token", "sparse", [3]),
        ("token", "sparse", [0, 1, 2, 5]),
    ]
    sparse = decisions[3]
    assert sparse.n_active == 4 and sparse.n_tokens == 6 and sparse.active_fraction == pytest.approx(4 / 6)
    assert sparse.active.tolist() == [0, 1, 2, 5] and sparse.active.dtype == torch.int64


def test_max_reuse_forces_a_refresh():
    # As above, but a token reused 3 times in a row must be computed: at k4 token 3 (reused at k1..k3)
    # joins token 4, and its accumulator is reset although it had not reached tau.
    decisions, _ = run(token_policy(max_reuse=3), 7, [0.1] * 6)
    assert summary(decisions)[3:] == [
        ("token", "sparse", [0, 1, 2, 5]),
        ("token", "sparse", [3, 4]),
        ("token", "skip", 0),
        ("token", "sparse", [0, 1, 2, 5]),
    ]


def test_max_reuse_caps_whole_chunk_reuse():
    policy = CachePolicy(proxy="latent", mode="flowcache", tau=10.0, warmup_steps=1, final_full_steps=0, max_reuse=2)
    decisions, _ = run(policy, 8, [0.01] * 7)
    assert [(d.phase, d.action) for d in decisions] == [
        ("warmup", "dense"),
        ("chunk", "skip"),
        ("chunk", "skip"),
        ("forced", "dense"),
        ("chunk", "skip"),
        ("chunk", "skip"),
        ("forced", "dense"),
        ("chunk", "skip"),
    ]


def test_reuse_counts_carry_from_chunk_wise_into_token_wise_phase():
    # Two whole-chunk reuses (k1, k2), then token-wise: with max_reuse=3 every token has been reused
    # twice already, so by k4 all of them are forced.
    policy = CachePolicy(
        proxy="latent", mode="motion", tau=10.0, warmup_steps=1, chunk_wise_steps=2, final_full_steps=0, max_reuse=3)
    decisions, _ = run(policy, 5, [0.01] * 4)
    assert summary(decisions) == [
        ("warmup", "dense", 6),
        ("chunk", "skip", 0),
        ("chunk", "skip", 0),
        ("token", "skip", 0),
        ("token", "dense", 6),
    ]


def test_min_active_ratio_defers_small_updates_and_keeps_accumulating():
    # Updates under 3 of 6 tokens wait: k4 (token 4 alone) and k5 (tokens 3, 4) are deferred with
    # A still growing, so at k6 A = [.3 .3 .3 .36 .48 .3] and every token is computed together.
    decisions, _ = run(token_policy(min_active_ratio=0.5), 7, [0.1] * 6)
    assert summary(decisions)[3:] == [
        ("token", "sparse", [0, 1, 2, 5]),
        ("token", "skip", 0),
        ("token", "skip", 0),
        ("token", "dense", 6),
    ]


def test_min_active_ratio_never_defers_a_token_forced_by_max_reuse():
    decisions, _ = run(token_policy(min_active_ratio=0.5, max_reuse=3), 5, [0.1] * 4)
    assert summary(decisions)[4] == ("token", "sparse", [3, 4])


def test_final_full_steps_are_always_computed_and_reset_accumulators():
    decisions, _ = run(token_policy(final_full_steps=2, tau=10.0), 7, [0.1] * 6)
    assert summary(decisions)[-3:] == [("token", "skip", 0), ("final", "dense", 6), ("final", "dense", 6)]


def test_token_phase_starts_from_zero_accumulators():
    # Chunk-wise accumulation reaches .2 before token-wise starts; if it leaked into the token
    # accumulators, the first token-wise step would already cross tau = .25.
    policy = CachePolicy(
        proxy="latent", mode="motion", tau=0.25, warmup_steps=1, chunk_wise_steps=2, final_full_steps=0)
    decisions, _ = run(policy, 5, [0.1] * 4)
    assert summary(decisions) == [
        ("warmup", "dense", 6),
        ("chunk", "skip", 0),
        ("chunk", "skip", 0),
        ("token", "skip", 0),
        ("token", "skip", 0),
    ]


def test_each_chunk_follows_its_own_counter_and_memory():
    # Chunk 1 enters two steps after chunk 0; both see the same changes, so each must go through
    # exactly the single-chunk sequence above, on its own step counter, whatever the other does.
    alone, _ = run(token_policy(), 7, [0.1] * 6)
    state = token_policy().new_state(num_steps=7, chunk_shape=SHAPE)
    feats = features([0.1] * 6)
    per_chunk = {0: [], 1: []}
    for global_step in range(9):
        window = [ChunkStep(c, global_step - 2 * c, feats[global_step - 2 * c]) for c in (0, 1)
                  if 0 <= global_step - 2 * c < 7]
        for d in state.decide(window):
            state.velocity(d, torch.zeros(SHAPE), 0.1)
            state.observe([(d.chunk_id, d.step, LATENT)])
            per_chunk[d.chunk_id].append(d)
    assert summary(per_chunk[0]) == summary(alone)
    assert summary(per_chunk[1]) == summary(alone)


# ----------------------------------------------------------------------------------------------------
# Velocities handed back.


def test_dense_velocity_is_returned_untouched():
    decisions, velocities = run(token_policy(tau=0.0), 4, [0.1] * 3)
    assert all(d.action == "dense" for d in decisions)
    for k, v in enumerate(velocities):
        assert torch.equal(v, torch.full(SHAPE, float(k + 1)))


def test_reused_tokens_advance_with_cached_velocity_times_current_step():
    decisions, velocities = run(token_policy(), 5, [0.1] * 4)
    # k1, k2 skip: the warm-up velocity (1.0) is reused; the sampler multiplies it by the current dt.
    assert torch.equal(velocities[1], torch.ones(SHAPE)) and torch.equal(velocities[2], torch.ones(SHAPE))
    # k3 sparse on tokens 0,1,2 (frame 0) and 5 (frame 1, columns 4-5): fresh 4.0 there, cached 1.0 elsewhere.
    expected = torch.ones(SHAPE)
    expected[0, 0] = 4.0
    expected[0, 1, :, 4:6] = 4.0
    assert torch.equal(velocities[3], expected)
    # k4 sparse on token 4 (frame 1, columns 2-3): 5.0 there; the others keep what they last computed.
    expected[0, 1, :, 2:4] = 5.0
    assert torch.equal(velocities[4], expected)


def test_released_displacement_reuse_replays_the_old_step():
    policy = token_policy(rescale_reused_velocity=False)
    state = policy.new_state(num_steps=3, chunk_shape=SHAPE)
    feats = features([0.1, 0.1])
    (d0,) = state.decide([ChunkStep(0, 0, feats[0])])
    assert torch.equal(state.velocity(d0, torch.full(SHAPE, 2.0), 0.1), torch.full(SHAPE, 2.0))
    state.observe([(0, 0, LATENT)])
    (d1,) = state.decide([ChunkStep(0, 1, feats[1])])
    assert d1.action == "skip"
    v1 = state.velocity(d1, None, 0.125)
    # x += v1 · 0.125 must replay the old displacement 2.0 · 0.1
    torch.testing.assert_close(v1 * 0.125, torch.full(SHAPE, 0.2))


def test_mode_off_never_reuses_and_needs_no_feature():
    policy = CachePolicy(proxy="latent", mode="off", tau=1e9)
    state = policy.new_state(num_steps=6, chunk_shape=SHAPE)
    decisions = []
    for k in range(6):
        (d,) = state.decide([ChunkStep(0, k)])
        v = torch.randn(SHAPE)
        assert d.action == "dense" and d.phase == "off"
        assert state.velocity(d, v, 0.1) is v
        state.observe([(0, k, LATENT)])
        decisions.append(d)
    assert all(r.action == "dense" for r in decisions)


# ----------------------------------------------------------------------------------------------------
# Properties over random runs.


def random_run(policy, seed, *, chunks=3, num_steps=12, shape=(4, 2, 6, 8)):
    """Several chunks, staggered, random features, latents and velocities; returns all decisions."""
    g = torch.Generator().manual_seed(seed)
    state = policy.new_state(num_steps=num_steps, chunk_shape=shape)
    decisions = []
    latents = {c: torch.randn(shape, generator=g) for c in range(chunks)}
    for global_step in range(num_steps + 4 * (chunks - 1)):
        window = [(c, global_step - 4 * c) for c in range(chunks) if 0 <= global_step - 4 * c < num_steps]
        feats = {c: torch.randn(shape, generator=g) * 0.01 + latents[c] for c, _ in window}
        step_decisions = state.decide([ChunkStep(c, k, feats[c]) for c, k in window])
        observed = []
        for d in step_decisions:
            fresh = torch.randn(shape, generator=g)
            v = state.velocity(d, fresh if d.action != "skip" else None, 0.05)
            if d.action == "dense":
                assert v is fresh
            latents[d.chunk_id] = latents[d.chunk_id] + 0.05 * v
            observed.append((d.chunk_id, d.step, latents[d.chunk_id], v, 0.05 * (d.step + 1)))
        state.observe(observed)  # chunks that took their last step are forgotten
        assert all(d.chunk_id not in state._chunks for d in step_decisions if d.step == num_steps - 1)
        decisions += step_decisions
    return decisions


MODES_WITH_REUSE = ["teacache", "flowcache", "motion", "motion_detail"]


@pytest.mark.parametrize("mode", MODES_WITH_REUSE)
@pytest.mark.parametrize("seed", range(3))
def test_tau_zero_computes_every_token_after_warmup(mode, seed):
    policy = CachePolicy(proxy="latent", mode=mode, tau=0.0, warmup_steps=2, chunk_wise_steps=3, final_full_steps=0)
    decisions = random_run(policy, seed)
    assert {d.phase for d in decisions} >= {"warmup"}
    assert all(d.action == "dense" and d.n_active == d.n_tokens for d in decisions)


def test_tau_zero_computes_even_tokens_whose_weight_is_zero():
    # motion_floor 0 gives token 3 (no motion) weight 0, so its accumulator stays exactly 0: "A >= tau"
    # still computes it when tau = 0 (a strict ">" would reuse it forever).
    decisions, _ = run(token_policy(tau=0.0, motion_floor=0.0), 5, [0.1] * 4)
    assert summary(decisions) == [("warmup", "dense", 6)] + [("token", "dense", 6)] * 4


@pytest.mark.parametrize("seed", range(3))
def test_mode_off_is_dense_everywhere_whatever_tau(seed):
    decisions = random_run(CachePolicy(proxy="latent", mode="off", tau=1e9), seed)
    assert all(d.action == "dense" and d.phase == "off" for d in decisions)


@pytest.mark.parametrize("mode", MODES_WITH_REUSE)
def test_a_large_tau_does_reuse(mode):
    # The counterpart of the two tests above: they would pass trivially if nothing were ever reused.
    decisions = random_run(CachePolicy(
        proxy="latent", mode=mode, tau=1e9, warmup_steps=2, chunk_wise_steps=3, final_full_steps=1), 0)
    assert any(d.action == "skip" for d in decisions)


def test_sparse_decisions_are_consistent():
    policy = CachePolicy(
        proxy="latent", mode="motion_detail", tau=0.1, warmup_steps=1, chunk_wise_steps=0, final_full_steps=1)
    decisions = random_run(policy, 4)
    sparse = [d for d in decisions if d.action == "sparse"]
    assert sparse, "this configuration must produce sparse steps"
    for d in sparse:
        assert 0 < d.n_active < d.n_tokens
        assert d.active.dtype == torch.int64 and d.active.numel() == d.n_active
        assert torch.equal(d.active, torch.unique(d.active))  # ascending, each token once


def test_two_runs_from_one_policy_share_no_state():
    policy = CachePolicy(
        proxy="latent", mode="motion_detail", tau=0.1, warmup_steps=1, chunk_wise_steps=2, final_full_steps=1)
    before = repr(policy)
    first, second = random_run(policy, 9), random_run(policy, 9)
    key = lambda d: (d.chunk_id, d.step, d.phase, d.action, d.n_active)  # noqa: E731
    assert [key(d) for d in first] == [key(d) for d in second]
    assert repr(policy) == before and policy.__dict__.keys() == CachePolicy().__dict__.keys()


# ----------------------------------------------------------------------------------------------------
# TeaCache: one decision for the whole window.


def test_teacache_makes_one_decision_for_the_window():
    # Chunk 0 changes by 10% a step and chunk 1 by 30%; the window's change is Σ|Δf| / Σ|f|:
    # k1 (.1 + .3) / 2 = .2 skip; k2 (.11 + .39) / 2.4 = .208, acc .408 skip; k3 .217, acc .625 compute.
    # Chunk 2 enters at k2 (warm-up, computed) and joins the window decision from k3 on.
    policy = CachePolicy(proxy="latent", mode="teacache", tau=0.5, warmup_steps=1, final_full_steps=0)
    state = policy.new_state(num_steps=10, chunk_shape=SHAPE)
    f0, f1, f2 = features([0.1] * 5), features([0.3] * 5), features([0.2] * 5)
    actions = []
    for k in range(5):
        steps = [ChunkStep(0, k, f0[k]), ChunkStep(1, k, f1[k])]
        if k >= 2:
            steps.append(ChunkStep(2, k - 2, f2[k - 2]))
        decisions = state.decide(steps)
        for d in decisions:
            state.velocity(d, torch.zeros(SHAPE), 0.1)
        actions.append([(d.chunk_id, d.phase, d.action) for d in decisions])
    assert actions == [
        [(0, "warmup", "dense"), (1, "warmup", "dense")],
        [(0, "window", "skip"), (1, "window", "skip")],
        [(0, "window", "skip"), (1, "window", "skip"), (2, "warmup", "dense")],
        [(0, "window", "dense"), (1, "window", "dense"), (2, "window", "dense")],
        [(0, "window", "skip"), (1, "window", "skip"), (2, "window", "skip")],
    ]


# ----------------------------------------------------------------------------------------------------
# Weights inside the state: the same functions as the public API, on the chosen proxy.


@pytest.mark.parametrize("proxy", ["latent", "denoised"])
@pytest.mark.parametrize("combine", ["max", "product", "blend"])
def test_observed_weights_match_the_public_functions(proxy, combine):
    g = torch.Generator().manual_seed(2)
    shape = (4, 3, 6, 10)
    policy = CachePolicy(
        mode="motion_detail", proxy=proxy, weight_combine_mode=combine, warmup_steps=1, chunk_wise_steps=0,
        motion_floor=0.3, motion_power=2.0, detail_alpha=0.2, detail_window_size=5, detail_lambda=0.25,
    )
    state = policy.new_state(num_steps=5, chunk_shape=shape)
    x, v, prev = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(4, 6, 10, generator=g)
    (d,) = state.decide([ChunkStep(0, 0, x)])
    state.velocity(d, v, 0.1)
    state.observe([(0, 0, x, v, 0.25)], prev)
    signal = x if proxy == "latent" else x + 0.75 * v
    expected = combine_weights(
        motion_weights(signal, prev, floor=0.3, power=2.0), detail_weights(signal, window=5, floor=0.2), combine, 0.25
    )
    torch.testing.assert_close(state._chunks[0].weights, expected.reshape(-1))


def test_weights_are_only_computed_when_the_next_step_reads_them():
    policy = CachePolicy(proxy="latent", mode="motion", warmup_steps=3, chunk_wise_steps=0, final_full_steps=0)
    state = policy.new_state(num_steps=6, chunk_shape=SHAPE)
    for k in range(3):
        (d,) = state.decide([ChunkStep(0, k, torch.ones(2) * (k + 1))])
        state.velocity(d, torch.zeros(SHAPE), 0.1)
        state.observe([(0, k, LATENT)])
        assert (state._chunks[0].weights is None) == (k < 2)


# ----------------------------------------------------------------------------------------------------
# Host syncs: at most one per decide() for the whole window, none in velocity() or observe().

SYNC_FUNCS = {
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.masked_select, torch.Tensor.masked_select, torch.unique, torch.Tensor.any, torch.Tensor.all,
}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_FUNCS:
            self.count += 1
        if func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            self.count += 1  # boolean-mask indexing has a data-dependent shape
        return func(*args, **kwargs)


def test_sync_counter_sees_syncs():
    with SyncCounter() as counter:
        torch.ones(3).sum().item()
        torch.ones(3)[torch.ones(3, dtype=torch.bool)]
    assert counter.count == 2


@pytest.mark.parametrize("mode", MODES_WITH_REUSE)
def test_at_most_one_host_sync_per_window_step(mode):
    policy = CachePolicy(mode=mode, tau=0.1, warmup_steps=1, chunk_wise_steps=2, final_full_steps=1, max_reuse=3,
                         min_active_ratio=0.1, proxy="denoised")
    g = torch.Generator().manual_seed(1)
    shape = (4, 2, 6, 8)
    state = policy.new_state(num_steps=10, chunk_shape=shape)
    latents = [torch.randn(shape, generator=g) for _ in range(2)]
    for k in range(10):
        window = [ChunkStep(c, k, latents[c] + 0.01 * k * torch.randn(shape, generator=g)) for c in range(2)]
        with SyncCounter() as counter:
            decisions = state.decide(window)
        assert counter.count <= 1
        observed = []
        with SyncCounter() as counter:
            for d in decisions:
                v = state.velocity(d, torch.randn(shape, generator=g), 0.1)
                latents[d.chunk_id] = latents[d.chunk_id] + 0.1 * v
                observed.append((d.chunk_id, k, latents[d.chunk_id], v, 0.1 * (k + 1)))
            state.observe(observed)
        assert counter.count == 0


# ----------------------------------------------------------------------------------------------------
# Misuse gets clear errors.


def test_non_finite_feature_is_reported():
    policy = token_policy(mode="flowcache")
    state = policy.new_state(num_steps=4, chunk_shape=SHAPE)
    (d,) = state.decide([ChunkStep(3, 0, torch.ones(4))])
    state.velocity(d, torch.zeros(SHAPE), 0.1)
    with pytest.raises(ValueError, match=r"non-finite values .* chunk\(s\) \[3\]"):
        state.decide([ChunkStep(3, 1, torch.tensor([1.0, float("nan"), 1.0, 1.0]))])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_steps=0, chunk_shape=SHAPE), "num_steps must be a positive integer"),
        (dict(num_steps=4, chunk_shape=(1, 2, 2)), "chunk_shape must be \\(C, T, H, W\\)"),
        (dict(num_steps=4, chunk_shape=(1, 2, 3, 6)), "multiples of patch=\\(2, 2\\)"),
        (dict(num_steps=4, chunk_shape=SHAPE, patch=(2,)), "patch must be a pair"),
    ],
)
def test_state_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CachePolicy().new_state(**kwargs)


def test_detail_window_larger_than_the_frame_is_refused_before_sampling():
    with pytest.raises(ValueError, match="detail_window_size=5 is larger than the latent frame \\(2x6\\)"):
        CachePolicy(detail_window_size=5).new_state(num_steps=4, chunk_shape=SHAPE)
    CachePolicy(mode="motion", detail_window_size=5).new_state(num_steps=4, chunk_shape=SHAPE)  # unused: fine


def test_protocol_errors():
    state = token_policy().new_state(num_steps=4, chunk_shape=SHAPE)
    with pytest.raises(ValueError, match="needs a change feature"):
        state.decide([ChunkStep(0, 0)])
    state = token_policy().new_state(num_steps=4, chunk_shape=SHAPE)
    (d,) = state.decide([ChunkStep(0, 0, torch.ones(4))])
    with pytest.raises(RuntimeError, match="velocity\\(\\) was not called"):
        state.decide([ChunkStep(0, 1, torch.ones(4))])
    with pytest.raises(ValueError, match="velocity shape .* does not match chunk_shape"):
        state.velocity(d, torch.zeros(1, 2, 2, 4), 0.1)
    state.velocity(d, torch.zeros(SHAPE), 0.1)
    with pytest.raises(ValueError, match="feature shape changed between steps"):
        state.decide([ChunkStep(0, 1, torch.ones(5))])
    with pytest.raises(RuntimeError, match="observe\\(\\) for chunk 7, which decide\\(\\) has not seen"):
        state.observe([(7, 0, LATENT)])
    with pytest.raises(ValueError, match="a chunk appears twice"):
        state.decide([ChunkStep(1, 0, torch.ones(4)), ChunkStep(1, 0, torch.ones(4))])
    state = token_policy(proxy="denoised").new_state(num_steps=4, chunk_shape=SHAPE)
    state.velocity(state.decide([ChunkStep(0, 0, torch.ones(4))])[0], torch.zeros(SHAPE), 0.1)
    with pytest.raises(ValueError, match='proxy="denoised" needs the velocity'):
        state.observe([(0, 0, LATENT)])


def test_a_rejected_call_leaves_the_state_unchanged():
    # Chunk 0 is fine, chunk 1 has no feature: nothing may change, so the corrected call behaves as if
    # the bad one never happened.
    policy = token_policy(mode="flowcache", tau=0.25)
    reference, state = policy.new_state(num_steps=4, chunk_shape=SHAPE), policy.new_state(num_steps=4, chunk_shape=SHAPE)
    feats = features([0.1] * 3)
    for s in (reference, state):
        s.velocity(s.decide([ChunkStep(0, 0, feats[0])])[0], torch.zeros(SHAPE), 0.1)
    with pytest.raises(ValueError, match="needs a change feature"):
        state.decide([ChunkStep(0, 1, feats[1]), ChunkStep(1, 0)])
    (d,) = state.decide([ChunkStep(0, 1, feats[1])])
    with pytest.raises(ValueError, match="dt must be > 0"):
        state.velocity(d, None, 0.0)
    state.velocity(d, None, 0.1)
    (r,) = reference.decide([ChunkStep(0, 1, feats[1])])
    reference.velocity(r, None, 0.1)
    assert (d.phase, d.action) == (r.phase, r.action) == ("chunk", "skip")
    torch.testing.assert_close(state._chunks[0].chunk_acc, reference._chunks[0].chunk_acc)


def test_plain_tuples_drive_a_state_like_chunk_steps():
    """A sampler that does not import cache_core passes (chunk_id, step, feature) tuples."""
    policy = CachePolicy(proxy="latent", mode="flowcache", tau=0.5, warmup_steps=1)
    feats = features([0.1, 0.1, 0.9])
    shape = tuple(LATENT.shape)
    with_steps, with_tuples = (policy.new_state(num_steps=6, chunk_shape=shape) for _ in range(2))
    actions = []
    for k in range(4):
        (a,) = with_steps.decide([ChunkStep(0, k, feats[k])])
        (b,) = with_tuples.decide([(0, k, feats[k])])
        assert (a.action, a.phase) == (b.action, b.phase)
        for state, d in ((with_steps, a), (with_tuples, b)):
            state.velocity(d, None if d.action == "skip" else torch.ones(shape), 0.1)
        actions.append(b.action)
    assert actions == ["dense", "skip", "skip", "dense"]


@pytest.mark.parametrize("proxy", ["latent", "denoised"])
@pytest.mark.parametrize("mode", ["motion", "motion_detail"])
def test_observing_a_window_at_once_equals_chunk_by_chunk(proxy, mode):
    policy = CachePolicy(mode=mode, proxy=proxy, warmup_steps=0, chunk_wise_steps=0, final_full_steps=0)
    g = torch.Generator().manual_seed(7)
    shape = (4, 3, 6, 8)
    latents = [torch.randn(shape, generator=g) for _ in range(3)]
    velocities = [torch.randn(shape, generator=g) for _ in range(3)]
    prev = torch.randn(shape[0], *shape[2:], generator=g)
    states = [policy.new_state(num_steps=8, chunk_shape=shape) for _ in range(2)]
    for state in states:
        state.decide([ChunkStep(c, c - 3, torch.ones(2)) for c in (3, 4, 5)])
    one, window = states
    proxies = [x if proxy == "latent" else x + 0.6 * v for x, v in zip(latents, velocities)]
    for i, c in enumerate((3, 4, 5)):
        one.observe([(c, c - 3, latents[i], velocities[i], 0.4)], prev if i == 0 else proxies[i - 1][:, -1])
    window.observe([(c, c - 3, latents[i], velocities[i], 0.4) for i, c in enumerate((3, 4, 5))], prev)
    for c in (3, 4, 5):
        a, b = one._chunks[c], window._chunks[c]
        assert a.weights is not None and torch.allclose(a.weights, b.weights, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="consecutive"):
        window.observe([(3, 0, latents[0], None, None), (5, 2, latents[2], None, None)])
