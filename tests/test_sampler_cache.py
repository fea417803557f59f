"""The sampler with the cache policies: exact invariants, what is computed, statistics, run isolation,
interrupts and bad input. Runs on the tiny models of the official pipeline fixtures."""

import gc
import json
import os
import weakref

import pytest
import torch

import cache_core.state as cache_state
from cache_core import CachePolicy
from cache_core import Decision
from magi1 import KVCache, distill_dt, flops
from magi1.sampling.caption_rows import CaptionRows
from magi1 import Guidance, VideoLayout
from magi1.sampling.sampler import SamplingInterrupted
from run_request import generate
from magi1.sampling.schedule import CLEAN_T, step_intervals, time_grid, total_forward_steps, window_step
from pipeline_fixtures import FIXTURES, load, relative_error, request

MODES = ["teacache", "flowcache", "motion", "motion_detail"]


def policy(mode, tau, **kw):
    """Phases sized for the fixtures' 8 and 12 steps."""
    return CachePolicy(**{"mode": mode, "tau": tau, "warmup_steps": 1, "chunk_wise_steps": 2,
                          "final_full_steps": 1, **kw})


@pytest.fixture(scope="module")
def runs():
    """config -> (model, generate() arguments, latent without cache)."""
    out = {}
    for config in ("base", "base_i2v", "distill24", "distill45"):
        description, tensors, model = load(config)
        args = request(description, tensors)
        out[config] = (model, args, generate(model, **args).latent)
    return out


def layout_of(args):
    prefix = args["prefix"]
    return VideoLayout.plan(args["frames"], args["height"], args["width"], chunk_width=args["chunk_width"],
                            prefix_frames=0 if prefix is None else prefix.shape[1])


# ------------------------------------------------------------------------------------------ invariants
def plain_loop(model, caption, caption_mask, noise, *, steps, window_size, chunk_width):
    """The released text-to-video loop written out directly, with none of the cache machinery."""
    cw = chunk_width
    _, frames, height, width = noise.shape
    chunk_num, ct = frames // cw, cw * (height // 2) * (width // 2)
    grid = time_grid(steps)
    null = model.y_embedder.null_caption_embedding.detach().float()
    null_mask = torch.arange(null.shape[0]) < 50
    cache = KVCache.for_model(model, chunk_num * ct)
    x = noise.clone()
    for step in range(total_forward_steps(chunk_num, steps, window_size)):
        plan = window_step(step, chunk_num=chunk_num, num_steps=steps, window_size=window_size)
        r, sp = int(plan.refresh_clean), plan.slice_point
        noisy = list(range(plan.start, plan.end))
        n, m = len(noisy), r + len(noisy)
        xc = x[:, sp * cw: plan.end * cw].clone()
        tn = [float(grid[s]) for s in plan.steps]
        t = torch.tensor([[CLEAN_T] * r + tn])
        kv = [(a * ct, b * ct) for a, b in plan.kv_ranges]

        def captions(prompt, chunks):
            caps = [null] * r + [caption[c] if prompt else null for c in chunks]
            masks = [null_mask] * r + [caption_mask[c].bool() if prompt else null_mask for c in chunks]
            return torch.stack(caps)[None], torch.stack(masks)[None]

        if model.distill:
            dt_embed = distill_dt(steps, step_intervals(steps)[plan.stage_index])
            cap, mask = captions(True, noisy)
            X, kvr = xc[None], list(kv)
            near_clean = tn[0] > 0.3
            if near_clean:
                X = torch.cat([xc, xc[:, r * cw:(r + 1) * cw]], dim=1)[None]
                t = torch.cat([t, t[:, r:r + 1]], dim=1)
                cap, mask = torch.cat([cap, cap[:, r:r + 1]], 1), torch.cat([mask, mask[:, r:r + 1]], 1)
                kvr.append(((sp + m) * ct, (sp + m + 1) * ct))
            out = model(X, t, cap, mask, kvr, slice_point=sp, distill_dt=dt_embed, kv_cache=cache,
                        kv_write_chunks=m)[0]
            v = [out[:, (r + j) * cw:(r + j + 1) * cw] for j in range(n)]
            if near_clean:
                v[0] = v[0] * 0.7 + out[:, m * cw:] * (1 - 0.7)
        else:
            cond = model(xc[None], t, *captions(True, noisy), kv, slice_point=sp, kv_cache=cache)[0, :, r * cw:]
            pre = model(xc[None], t, *captions(False, noisy), kv, slice_point=sp, unconditional=True, kv_cache=cache,
                        kv_write_chunks=m)[0, :, r * cw:]
            xu = torch.stack([xc[:, (r + j) * cw:(r + j + 1) * cw] for j in range(n)])
            caps = torch.stack([null] * n)[:, None]
            masks = torch.stack([null_mask] * n)[:, None]
            u = model(xu, torch.tensor(tn)[:, None], caps, masks, [(0, ct)], unconditional=True)
            v = []
            for j, tj in enumerate(tn):
                index = sum(edge - 1e-7 < tj for edge in (0.0, 0.0217, 0.1, 0.3, 0.999)) - 1
                p, s = (1.5, 1.5, 1.5, 1.0, 1.0)[index], (7.5, 7.5, 7.5, 0.0, 0.0)[index]
                f = slice(j * cw, (j + 1) * cw)
                v.append((1 - p) * u[j] + (p - s) * pre[:, f] + s * cond[:, f])
        for j, s in enumerate(plan.steps):
            dt = grid[s + 1] - grid[s]
            f = slice((plan.start + j) * cw, (plan.start + j + 1) * cw)
            x[:, f] = xc[:, (r + j) * cw:(r + j + 1) * cw] + v[j] * dt
    return x


