"""Context-parallel and guidance-parallel generation over several CPU processes (gloo) against the same
generation in one process (tests/parallel_harness.py): whole runs on the official pipeline fixtures,
1-pass distill and 3-pass base, prefixes, caches with the single-process decisions replayed, an uneven
sparse call, and the built-in model loaded with each rank reading only its layers."""

import pytest
import torch

from magi1.distributed.parallel import kv_heads_of, split_sizes
from parallel_harness import CASES, Replayed, lonely_request, parameter_bytes, run_world, single, tiny_request, \
    uneven_forward, uneven_request
from pipeline_fixtures import relative_error

TOLERANCE = 1e-5  # relative, float32
NO_CACHE = ["distill24", "distill45_continuation", "base", "base_i2v"]
CACHED = ["distill45_cache", "base_cache", "base_i2v_chunk_cache", "base_long_cache"]  # the last slides its caches
BASE = [name for name in NO_CACHE + CACHED if CASES[name][0].startswith("base")]
# (processes, guidance groups): context parallel over 2 and 4 (4 > the fixtures' 2 KV heads: replicated KV
# heads; distill24's 6 heads split 2/2/1/1), guidance parallel in 3 groups of 1 and 2 groups of 2.
WORLDS = [(2, 1), (4, 1), (3, 3), (4, 2)]
# 3 processes over distill45's 8 heads (2 KV heads): rank 1 attends with heads 2, 3, 4, which read KV heads
# 0, 0, 1, an irregular grouping (each query head gets its own KV head copy).
IRREGULAR = (3, 1)


@pytest.fixture(scope="module")
def references():
    return {name: single(name, record=name in CACHED) for name in NO_CACHE + CACHED}


@pytest.fixture(scope="module")
def runs(references):
    out = {}
    for world, cfg in WORLDS:
        names = [n for n in NO_CACHE + CACHED if cfg == 1 or n in BASE]
        jobs = {name: (name, _replay(references[name][2])) for name in names}
        if (world, cfg) == (2, 1):
            jobs.update(tiny=("tiny", None), uneven=("uneven", None), failing=("failing", None))
        if (world, cfg) == (4, 1):
            jobs.update(uneven=("uneven", None))
        out[world, cfg] = run_world(world, jobs, cfg=cfg)[0]
    jobs = {"uneven": ("uneven", None), "distill45_cache": ("distill45_cache", _replay(references["distill45_cache"][2]))}
    out[IRREGULAR] = run_world(IRREGULAR[0], jobs)[0]
    out["replicated"] = run_world(2, {"tiny": ("tiny", None)}, shard_weights=False)[0]
    return out


def _replay(recording):
    return None if recording is None else Replayed(recording.inner, recording.decides, recording.observes)


def test_split_sizes_and_kv_heads():
    for total in range(0, 40):
        for parts in range(1, 9):
            sizes = split_sizes(total, parts)
            assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    assert kv_heads_of(8, 2, 0, 4) == (0, 1) and kv_heads_of(8, 2, 3, 5) == (0, 2)
    assert kv_heads_of(48, 8, 12, 24) == (2, 4)


@pytest.mark.parametrize("world,cfg", WORLDS)
def test_uncached_generations_match_one_process(runs, references, world, cfg):
    for name in NO_CACHE:
        if cfg == 1 or name in BASE:
            error = relative_error(runs[world, cfg][name], references[name][0])
            assert error < TOLERANCE, (name, error)


@pytest.mark.parametrize("world,cfg", WORLDS)
def test_cached_generations_match_one_process_under_replayed_decisions(runs, references, world, cfg):
    for name in CACHED:
        if cfg == 1 or name in BASE:
            latent, stats, _ = references[name]
            error = relative_error(runs[world, cfg][name], latent)
            assert error < TOLERANCE, (name, error)
            # the same decisions: every step's computed tokens, as rank 0's masks record them
            assert torch.equal(runs[world, cfg][name + ".masks"], stats.masks.frames().float()), name
            assert 0 < stats.computed_fraction < 1, name  # the cache did reuse something, or this tests nothing


@pytest.mark.parametrize("world", [2, 3, 4])
def test_an_uneven_sparse_call_matches_one_process(runs, world):
    model, request = uneven_request()
    error = relative_error(runs[world, 1]["uneven"], uneven_forward(model, request))
    assert error < TOLERANCE
    model, request = lonely_request()  # one token: the other ranks have none
    assert relative_error(runs[world, 1]["lonely"], uneven_forward(model, request)) < TOLERANCE


@pytest.mark.parametrize("world,cfg", WORLDS)
def test_reported_work_counts_every_process_group(runs, references, world, cfg):
    """FLOPs and DiT calls in rank 0's report are the whole run's, guidance groups included."""
    for name in NO_CACHE + CACHED:
        if cfg == 1 or name in BASE:
            stats = references[name][1]
            flops, calls = runs[world, cfg][name + ".counts"].tolist()
            assert calls == stats.model_calls and flops == pytest.approx(stats.flops, rel=1e-12), name


def test_a_policy_failing_on_rank_0_stops_every_rank(runs):
    assert runs[2, 1]["failing.raised"].tolist() == [1.0, 1.0]


def test_irregular_head_grouping(runs, references):
    latent, stats, _ = references["distill45_cache"]
    assert relative_error(runs[IRREGULAR]["distill45_cache"], latent) < TOLERANCE
    assert torch.equal(runs[IRREGULAR]["distill45_cache.masks"], stats.masks.frames().float())


def test_builtin_model_loaded_by_layer_owners(runs):
    from run_request import generate
    from magi1.builtin import TINY
    whole = TINY.load_dit()
    with torch.no_grad():
        latent = generate(whole, **tiny_request()).latent
    assert relative_error(runs[2, 1]["tiny"], latent) < TOLERANCE
    held = runs[2, 1]["tiny.bytes"]
    layers = sum(parameter_bytes(layer) for layer in whole.videodit_blocks.layers)
    rest = parameter_bytes(whole) - layers
    # each rank holds the replicated rest and half of the layers (the tiny model has an even layer count)
    assert held.tolist() == [rest + layers / 2] * 2


def test_replicated_weights_give_the_same_latent(runs):
    """shard_weights=False: every rank keeps the whole model and nothing is broadcast."""
    from magi1.builtin import TINY
    assert torch.equal(runs["replicated"]["tiny"], runs[2, 1]["tiny"])
    assert runs["replicated"]["tiny.bytes"].tolist() == [parameter_bytes(TINY.load_dit())] * 2
