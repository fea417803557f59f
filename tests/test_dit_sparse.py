"""The sparse (active-token) forward and the KV cache, against the dense forward on random weights."""

import re

import pytest
import torch

from magi1 import KVCache, random_dit

CONFIG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
              kv_channels=16, caption_channels=24, caption_max_length=10, in_channels=16, out_channels=16,
              apply_layernorm_1p=True)
FRAMES, HEIGHT, WIDTH = 2, 6, 8  # per chunk: 2 frames of 3 x 4 tokens
CT = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
CHUNKS, SLICE = 4, 1  # a window of 4 chunks after one clean chunk in the cache
# Steady-state ranges (noise2clean_kvrange [5, 4, 3, 2] for chunks at stages 3, 2, 1, 0): every chunk
# sees the clean chunk and the window up to itself, so each chunk has its own range.
RANGES = [(0, (SLICE + j + 1) * CT) for j in range(CHUNKS)]


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model():
    return random_dit(CONFIG, seed=11)


def window_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, CHUNKS * FRAMES, HEIGHT, WIDTH, generator=g)
    t = torch.tensor([[0.5, 0.3, 0.1, 0.02]])
    caption = torch.randn(1, CHUNKS, 10, 24, generator=g)
    mask = torch.zeros(1, CHUNKS, 10, dtype=torch.bool)
    for j, n in enumerate((3, 7, 10, 5)):
        mask[0, j, :n] = True
    return dict(x=x, t=t, caption=caption, caption_mask=mask, kv_range=RANGES, slice_point=SLICE)


def cache_with_clean_prefix(model, seed):
    cache = KVCache.for_model(model, (SLICE + CHUNKS) * CT)
    g = torch.Generator().manual_seed(seed)
    for keys, values in zip(cache.keys, cache.values):
        keys[: SLICE * CT] = torch.randn(keys[: SLICE * CT].shape, generator=g)
        values[: SLICE * CT] = torch.randn(values[: SLICE * CT].shape, generator=g)
    return cache


def dense_reference(model, inputs):
    """Dense call writing every window chunk: its output and the cache it leaves (current keys/values)."""
    cache = cache_with_clean_prefix(model, 5)
    out = model(**inputs, kv_cache=cache, kv_write_chunks=CHUNKS)
    return out, cache