@pytest.mark.parametrize("config", ["base", "distill45"])
def test_off_is_bit_identical_to_the_plain_loop(runs, config):
    model, args, latent = runs[config]
    reference = plain_loop(model, args["caption"], args["caption_mask"], args["noise"], steps=args["steps"],
                           window_size=args["window_size"], chunk_width=args["chunk_width"])
    assert torch.equal(reference, latent)
    assert torch.equal(generate(model, **args, policy=CachePolicy(mode="off")).latent, latent)


@pytest.mark.parametrize("config", ["base", "base_i2v", "distill24", "distill45"])
@pytest.mark.parametrize("mode", MODES)
def test_tau_zero_equals_off(runs, config, mode):
    model, args, latent = runs[config]
    result = generate(model, **args, policy=policy(mode, 0.0))
    assert relative_error(result.latent, latent) <= 1e-6
    assert all(r.action == "dense" for r in result.stats.records)


def test_a_threshold_changes_the_result_and_saves_work(runs):
    model, args, latent = runs["distill45"]
    result = generate(model, **args, policy=policy("motion_detail", 0.05))
    assert 0 < relative_error(result.latent, latent) < 0.5
    assert result.stats.computed_fraction < 0.9 and result.stats.flop_ratio > 1.1


@pytest.fixture
def all_active_sparse(monkeypatch):
    """Every dense decision of a chunk with a cached velocity lists every token, so the DiT takes its sparse path."""
    original = cache_state.CacheState.decide
    converted = []

    def decide(self, chunk_steps):
        out = []
        for d in original(self, chunk_steps):
            memory = self._chunks[d.chunk_id]
            if d.action == "dense" and memory.velocity is not None:
                n = d.n_tokens
                d = Decision(d.chunk_id, d.step, d.phase, n, n, torch.arange(n))  # the sparse path, all tokens
                memory.pending = d
                converted.append(d)
            out.append(d)
        return out

    monkeypatch.setattr(cache_state.CacheState, "decide", decide)
    return converted


@pytest.mark.parametrize("config", ["base", "base_i2v", "distill24", "distill45"])
def test_sparse_with_every_token_active_equals_dense(runs, config, all_active_sparse):
    """Each chunk of a sparse call keeps its own key range and each guidance stream its own cache."""
    model, args, latent = runs[config]
    result = generate(model, **args, policy=policy("motion_detail", 0.0))
    layout = layout_of(args)
    generated = layout.chunk_num - layout.chunk_offset
    assert len(all_active_sparse) == generated * (args["steps"] - 1)  # all but each chunk's first step
    assert relative_error(result.latent, latent) <= 1e-6


