"""The hybrid policy (chunk-level and token-level rules at every step) and extrapolated reuse velocities."""

import pytest
import torch

from cache_core import CachePolicy, ChunkStep

# One chunk of 2 latent frames of 2x6 latent pixels, patch 2x2: 6 tokens whose motion weights on
# this latent are [1, 1, 1, 0.6, 0.8, 1] (frame 1 changes by 0, 0.5 and 1 in its three tokens).
SHAPE = (1, 2, 2, 6)
LATENT = torch.zeros(SHAPE)
LATENT[0, 1, :, 2:4] = 0.5
LATENT[0, 1, :, 4:6] = 1.0


def features(deltas, size=8):
    """Features whose relative L1 change at step k is deltas[k - 1]."""
    out = [torch.ones(size)]
    for d in deltas:
        out.append(out[-1] * (1.0 + d))
    return out


def hybrid(**changes):
    """Hybrid on the latent; a 1x1 detail window leaves every detail weight 1, so the product combine
    gives the motion weights above."""
    base = dict(mode="hybrid", proxy="latent", tau=0.25, chunk_tau=0.25, warmup_steps=1, chunk_wise_steps=0,
                final_full_steps=0, detail_window_size=1, weight_combine_mode="product")
    return CachePolicy(**{**base, **changes})


def scripted(policy, num_steps, deltas):
    state = policy.new_state(num_steps=num_steps, chunk_shape=SHAPE)
    feats, out = features(deltas), []
    for k in range(num_steps):
        (d,) = state.decide([ChunkStep(0, k, feats[k], k / num_steps)])
        state.velocity(d, torch.full(SHAPE, float(k)), 0.1)
        state.observe([(0, k, LATENT)])
        out.append((d.phase, d.action, d.active.tolist() if d.action == "sparse" else d.n_active))
    return out


def test_hybrid_reuses_the_whole_chunk_until_its_change_reaches_chunk_tau_then_computes_the_tokens_due():
    # Chunk Δ 0.1 a step: the chunk accumulator reaches 0.25 at k3 (0.3); then tokens with W·0.3 >= 0.25
    # (0, 1, 2, 5) are computed, and the chunk accumulator restarts while tokens 3 and 4 keep theirs
    # (0.18, 0.24), so at k6 every token is due (0.36, 0.48 and 0.3).
    assert scripted(hybrid(), 7, [0.1] * 6) == [
        ("warmup", "dense", 6),
        ("hybrid", "skip", 0),
        ("hybrid", "skip", 0),
        ("hybrid", "sparse", [0, 1, 2, 5]),
        ("hybrid", "skip", 0),
        ("hybrid", "skip", 0),
        ("hybrid", "dense", 6),
    ]


def test_hybrid_whole_chunk_reuse_yields_to_the_reuse_cap():
    # With max_reuse 2 every token is forced at k3 although the chunk's change (0.03) is far below chunk_tau.
    assert scripted(hybrid(tau=10.0, max_reuse=2), 4, [0.01] * 3) == [
        ("warmup", "dense", 6), ("hybrid", "skip", 0), ("hybrid", "skip", 0), ("hybrid", "dense", 6)]


def test_hybrid_token_rule_alone_when_the_chunk_is_never_reused_whole():
    # chunk_tau below every change: never a whole-chunk reuse, and the token rule alone decides.
    assert scripted(hybrid(chunk_tau=0.05), 5, [0.1] * 4) == [
        ("warmup", "dense", 6),
        ("hybrid", "skip", 0),  # W·0.1 < 0.25 everywhere: nothing is due
        ("hybrid", "skip", 0),
        ("hybrid", "sparse", [0, 1, 2, 5]),
        ("hybrid", "sparse", [4]),  # 0.24 + 0.08; the chunk-level rule would have reused it whole
    ]


