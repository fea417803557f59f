"""Length for free: the KV caches and the latent on the device are bounded by the window, whatever the
video's length, and the videos are the ones a whole-video cache makes (``torch.equal``), over runs long
enough to slide the caches many times (18 chunks)."""

import pytest
import torch

import magi1.sampling.sampler
from cache_core import CachePolicy
from magi1 import KVCache
from run_request import generate
from magi1.sampling.schedule import kv_span
from pipeline_fixtures import load, request

CHUNKS = 18


def _policy(mode):
    if mode is None:
        return None
    return CachePolicy(mode=mode, tau=0.05, warmup_steps=1, chunk_wise_steps=2, final_full_steps=1)


def _long_request(config, chunks=CHUNKS, **changes):
    description, tensors, model = load(config)
    args = request(description, tensors)
    args.pop("noise")
    caption, mask = args["caption"][:1], args["caption_mask"][:1]
    frames = chunks * args["chunk_width"] * 4
    args.update(caption=caption, caption_mask=mask, frames=frames, seed=7, **changes)
    if args["prefix"] is not None and "prefix" not in changes:
        args["prefix"] = args["prefix"][:, :1]  # a start image
    return model, args


def _whole_video_caches(monkeypatch):
    """The caches as before 0.9: rows for the whole video (never sliding)."""
    def whole(chunk_num, num_steps, window_size, chunk_offset=0, extra_blocks=0):
        return chunk_num + extra_blocks
    monkeypatch.setattr(magi1.sampling.sampler, "kv_span", whole)


def _capacities(monkeypatch):
    sizes, init = [], KVCache.__init__

    def recording(self, num_layers, capacity, *args, **kwargs):
        sizes.append(capacity)
        init(self, num_layers, capacity, *args, **kwargs)
    monkeypatch.setattr(KVCache, "__init__", recording)
    return sizes