# ------------------------------------------------------------------------------------------ what is computed
class ForwardLog:
    def __init__(self, model, monkeypatch):
        self.calls = []
        original = model.forward

        def forward(x, t, *a, **kw):
            self.calls.append(dict(N=x.shape[0], t=t[0].tolist(), slice_point=kw["slice_point"],
                                   active=kw.get("active"), kv_cache=kw.get("kv_cache"),
                                   unconditional=kw.get("unconditional"), write=kw.get("kv_write_chunks")))
            return original(x, t, *a, **kw)

        monkeypatch.setattr(model, "forward", forward)


@pytest.mark.parametrize("mode", MODES)
def test_dit_calls_follow_the_decisions(runs, monkeypatch, mode):
    """The tokens each call computes are exactly the decided ones: dense chunks take the dense path,
    reused chunks are not forwarded, an all-reused window makes no call, and a clean chunk entering
    the KV cache is always computed whole."""
    model, args, _ = runs["distill45"]
    log = ForwardLog(model, monkeypatch)
    stats = generate(model, **args, policy=policy(mode, 0.2 if mode.startswith("motion") else 0.05)).stats
    assert stats.action_counts()["skip"] > 0
    layout = layout_of(args)
    by_step = {}
    for r in stats.records:
        by_step.setdefault(r.step, []).append(r)
    calls = iter(log.calls)
    copy_owner, partial_copies, whole_copies = None, 0, 0
    for step in range(len(by_step)):
        plan = window_step(step, chunk_num=layout.chunk_num, num_steps=args["steps"], window_size=args["window_size"])
        records = by_step[step]
        if all(r.action == "skip" for r in records) and not plan.refresh_clean:
            continue  # no call at all for this step
        call = next(calls)
        assert call["t"][int(plan.refresh_clean)] == records[0].t
        entries = call["active"] or [None] * len(call["t"])
        if plan.refresh_clean:
            assert entries[0] is None  # the clean chunk is re-encoded whole
            entries = entries[1:]
        for r, entry in zip(records, entries):
            if r.action == "dense":
                assert entry is None
            elif r.action == "skip":
                assert entry.numel() == 0
            else:
                assert 0 < entry.numel() == r.n_active < r.n_tokens
        if records[0].t > 0.3:  # the nearly-clean copy of the oldest chunk, appended last
            assert len(entries) == len(records) + 1
            copy, oldest = entries[-1], records[0]
            if oldest.action == "skip":
                assert copy.numel() == 0
            elif copy is not None:  # sparse like its chunk, reading its own earlier keys/values
                assert oldest.action == "sparse" and torch.equal(copy, entries[0])
                assert copy_owner == oldest.chunk
                partial_copies += 1
            else:
                whole_copies += oldest.action == "sparse"
            if copy is None or copy.numel():
                copy_owner = oldest.chunk
    assert next(calls, None) is None
    if mode in ("motion", "motion_detail"):
        assert partial_copies and whole_copies, (partial_copies, whole_copies)  # the rule was exercised


def test_three_pass_streams_use_their_own_caches(runs, monkeypatch):
    model, args, _ = runs["base"]
    log = ForwardLog(model, monkeypatch)
    stats = generate(model, **args, policy=policy("motion_detail", 0.3)).stats
    assert stats.action_counts()["sparse"] > 0 and stats.action_counts()["skip"] > 0
    for c in log.calls:  # re-encoded clean chunks are computed whole in every stream
        if c["t"][0] == pytest.approx(CLEAN_T) and c["active"] is not None:
            assert c["active"][0] is None
    cond = {id(c["kv_cache"]) for c in log.calls if c["unconditional"] is False}
    cond_pre = {id(c["kv_cache"]) for c in log.calls if c["unconditional"] and c["slice_point"] > 0}
    uncond = {id(c["kv_cache"]) for c in log.calls if c["unconditional"] and c["write"] == 1 and len(c["t"]) == 1
              and c["slice_point"] == 0 and c["kv_cache"] is not None and id(c["kv_cache"]) not in cond_pre}
    assert len(cond) == 1 and len(cond_pre) == 1 and cond != cond_pre
    assert len(uncond) == args["window_size"] and not uncond & (cond | cond_pre)