def drive(policy, seed, *, chunks=3, num_steps=12, shape=(4, 2, 6, 8), velocity_of=None, power=1):
    """Staggered chunks with random features and latents, step k at time (k / num_steps) ** power (growing
    steps for power > 1, as the real schedule's); returns every decision and returned velocity."""
    g = torch.Generator().manual_seed(seed)
    state = policy.new_state(num_steps=num_steps, chunk_shape=shape)
    latents = {c: torch.randn(shape, generator=g) for c in range(chunks)}
    out = []
    for global_step in range(num_steps + 4 * (chunks - 1)):
        window = [(c, global_step - 4 * c) for c in range(chunks) if 0 <= global_step - 4 * c < num_steps]
        feats = {c: torch.randn(shape, generator=g) * 0.02 + latents[c] for c, _ in window}
        decisions = state.decide([ChunkStep(c, k, feats[c], (k / num_steps) ** power) for c, k in window])
        observed = []
        for d in decisions:
            t = (d.step / num_steps) ** power
            fresh = torch.randn(shape, generator=g) if velocity_of is None else velocity_of(d.chunk_id, t)
            v = state.velocity(d, fresh if d.action != "skip" else None, 1.0 / num_steps)
            latents[d.chunk_id] = latents[d.chunk_id] + v / num_steps
            observed.append((d.chunk_id, d.step, latents[d.chunk_id], v, ((d.step + 1) / num_steps) ** power))
            out.append((d, fresh, v.clone(), t))
        state.observe(observed)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hybrid_without_chunk_reuse_decides_exactly_as_motion_detail(seed):
    common = dict(tau=0.2, proxy="denoised", warmup_steps=2, chunk_wise_steps=0, final_full_steps=1, max_reuse=3)
    token = drive(CachePolicy(mode="motion_detail", **common), seed)
    both = drive(CachePolicy(mode="hybrid", chunk_tau=0.0, **common), seed)
    assert [d.phase for d, *_ in both].count("hybrid") > 0
    assert sum(d.action == "sparse" for d, *_ in token) > 0  # the comparison covers sparse steps
    for (a, _, va, _), (b, _, vb, _) in zip(token, both):
        assert (a.action, a.n_active) == (b.action, b.n_active)
        assert (a.active is None) == (b.active is None) and (a.active is None or torch.equal(a.active, b.active))
        assert torch.equal(va, vb)


def token_pixels(d, shape, patch=(2, 2)):
    """``(token, its pixels, whether computed)`` of every token of a decision on chunks of ``shape``."""
    _, _, H, W = shape
    gh, gw = H // patch[0], W // patch[1]
    active = d.active.tolist() if d.action == "sparse" else None
    for token in range(d.n_tokens):
        f, rest = divmod(token, gh * gw)
        i, j = divmod(rest, gw)
        pixels = (slice(None), f, slice(i * patch[0], (i + 1) * patch[0]), slice(j * patch[1], (j + 1) * patch[1]))
        yield token, pixels, d.action == "dense" or (active is not None and token in active)


def reference_velocities(run, extrapolation, patch=(2, 2)):
    """Per token, by hand: fresh where computed, else v1 + e·(v1 − v0)·min((t − t1)/(t1 − t0), 1) from
    its last two computed velocities (v1 alone after a single computation). Also returns how many
    reused tokens had their extrapolation capped at one span."""
    history = {}  # (chunk, token) -> [(t, velocity of its pixels), ...]
    expected, capped = [], 0
    for d, fresh, _, t in run:
        v = torch.empty(run[0][1].shape)
        for token, pixels, computed in token_pixels(d, run[0][1].shape, patch):
            past = history.setdefault((d.chunk_id, token), [])
            if computed:
                past.append((t, fresh[pixels].clone()))
                v[pixels] = fresh[pixels]
            elif len(past) == 1:
                v[pixels] = past[-1][1]
            else:
                (t0, v0), (t1, v1) = past[-2], past[-1]
                factor = (t - t1) / (t1 - t0)
                capped += factor > 1
                v[pixels] = v1 + extrapolation * (v1 - v0) * min(factor, 1.0)
        expected.append(v)
    return expected, capped


@pytest.mark.parametrize("mode,extrapolation,seed", [("motion_detail", 1.0, 0), ("hybrid", 0.5, 1),
                                                     ("flowcache", 1.0, 2), ("teacache", 0.3, 3)])