CASES = {
    "1 pass": ("distill45", None, {}),
    "1 pass, token reuse (the copy block)": ("distill45", "motion_detail", {}),
    "1 pass, kv_offload, chunk reuse": ("distill24", "teacache", {"kv_offload": True}),
    "3 passes, token reuse, negative prompt": ("base", "motion_detail", {"negative": True}),
    "3 passes, start image, chunk reuse": ("base_i2v", "flowcache", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_long_video_is_the_one_a_whole_video_cache_makes(monkeypatch, case):
    config, mode, options = CASES[case]
    model, args = _long_request(config, chunks=CHUNKS if config.startswith("distill") else 12)
    if options.pop("negative", False):
        args.update(negative_caption=args["caption"].flip(-1), negative_mask=args["caption_mask"])
    args.update(options)
    with torch.no_grad():
        sizes = _capacities(monkeypatch)
        bounded = generate(model, **args, policy=_policy(mode))
        bounded_sizes = list(sizes)
        sizes.clear()
        _whole_video_caches(monkeypatch)
        whole = generate(model, **args, policy=_policy(mode))
    assert torch.equal(bounded.latent, whole.latent)
    assert bounded.stats.flops == whole.stats.flops and bounded.stats.records == whole.stats.records
    # the bounded caches are a fixed few chunks wide, the whole-video ones as long as the video
    assert max(bounded_sizes) * 2 <= max(sizes)
    assert bounded.stats.kv_cache_bytes * 2 <= whole.stats.kv_cache_bytes


def test_cache_size_does_not_depend_on_length():
    model, args = _long_request("distill45", chunks=6)
    short = generate(model, **args, policy=_policy("motion_detail"))
    model, args = _long_request("distill45", chunks=CHUNKS)
    long = generate(model, **args, policy=_policy("motion_detail"))
    assert short.stats.kv_cache_bytes == long.stats.kv_cache_bytes > 0


def test_a_prefix_video_longer_than_the_cache_is_encoded_in_pieces(monkeypatch):
    """A continuation of a 7-chunk prefix video: the prefix goes in calls of at most the cache's span (5
    chunks), the same keys/values to float rounding as one call, and the video the same to rounding."""
    model, args = _long_request("distill45", chunks=9)
    cw = args["chunk_width"]
    prefix = torch.randn(16, 7 * cw, *args["prefix"].shape[2:] if args["prefix"] is not None else
                         (args["height"] // 8, args["width"] // 8), generator=torch.Generator().manual_seed(2))
    args.update(prefix=prefix, frames=(9 - 7) * cw * 4)
    with torch.no_grad():
        pieces = generate(model, **args)
        _whole_video_caches(monkeypatch)
        one_call = generate(model, **args)
    error = float((pieces.latent - one_call.latent).norm() / one_call.latent.norm())
    assert pieces.latent.shape == one_call.latent.shape and error < 1e-5


def test_on_frames_streams_the_returned_latent_in_order():
    model, args = _long_request("base_i2v", chunks=5)
    seen = []
    with torch.no_grad():
        result = generate(model, **args, policy=_policy("flowcache"), on_frames=lambda f: seen.append(f.clone()))
    cw = args["chunk_width"]
    assert len(seen) == -(-result.latent.shape[1] // cw) >= 5 and all(f.shape[1] == cw for f in seen)
    assert torch.equal(torch.cat(seen, dim=1), result.latent)


def test_on_frames_after_a_prefix_video_starts_after_it():
    model, args = _long_request("distill45", chunks=4)
    cw = args["chunk_width"]
    args.update(prefix=torch.randn(16, cw + 1, args["height"] // 8, args["width"] // 8), frames=3 * cw * 4)
    seen = []
    with torch.no_grad():
        result = generate(model, **args, on_frames=seen.append)
    assert [f.shape[1] for f in seen] == [cw - 1] + [cw] * 3  # the chunk the prefix ends in, from there
    assert torch.equal(torch.cat(seen, dim=1), result.latent)


def _span_by_brute_force(chunk_num, steps, window_size, noise2clean_kvrange, extra_blocks=0):
    """Every chunk each call reads or writes; the widest stretch from the lowest chunk any later call touches."""
    from magi1.sampling.schedule import total_forward_steps, window_step
    calls = []
    for step in range(total_forward_steps(chunk_num, steps, window_size)):
        plan = window_step(step, chunk_num=chunk_num, num_steps=steps, window_size=window_size,
                           noise2clean_kvrange=noise2clean_kvrange)
        touched = {c for a, b in plan.kv_ranges for c in range(a, b)}
        touched |= set(range(plan.slice_point, plan.slice_point + len(plan.kv_ranges) + extra_blocks))
        calls.append(touched)
    return max(max(calls[i]) + 1 - min(min(c) for c in calls[i:]) for i in range(len(calls)))


@pytest.mark.parametrize("chunk_num,steps,window,ranges,extra", [
    (40, 12, 4, (5, 4, 3, 2), 0), (40, 12, 4, (5, 4, 3, 2), 1), (3, 12, 4, (5, 4, 3, 2), 1),
    (30, 16, 2, (5, 4, 3, 2), 0), (30, 12, 4, (8, 6, 3, 2), 0), (30, 24, 8, (3, 3, 3, 3), 1)])
def test_the_span_follows_the_key_ranges_and_the_window(chunk_num, steps, window, ranges, extra):
    expected = _span_by_brute_force(chunk_num, steps, window, ranges, extra)
    assert kv_span(chunk_num, steps, window, extra_blocks=extra, noise2clean_kvrange=ranges) == expected
    assert expected < chunk_num or chunk_num < 5


def test_window_mask_frames_are_the_window_rows_of_the_whole_frames():
    model, args = _long_request("distill45", chunks=9)
    with torch.no_grad():
        result = generate(model, **args, policy=_policy("motion_detail"), record_masks=True)
    masks, window = result.stats.masks, args["window_size"]
    whole, windowed = masks.frames(), masks.window_frames()
    grid_h = whole.shape[1] // 9
    assert windowed.shape == (whole.shape[0], window * grid_h, whole.shape[2])
    starts = {}
    for r in result.stats.records:
        starts[r.step] = min(starts.get(r.step, r.chunk), r.chunk)
    for step, top in starts.items():
        rows = whole[step, top * grid_h:(top + window) * grid_h]
        assert torch.equal(windowed[step, :rows.shape[0]], rows)
        assert torch.all(windowed[step, rows.shape[0]:] == 0.25)  # past the video's end: idle
    assert windowed.eq(0).any() and windowed.eq(1).any()  # reused and computed tokens both shown


def test_the_device_window_of_the_latent_gives_the_same_video(monkeypatch):
    """On a GPU the latent's chunks are copied in and out of the device (``LatentStore``'s resident path):
    forced here on the CPU, the video is the one the host-only path makes, and the device never holds more
    than the window's chunks (and the refreshed clean one)."""
    from magi1.sampling import latent_store

    model, args = _long_request("distill45", chunks=10)
    with torch.no_grad():
        host = generate(model, **args, policy=_policy("motion_detail"))
    init, most = latent_store.LatentStore.__init__, [0]

    def resident(self, *a, **k):
        init(self, *a, **k)
        self.on_host = False
    chunks = latent_store.LatentStore.chunks

    def counted(self, first, end):
        out = chunks(self, first, end)
        most[0] = max(most[0], len(self._resident))
        return out
    monkeypatch.setattr(latent_store.LatentStore, "__init__", resident)
    monkeypatch.setattr(latent_store.LatentStore, "chunks", counted)
    with torch.no_grad():
        windowed = generate(model, **args, policy=_policy("motion_detail"))
    assert torch.equal(windowed.latent, host.latent)
    assert 0 < most[0] <= args["window_size"] + 1


def test_chunk_captions_give_the_video_of_their_dense_rows():
    """A prompt schedule as ``ChunkCaptions`` (distinct rows; what the nodes and the CLI pass) makes the video
    its dense one-row-per-chunk tensors make, with a negative prompt too (3 passes)."""
    from magi1 import scheduled_caption_rows
    from magi1.prompts.text import SpecialTokens

    model, args = _long_request("base", chunks=10)
    config, g = model.config, torch.Generator().manual_seed(4)
    width, length = config.caption_channels, config.caption_max_length
    tokens = SpecialTokens(hq=torch.randn(width, generator=g), durations=torch.randn(8, width, generator=g))
    schedule = [(first, torch.randn(6, width, generator=g), torch.arange(6) < 4 + first % 3) for first in (0, 2, 6)]
    rows = scheduled_caption_rows(schedule, 10, tokens, length=length)
    negative = scheduled_caption_rows(schedule[:1], 10, length=length)
    assert rows.table.shape[0] == 9 and negative.table.shape[0] == 1  # chunks 0 and 1 share their DURATION row
    caption, mask = rows.dense()
    negative_caption, negative_mask = negative.dense()
    args.pop("caption"), args.pop("caption_mask")
    with torch.no_grad():
        compact = generate(model, rows, None, negative_caption=negative, **args, policy=_policy("motion_detail"))
        dense = generate(model, caption, mask, negative_caption=negative_caption, negative_mask=negative_mask,
                         **args, policy=_policy("motion_detail"))
    assert torch.equal(compact.latent, dense.latent) and compact.stats.flops == dense.stats.flops