# ------------------------------------------------------------------------------------------ improvements
def test_final_steps_are_always_computed(runs):
    model, args, _ = runs["distill45"]
    steps = args["steps"]
    for final in (1, 3):
        stats = generate(model, **args, policy=policy("motion_detail", 1.0, final_full_steps=final)).stats
        assert all(r.action == "dense" for r in stats.records if r.chunk_step >= steps - final)
        assert any(r.action != "dense" for r in stats.records if r.chunk_step < steps - final)


def test_reused_velocity_is_rescaled_by_the_current_step(runs, monkeypatch):
    """A skipped chunk moves by its last computed velocity times the current step size (the released code
    re-applies the old displacement instead)."""
    model, args, _ = runs["distill45"]
    seen = []
    original = cache_state.CacheState.velocity

    def velocity(self, decision, v, dt):
        out = original(self, decision, v, dt)
        seen.append((decision.chunk_id, decision.action, None if v is None else v.clone(), out.clone(), dt))
        return out

    monkeypatch.setattr(cache_state.CacheState, "velocity", velocity)
    latents = {}
    for rescale in (True, False):
        seen.clear()
        latents[rescale] = generate(model, **args, policy=policy("flowcache", 0.3, rescale_reused_velocity=rescale)).latent
        last = {}
        skips = 0
        for chunk, action, v, out, dt in seen:
            if action == "dense":
                last[chunk] = (v, dt)
                assert torch.equal(out, v)
            elif action == "skip":
                skips += 1
                v_old, dt_old = last[chunk]
                expected = v_old if rescale else v_old * (dt_old / dt)
                assert torch.allclose(out, expected, rtol=1e-6, atol=0)
        assert skips > 0
    assert not torch.equal(latents[True], latents[False])


# ------------------------------------------------------------------------------------------ runs
def test_same_seed_same_video_and_runs_share_no_state(runs):
    model, args, _ = runs["base"]
    args = {k: v for k, v in args.items() if k != "noise"}
    shared = policy("motion_detail", 0.05)
    first = generate(model, **args, seed=5, policy=shared).latent
    assert torch.equal(generate(model, **args, seed=5, policy=shared).latent, first)
    other = generate(model, **args, seed=6, policy=shared).latent
    assert not torch.equal(other, first)

    # A second run from the same policy started in the middle of the first changes neither.
    nested = []

    def on_step(progress):
        if progress.step == 5:
            nested.append(generate(model, **args, seed=6, policy=shared).latent)

    assert torch.equal(generate(model, **args, seed=5, policy=shared, on_step=on_step).latent, first)
    assert torch.equal(nested[0], other)


def test_noise_is_drawn_on_the_cpu_from_the_seed(runs):
    model, args, _ = runs["distill45"]
    noise = torch.randn(args["noise"].shape, generator=torch.Generator().manual_seed(11))
    drawn = generate(model, **{**args, "noise": None}, seed=11).latent
    given = generate(model, **{**args, "noise": noise}).latent
    assert torch.equal(drawn, given)


def track_caches(monkeypatch):
    created = []
    original = KVCache.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        created.append(weakref.ref(self))

    monkeypatch.setattr(KVCache, "__init__", init)
    return created


def test_a_policy_that_refuses_the_video_does_so_before_any_kv_cache_exists(runs, monkeypatch):
    model, args, _ = runs["base"]
    created = track_caches(monkeypatch)
    side = layout_of(args).latent_height
    with pytest.raises(ValueError, match="detail_window_size=.* is larger than the latent frame"):
        generate(model, **args, policy=policy("motion_detail", 0.05, detail_window_size=side + 1))
    assert created == []