def test_extrapolated_velocities_match_a_per_token_reference(mode, extrapolation, seed):
    policy = CachePolicy(mode=mode, tau=0.2, chunk_tau=0.3, warmup_steps=1, chunk_wise_steps=1, final_full_steps=1,
                         proxy="denoised", velocity_extrapolation=extrapolation)
    run = drive(policy, seed, power=2)
    actions = {d.action for d, *_ in run}
    assert "skip" in actions and (mode in ("flowcache", "teacache") or "sparse" in actions)
    expected, capped = reference_velocities(run, extrapolation)
    assert capped > 0  # the one-span cap is exercised
    for (_, _, got, _), want in zip(run, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_full_extrapolation_is_exact_for_velocities_linear_in_time():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, 2, 6, 8, generator=g), torch.randn(3, 4, 2, 6, 8, generator=g)
    # max_reuse 1: a reused token is never more than one span (of its last two computes) past its last one
    policy = CachePolicy(mode="hybrid", tau=0.2, chunk_tau=0.2, warmup_steps=2, chunk_wise_steps=0,
                         final_full_steps=0, proxy="denoised", velocity_extrapolation=1.0, max_reuse=1)
    run = drive(policy, 5, velocity_of=lambda chunk, t: a[chunk] + b[chunk] * t)
    assert sum(d.action != "dense" for d, *_ in run) > 8
    for d, _, got, t in run:  # every token is computed twice in warm-up: its line is known from then on
        torch.testing.assert_close(got, a[d.chunk_id] + b[d.chunk_id] * t, rtol=1e-5, atol=1e-5)
    held = drive(policy.replace(velocity_extrapolation=0.0), 5, velocity_of=lambda chunk, t: a[chunk] + b[chunk] * t)
    assert any(not torch.allclose(v, a[d.chunk_id] + b[d.chunk_id] * t) for d, _, v, t in held)


def test_extrapolation_needs_times_and_rescaled_reuse():
    state = CachePolicy(mode="motion", velocity_extrapolation=1.0).new_state(num_steps=4, chunk_shape=SHAPE)
    with pytest.raises(ValueError, match="velocity_extrapolation needs each chunk's time t"):
        state.decide([ChunkStep(0, 0, torch.ones(3))])
    with pytest.raises(ValueError, match="velocity_extrapolation needs rescale_reused_velocity=True"):
        CachePolicy(velocity_extrapolation=0.5, rescale_reused_velocity=False)
    with pytest.raises(ValueError, match="velocity_extrapolation must be a finite number in \\[0, 1\\]"):
        CachePolicy(velocity_extrapolation=1.5)


def test_a_tau_ramp_reuses_less_early_and_more_late():
    policy = hybrid(chunk_tau=0.0, tau_ramp=0.5)
    assert [policy.token_threshold(k, 5) for k in range(5)] == pytest.approx([0.125, 0.1875, 0.25, 0.3125, 0.375])
    # thresholds 0.1875, 0.25, 0.3125, 0.375 at k1..k4 against W·0.1k: the first tokens are due at k4
    # (0.4), where a constant 0.25 computes them at k3 and token 4 at k4 (0.32)
    assert scripted(policy, 5, [0.1] * 4) == [
        ("warmup", "dense", 6), ("hybrid", "skip", 0), ("hybrid", "skip", 0), ("hybrid", "skip", 0),
        ("hybrid", "sparse", [0, 1, 2, 5])]


def test_neighbours_of_the_tokens_due_are_computed_with_them():
    # At k3 tokens 0, 1, 2 (frame 0) and 5 (frame 1, right) are due; token 4 is 5's neighbour, token 3 is not.
    assert scripted(hybrid(chunk_tau=0.0, refresh_neighbours=True), 5, [0.1] * 4) == [
        ("warmup", "dense", 6), ("hybrid", "skip", 0), ("hybrid", "skip", 0), ("hybrid", "sparse", [0, 1, 2, 4, 5]),
        ("hybrid", "skip", 0)]  # token 4 restarted with 5; token 3 is at 0.24


@pytest.mark.parametrize("seed", [0, 1])
def test_the_budget_caps_the_tokens_computed_and_keeps_the_largest_accumulators(seed):
    policy = CachePolicy(mode="motion_detail", tau=0.2, warmup_steps=1, chunk_wise_steps=0, final_full_steps=0,
                         proxy="denoised", max_active_ratio=0.25)
    run = drive(policy, seed)
    budget = int(0.25 * run[0][0].n_tokens)
    token = [d for d, *_ in run if d.phase == "token"]
    assert all(d.n_active <= budget for d in token)
    assert sum(d.n_active == budget for d in token) >= 3  # the budget binds
    unbounded = [d for d, *_ in drive(policy.replace(max_active_ratio=None), seed) if d.phase == "token"]
    assert max(d.n_active for d in unbounded) > budget