def tokens_of(out, j):
    """``(N, C, T, H, W)`` velocities -> the per-token rows of window chunk j: ``(CT, C * 4)``."""
    chunk = out[0, :, j * FRAMES:(j + 1) * FRAMES]
    c = chunk.shape[0]
    return chunk.reshape(c, FRAMES, HEIGHT // 2, 2, WIDTH // 2, 2).permute(1, 2, 4, 0, 3, 5).reshape(CT, -1)


@pytest.mark.parametrize("j", range(CHUNKS))
def test_all_active_equals_dense_at_every_window_position(model, j):
    inputs = window_inputs(1)
    dense, dense_cache = dense_reference(model, inputs)
    cache = cache_with_clean_prefix(model, 5)
    active = [None] * CHUNKS
    active[j] = torch.arange(CT)
    out = model(**inputs, kv_cache=cache, kv_write_chunks=CHUNKS, active=active)
    assert relative_error(out, dense) <= 1e-6
    for layer in range(CONFIG["num_layers"]):
        assert relative_error(cache.keys[layer], dense_cache.keys[layer]) <= 1e-6
        assert relative_error(cache.values[layer], dense_cache.values[layer]) <= 1e-6


@pytest.mark.parametrize("j", range(CHUNKS))
def test_partial_mask_with_current_store_gives_dense_outputs_on_active_tokens(model, j):
    inputs = window_inputs(2)
    dense, cache = dense_reference(model, inputs)  # the cache now holds every token's current keys/values
    stored = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)]
    g = torch.Generator().manual_seed(100 + j)
    chosen = torch.randperm(CT, generator=g)[: CT // 3].sort().values
    active = [None] * CHUNKS
    active[j] = chosen
    out = model(**inputs, kv_cache=cache, kv_write_chunks=CHUNKS, active=active)
    sparse_rows, dense_rows = tokens_of(out, j), tokens_of(dense, j)
    assert relative_error(sparse_rows[chosen], dense_rows[chosen]) <= 1e-5
    inactive = torch.ones(CT, dtype=torch.bool)
    inactive[chosen] = False
    assert torch.count_nonzero(sparse_rows[inactive]) == 0  # not computed: zero velocity
    for other in set(range(CHUNKS)) - {j}:
        assert relative_error(tokens_of(out, other), tokens_of(dense, other)) <= 1e-5
    for layer, (k, v) in enumerate(stored):  # fresh keys/values written back equal the current ones
        assert relative_error(cache.keys[layer], k) <= 1e-5
        assert relative_error(cache.values[layer], v) <= 1e-5


def test_every_chunk_sparse_and_one_skipped(model):
    inputs = window_inputs(3)
    dense, cache = dense_reference(model, inputs)
    g = torch.Generator().manual_seed(7)
    active = [torch.randperm(CT, generator=g)[:n].sort().values for n in (5, 0, CT // 2, 1)]
    out = model(**inputs, kv_cache=cache, kv_write_chunks=CHUNKS, active=active)
    for j, chosen in enumerate(active):
        rows = tokens_of(out, j)
        if len(chosen):
            assert relative_error(rows[chosen], tokens_of(dense, j)[chosen]) <= 1e-5
        else:
            assert torch.count_nonzero(rows) == 0


def test_sparse_reads_the_stored_keys_and_values(model):
    """With stale stored keys/values the active tokens' outputs move: the store is really read."""
    inputs = window_inputs(4)
    dense, cache = dense_reference(model, inputs)
    for k in cache.keys:
        k[SLICE * CT:] += 0.5  # corrupt the window's stored keys
    chosen = torch.arange(0, CT, 2)
    active = [None, chosen, None, None]
    out = model(**inputs, kv_cache=cache, kv_write_chunks=CHUNKS, active=active)
    assert relative_error(tokens_of(out, 1)[chosen], tokens_of(dense, 1)[chosen]) > 1e-3


def test_each_chunk_uses_its_own_key_range(model):
    """The released cache code gave every chunk the first chunk's range; here a chunk's output depends
    on its own range only: narrowing chunk 3's range changes chunk 3 and nothing before it."""
    inputs = window_inputs(5)
    dense, _ = dense_reference(model, inputs)
    narrow = dict(inputs, kv_range=RANGES[:3] + [((SLICE + 3) * CT, (SLICE + 4) * CT)])
    cache = cache_with_clean_prefix(model, 5)
    active = [None, None, None, torch.arange(0, CT, 3)]
    out = model(**narrow, kv_cache=cache, kv_write_chunks=CHUNKS, active=active)
    for j in range(3):
        assert relative_error(tokens_of(out, j), tokens_of(dense, j)) <= 1e-6
    assert relative_error(tokens_of(out, 3)[::3], tokens_of(dense, 3)[::3]) > 1e-3


def test_offloaded_cache_gives_the_same_results(model):
    inputs = window_inputs(6)
    dense, resident = dense_reference(model, inputs)
    offloaded = KVCache.for_model(model, (SLICE + CHUNKS) * CT, offload=True)
    prefix = cache_with_clean_prefix(model, 5)
    for dst, src in zip(offloaded.keys + offloaded.values, prefix.keys + prefix.values):
        dst.copy_(src)
    out = model(**inputs, kv_cache=offloaded, kv_write_chunks=CHUNKS)
    assert torch.equal(out, dense)
    for a, b in zip(offloaded.keys + offloaded.values, resident.keys + resident.values):
        assert torch.equal(a, b)
    active = [torch.arange(0, CT, 2), None, torch.arange(5), None]
    sparse = model(**inputs, kv_cache=offloaded, kv_write_chunks=CHUNKS, active=active)
    assert relative_error(tokens_of(sparse, 0)[::2], tokens_of(dense, 0)[::2]) <= 1e-5


def test_read_only_call_leaves_the_cache_alone(model):
    inputs = window_inputs(7)
    cache = cache_with_clean_prefix(model, 5)
    before = [b.clone() for b in cache.keys + cache.values]
    model(**inputs, kv_cache=cache, kv_write_chunks=0)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.keys + cache.values))


@pytest.mark.parametrize("bad, message", [
    (dict(active=[torch.arange(3), None, None, None], kv_write_chunks=0), "sparse chunks must be among"),
    (dict(kv_cache=None, kv_write_chunks=0), "need a KV cache"),
    (dict(kv_range=RANGES[:3]), "one [start, end) per window chunk"),
    (dict(kv_range=RANGES[:3] + [(0, 99 * CT)]), "must lie in"),
    (dict(kv_write_chunks=5), "kv_write_chunks must be in"),
])
def test_bad_calls_are_refused_clearly(model, bad, message):
    inputs = window_inputs(8)
    args = dict(inputs, kv_cache=cache_with_clean_prefix(model, 5), kv_write_chunks=CHUNKS)
    args.update(bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        model(**args)