@pytest.mark.parametrize("how", ["should_stop", "callback_raises"])
def test_interrupt_releases_everything_and_a_later_run_is_clean(runs, monkeypatch, how):
    model, args, latent = runs["base"]
    created = track_caches(monkeypatch)
    state_refs = []
    original_new_state = CachePolicy.new_state

    def new_state(self, **kw):
        state = original_new_state(self, **kw)
        state_refs.append(weakref.ref(state))
        return state

    monkeypatch.setattr(CachePolicy, "new_state", new_state)
    tables = []  # the run's caption table on the device
    original_rows = CaptionRows.__init__

    def rows_init(self, *a, **kw):
        original_rows(self, *a, **kw)
        tables.append(weakref.ref(self.table))

    monkeypatch.setattr(CaptionRows, "__init__", rows_init)
    steps_seen = []

    class Stop(Exception):
        pass

    def on_step(progress):
        steps_seen.append(progress.step)
        if how == "callback_raises" and progress.step == 4:
            raise Stop()

    def should_stop():
        return len(steps_seen) == 4 and how == "should_stop"

    error = SamplingInterrupted if how == "should_stop" else Stop
    with pytest.raises(error) as info:
        generate(model, **args, policy=policy("motion_detail", 0.05), on_step=on_step, should_stop=should_stop)
    assert len(created) == 2 + args["window_size"] and state_refs
    gc.collect()
    assert tables and all(ref() is None for ref in created + state_refs + tables)  # even while the traceback is alive
    assert info.value is not None
    assert torch.equal(generate(model, **args).latent, latent)


def test_progress_reports_every_step_with_a_preview(runs):
    model, args, _ = runs["base"]
    seen = []
    result = generate(model, **args, on_step=seen.append)
    layout = layout_of(args)
    total = total_forward_steps(layout.chunk_num, args["steps"], args["window_size"])
    assert [p.step for p in seen] == list(range(total)) and all(p.total == total for p in seen)
    last = seen[-1]
    assert last.chunks == (layout.chunk_num - 1, layout.chunk_num)
    # the last step ends at t = 1, where the denoised estimate is the latent itself
    assert torch.allclose(last.preview, result.latent[:, -args["chunk_width"]:], atol=1e-5)


# ------------------------------------------------------------------------------------------ statistics
def test_dense_flops_follow_the_official_call_list(runs):
    """Independent count: every call of the recorded official run, with its chunks' key ranges."""
    model, args, _ = runs["base"]
    stats = generate(model, **args).stats
    with open(os.path.join(FIXTURES, "schedule_base.json")) as f:
        calls = json.load(f)["calls"]
    layout = layout_of(args)
    ct = layout.tokens_per_chunk
    prompt_tokens = int(args["caption_mask"][0].sum())
    null_tokens = min(50, model.config.caption_max_length)
    total = 0.0
    for call in calls:
        for (a, b), t in zip(call["kv_chunks"], call["t"]):
            prompt = call["call"] == 0 and t < 0.999
            total += flops(model.config, query_tokens=ct, key_tokens=int(round(b - a)) * ct,
                           caption_tokens=prompt_tokens if prompt else null_tokens).total
    assert stats.dense_flops == pytest.approx(total, rel=1e-12)
    assert stats.flops == pytest.approx(total, rel=1e-12)
    assert stats.model_calls == len(calls)