def test_the_budget_keeps_the_largest_accumulators_among_the_tokens_due():
    from cache_core import planning
    from cache_core.velocity_reuse import ChunkMemory

    mem = ChunkMemory(token_acc=torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.0]),
                      token_reuses=torch.zeros(6, dtype=torch.int32), weights=torch.ones(6))
    one = torch.tensor(0.1)
    plan = planning.Plan(ChunkStep(0, 3), mem, "token", planning.Delta(one, one, torch.tensor(1.0)), tau=0.35)
    policy = CachePolicy(mode="motion", max_active_ratio=0.5)
    sync = planning.HostSync()
    planning.queue_token(policy, plan, sync, (1, 2, 3))
    # accumulators 0.6, 0.2, 1.0, 0.4, 0.8, 0.1: due 0, 2, 3, 4; the budget of 3 keeps 2, 4 and 0
    assert plan.active_mask.tolist() == [True, False, True, False, True, False]
    assert sync.read()[:2] == [3.0, 0.0]


def quadratic_reference(run, extrapolation, patch=(2, 2)):
    """Per token, by hand (numpy-free Lagrange form, independent of the Newton form the code uses): fresh
    where computed; after three computes the quadratic through them at t1 + min(t − t1, t1 − t0) (t1 the
    last compute, t0 the one before), scaled by e from the last velocity; after two, the line; after one,
    the last velocity."""
    history, expected, second_order = {}, [], 0
    for d, fresh, _, t in run:
        v = torch.empty(run[0][1].shape, dtype=torch.float64)
        for token, pixels, computed in token_pixels(d, run[0][1].shape, patch):
            past = history.setdefault((d.chunk_id, token), [])
            if computed:
                past.append((t, fresh[pixels].double().clone()))
                v[pixels] = fresh[pixels].double()
                continue
            if len(past) == 1:
                v[pixels] = past[-1][1]
                continue
            (ta, va), (tb, vb) = past[-2], past[-1]
            at = tb + min(t - tb, tb - ta)
            if len(past) == 2:
                v[pixels] = vb + extrapolation * (vb - va) * (at - tb) / (tb - ta)
                continue
            (tz, vz) = past[-3]
            second_order += 1
            lagrange = (vz * (at - ta) * (at - tb) / ((tz - ta) * (tz - tb))
                        + va * (at - tz) * (at - tb) / ((ta - tz) * (ta - tb))
                        + vb * (at - tz) * (at - ta) / ((tb - tz) * (tb - ta)))
            v[pixels] = vb + extrapolation * (lagrange - vb)
        expected.append(v)
    return expected, second_order


@pytest.mark.parametrize("mode,extrapolation,seed", [("hybrid", 1.0, 0), ("motion_detail", 0.5, 1), ("flowcache", 1.0, 2)])
def test_second_order_extrapolation_matches_the_quadratic_through_three_computes(mode, extrapolation, seed):
    policy = CachePolicy(mode=mode, tau=0.2, chunk_tau=0.3, warmup_steps=3, chunk_wise_steps=1, final_full_steps=1,
                         proxy="denoised", velocity_extrapolation=extrapolation, extrapolation_order=2)
    run = drive(policy, seed, power=2)
    expected, second_order = quadratic_reference(run, extrapolation)
    assert second_order > 0 and any(d.action != "dense" for d, *_ in run)
    for (_, _, got, _), want in zip(run, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_second_order_extrapolation_is_exact_for_velocities_quadratic_in_time():
    g = torch.Generator().manual_seed(6)
    a, b, c = (torch.randn(3, 4, 2, 6, 8, generator=g) for _ in range(3))
    policy = CachePolicy(mode="flowcache", tau=0.2, warmup_steps=3, chunk_wise_steps=12, final_full_steps=0,
                         proxy="denoised", velocity_extrapolation=1.0, extrapolation_order=2, max_reuse=1)
    truth = lambda chunk, t: a[chunk] + b[chunk] * t + c[chunk] * t * t  # noqa: E731
    run = drive(policy, 6, velocity_of=truth)
    assert sum(d.action == "skip" for d, *_ in run) > 4
    for d, _, got, t in run:
        torch.testing.assert_close(got, truth(d.chunk_id, t), rtol=1e-4, atol=1e-4)
    first = drive(policy.replace(extrapolation_order=1), 6, velocity_of=truth)
    assert any(not torch.allclose(v, truth(d.chunk_id, t), atol=1e-4) for d, _, v, t in first)
    with pytest.raises(ValueError, match="extrapolation_order must be one of"):
        CachePolicy(extrapolation_order=3)