def test_stats_count_every_chunk_step(runs):
    model, args, _ = runs["distill45"]
    result = generate(model, **args, policy=policy("motion_detail", 0.05), record_masks=True)
    stats = result.stats
    layout = layout_of(args)
    assert len(stats.records) == layout.chunk_num * args["steps"]
    for chunk in range(layout.chunk_num):
        assert sorted(r.chunk_step for r in stats.records if r.chunk == chunk) == list(range(args["steps"]))
    assert stats.token_steps_total == layout.chunk_num * args["steps"] * layout.tokens_per_chunk
    assert stats.token_steps_computed == sum(r.n_active for r in stats.records)
    assert stats.flops < stats.dense_flops
    assert f"computed {stats.computed_fraction:.0%} of token-steps" in stats.summary()
    assert f"{stats.flop_ratio:.2f}x fewer FLOPs" in stats.summary()
    assert stats.kv_cache_bytes > 0 and stats.wall_seconds > 0

    # The mask frames show exactly the recorded work: white fraction of a chunk's rows = its fraction.
    frames = stats.masks.frames()
    grid_h = layout.latent_height // 2
    assert frames.shape[0] == total_forward_steps(layout.chunk_num, args["steps"], args["window_size"])
    for r in stats.records:
        tile = frames[r.step, r.chunk * grid_h:(r.chunk + 1) * grid_h]
        assert float((tile == 1.0).float().mean()) == pytest.approx(r.fraction)
    idle = frames[0, grid_h:]  # only chunk 0 is denoised at the first step
    assert torch.all(idle == 0.25)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("change, message", [
    (dict(steps=10), "steps must be a multiple of 4"),
    (dict(height=40), "height must be a multiple of 16; the nearest valid value is 48"),
    (dict(frames=0), "frames must be a positive integer"),
    (dict(caption=torch.zeros(3, 12, 24), caption_mask=torch.ones(3, 12)), "this video generates 4"),
    (dict(caption=torch.zeros(4, 12, 7), caption_mask=torch.ones(4, 12)), "caption must be (chunks, 12, 24)"),
    (dict(prefix=torch.zeros(16, 1, 3, 4)), "prefix must be latents [16, P, 4, 4]"),
    (dict(policy="motion"), "policy must be a cache_core.CachePolicy"),
    (dict(noise=torch.zeros(16, 8, 4, 5)), "noise must be [16, 8, 4, 4]"),
])
def test_bad_input_is_refused_clearly(runs, change, message):
    model, args, _ = runs["distill45"]
    with pytest.raises((ValueError, TypeError)) as info:
        generate(model, **{**args, **change})
    assert message in str(info.value)


def test_bad_guidance_is_refused_clearly():
    with pytest.raises(ValueError, match="guidance passes must be 1"):
        Guidance(passes=2)
    with pytest.raises(ValueError, match="same length"):
        Guidance(text_scales=(7.5,))


def test_the_cache_benchmark_runs_and_reports_every_policy(capsys):
    from bench.speed import sampler_cache

    assert sampler_cache.main(["--size", "fixture", "--height", "32", "--width", "32", "--frames", "24",
                               "--steps", "8", "--repeats", "1", "--taus", "0.1,1"]) == 0
    out = capsys.readouterr().out
    for name in ("off", "motion_detail tau=0.1", "motion_detail tau=1", "sparse gathers/scatters"):
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("motion_detail tau=1 "))
    assert float(row.split()[4].rstrip("x")) > 1.0  # a large threshold saves FLOPs


def test_captions_one_for_all_chunks_and_negative_prompts(runs):
    model, args, latent = runs["base"]
    caption, mask = args["caption"], args["caption_mask"]
    assert torch.equal(caption[0], caption[-1])  # the fixture repeats one prompt
    one = generate(model, **{**args, "caption": caption[0], "caption_mask": mask[0]}).latent
    assert torch.equal(one, latent)

    null = model.y_embedder.null_caption_embedding.detach()
    null_mask = torch.arange(null.shape[0]) < 50
    same = generate(model, **args, negative_caption=null, negative_mask=null_mask).latent
    assert torch.equal(same, latent)
    other = generate(model, **args, negative_caption=torch.randn_like(null), negative_mask=null_mask).latent
    assert relative_error(other, latent) > 1e-3

    distilled_model, distilled_args, distilled = runs["distill45"]  # one pass: no unconditional stream
    null = distilled_model.y_embedder.null_caption_embedding.detach()
    ignored = generate(distilled_model, **distilled_args, negative_caption=torch.randn_like(null),
                       negative_mask=torch.ones(null.shape[0], dtype=torch.bool)).latent
    assert torch.equal(ignored, distilled)
