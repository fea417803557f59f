"""The streamed decode (``StreamingDecode``): fed a latent video in pieces, it returns exactly ``decode``'s video,
as early as the tiles allow and holding only what later tiles need; the decode's frame counts against the
release's temporal tiler; the incremental mp4 writer (``Mp4Writer``)."""

import gc
import weakref

import pytest
import torch

from magi1.video import vae as vae_module
from magi1.video.vae import LATENT_SCALE, SEAMLESS, StreamingDecode, VAEConfig, VAETiling, build_vae, random_vae

TILINGS = {
    "release": VAETiling(),
    "seamless": SEAMLESS,
    "untiled": None,
    "spatial": VAETiling(height=16, width=12, length=8),  # 4x3-latent tiles: spatial blends in every slab
    "spatial_overlap": VAETiling(height=16, width=16, length=16, temporal_overlap=0.5),
    "overlap_3_4": VAETiling(height=64, width=64, length=16, temporal_overlap=0.75),  # fades past the cut
    "uneven": VAETiling(height=12, width=12, length=12, temporal_overlap=1 / 3),  # crops wider than the stride
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiles here are tiny: a second thread only adds overhead (several times the time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae():
    return random_vae(VAEConfig(embed_dim=64, depth=1, num_heads=4, patch_size=4, video_size=16), seed=7)


def one_pass_decode(vae, latent, tiling):
    """The decode as it was before it streamed: all temporal tiles planned from the known length
    (``_temporal_tiles``), each faded from the frames the one before made past its keep, un-blended."""
    z = latent[None].float() / LATENT_SCALE
    if tiling is None:
        return vae.decode_tile(z).float()[0]
    tiles = vae_module._temporal_tiles(z.shape[2], *vae_module._temporal_tile_stride(tiling, 4))
    plan = vae_module._spatial_plan(vae, tiling)
    parts, tail = [], None
    for start, size, keep in tiles:
        slab = vae_module._decode_slab(vae, z[:, :, start:start + size], plan, None)
        following = slab[:, :, keep:].clone()
        if tail is not None:
            vae_module._blend(tail, slab, tail.shape[2], 2)
        parts.append(slab[:, :, :keep])
        tail = following
    return torch.cat(parts, dim=2)[0]


def streamed(vae, latent, tiling, piece, **options):
    """What a stream returns for each piece of ``piece`` latent frames, then for ``finish``."""
    stream = StreamingDecode(vae, tiling, **options)
    return [stream.feed(p) for p in latent.split(piece, dim=-3)] + [stream.finish()]


def early_frames(latent_frames, tiling, tf=4):
    """The frames a stream has returned after ``latent_frames`` without ``finish``: every whole tile's frames
    before the next tile's start (none untiled, as the end may still change)."""
    if tiling is None:
        return 0
    tile = tiling.length // tf
    stride = int(tile * (1 - tiling.temporal_overlap))
    whole = 0 if latent_frames < tile else (latent_frames - tile) // stride + 1
    return whole * min(1 if tile == 1 else tf * tile, tf * stride)


@pytest.mark.parametrize("name", sorted(TILINGS))
def test_any_split_equals_the_whole_decode(vae, name):
    tiling = TILINGS[name]
    g = torch.Generator().manual_seed(0)
    for latent_frames in (1, 2, 7, 10, 13):
        latent = torch.randn(16, latent_frames, 9, 7, generator=g)
        expected = vae.decode(latent, tiling)
        assert torch.equal(expected, one_pass_decode(vae, latent, tiling)), latent_frames
        for piece in (1, 2, 5, 6, latent_frames):
            parts = streamed(vae, latent, tiling, piece)
            assert all(p.dtype == torch.float32 and p.shape[:1] + p.shape[2:] == expected.shape[:1] + expected.shape[2:]
                       for p in parts), [p.shape for p in parts]  # empty pieces too: they concatenate
            assert torch.equal(torch.cat(parts, dim=1), expected), (latent_frames, piece)
            fed = list(range(piece, latent_frames, piece)) + [latent_frames]
            returned = [sum(p.shape[1] for p in parts[:k + 1]) for k in range(len(fed))]
            assert returned == [early_frames(n, tiling) for n in fed], (latent_frames, piece)


def test_batched_pieces(vae):
    latent = torch.randn(2, 16, 7, 5, 6, generator=torch.Generator().manual_seed(1))
    for tiling in (SEAMLESS, VAETiling(height=8, width=8, length=8), None):
        parts = streamed(vae, latent, tiling, 3)
        assert all(p.dim() == 5 and p.shape[0] == 2 for p in parts)
        assert torch.equal(torch.cat(parts, dim=2), vae.decode(latent, tiling))


def test_sampler_chunks_come_out_as_they_are_decoded(vae):
    latent = torch.randn(16, 18, 4, 4, generator=torch.Generator().manual_seed(2))
    parts = streamed(vae, latent, SEAMLESS, 6)
    # 16-frame tiles every 8 frames: each chunk of 6 latents finishes 24 frames, the first 8 fewer (held back
    # to fade into the next tile), which finish gives
    assert [p.shape[1] for p in parts] == [16, 24, 24, 8]
    assert [p.shape[1] for p in streamed(vae, latent, VAETiling(), 6)] == [24, 24, 24, 0]


def test_announced_length_ends_with_the_last_feed(vae):
    latent = torch.randn(16, 9, 4, 4, generator=torch.Generator().manual_seed(3))
    for tiling in (SEAMLESS, VAETiling(), None):
        stream = StreamingDecode(vae, tiling, total_latent_frames=9)
        assert stream.total_frames == vae.decoded_frames(9, tiling)
        parts = [stream.feed(p) for p in latent.split(4, dim=1)]
        assert stream.finish().shape[1] == 0 and stream.frames == stream.total_frames
        assert torch.equal(torch.cat(parts, dim=1), vae.decode(latent, tiling))
    stream = StreamingDecode(vae, SEAMLESS, total_latent_frames=5)
    stream.feed(latent[:, :4])
    with pytest.raises(ValueError, match="6 latent frames fed, more than the 5 announced"):
        stream.feed(latent[:, :2])
    assert StreamingDecode(vae, SEAMLESS).total_frames is None


def _cheap(vae):
    """Replace the per-tile decode with zeros of the right shape; record each tile input's storage size."""
    storages = []

    def decode_tile(z):
        storages.append(z.untyped_storage().nbytes())
        t = 1 if z.shape[2] == 1 else 4 * z.shape[2]
        return torch.zeros(z.shape[0], 3, t, z.shape[3] * 8, z.shape[4] * 8)

    vae.decode_tile = decode_tile
    return storages


@pytest.mark.parametrize("tiling", [SEAMLESS, VAETiling(), VAETiling(length=16, temporal_overlap=0.75)])
def test_memory_does_not_grow_with_the_video(tiling):
    vae = build_vae(VAEConfig(embed_dim=256, depth=1, num_heads=4), device="meta")
    storages = _cheap(vae)
    stream = StreamingDecode(vae, tiling)
    latent_bytes = 16 * 4 * 4 * 4  # one latent frame, float32
    tile = tiling.length // 4
    stride = int(tile * (1 - tiling.temporal_overlap))
    for _ in range(60):
        stream.feed(torch.zeros(16, 1, 4, 4))
        held = [t for t in (stream._tail, stream._ending) if t is not None]
        assert stream._latents.shape[2] < tile and all(t.shape[2] <= 4 * (tile - stride) for t in held)
    assert max(storages) <= tile * latent_bytes  # tile inputs: views of the few latents kept, not of the video
    end = stream.finish()
    assert end.shape[1] == 4 * (tile - stride) and stream.frames == 4 * 60


class _Stop(Exception):
    pass


def test_interrupt_releases_everything_and_ends_the_stream(vae):
    latent = torch.randn(16, 10, 5, 6, generator=torch.Generator().manual_seed(4))
    tiling = TILINGS["spatial_overlap"]  # 2 x 2 spatial tiles, 4-latent tiles every 2
    original = vae.decode_tile
    made, polls = [], []

    def tracked(z):
        out = original(z)
        made.extend([weakref.ref(out), weakref.ref(z._base)])  # the tile and the latents it is a view of
        return out

    def stop():
        polls.append(1)
        if len(polls) == 11:  # inside the third temporal tile, in the second feed
            raise _Stop()

    vae.decode_tile = tracked
    try:
        stream = StreamingDecode(vae, tiling, stop=stop)
        assert stream.feed(latent[:, :6]).shape[1] == 16 and len(polls) == 8
        held = weakref.ref(stream._tail)
        with pytest.raises(_Stop) as info:
            stream.feed(latent[:, 6:])
    finally:
        del vae.decode_tile
    gc.collect()
    assert info.value.__traceback__ is not None and len(made) == 20
    assert all(ref() is None for ref in made) and held() is None  # even while the traceback lives
    with pytest.raises(RuntimeError, match="start a new one"):
        stream.feed(latent[:, 6:])
    with pytest.raises(RuntimeError, match="start a new one"):
        stream.finish()


def test_pieces_must_match_the_first(vae):
    stream = StreamingDecode(vae, SEAMLESS)
    stream.feed(torch.zeros(16, 2, 4, 4))
    with pytest.raises(ValueError, match=r"batch and size \[16, 'n', 4, 4\], got \[16, 2, 4, 5\]"):
        stream.feed(torch.zeros(16, 2, 4, 5))
    with pytest.raises(ValueError, match="before any latent frame"):
        StreamingDecode(vae, SEAMLESS).finish()
    with pytest.raises(ValueError, match="decodes latents"):
        StreamingDecode(vae, SEAMLESS).feed(torch.zeros(8, 2, 4, 4))
    ended = StreamingDecode(vae, None)
    ended.feed(torch.zeros(16, 1, 4, 4))
    assert ended.finish().shape == (3, 1, 16, 16)
    with pytest.raises(ValueError, match="already ended at 1 latent frames"):
        ended.feed(torch.zeros(16, 1, 4, 4))


# ------------------------------------------------------------------------------- frame counts vs the release
def release_frames(latent_frames, tiling, tf=4):
    """Frames from the release's ``TileProcessor.tiled_decode`` (inference/infra/parallelism/tile_parallel.py):
    a tile of ``n = length / 4`` latents at every multiple of ``s = int(n * (1 - overlap))`` below ``T``, each
    decoded (one latent: one frame) and cropped to ``4 n - int(4 n * overlap)`` frames."""
    n = tiling.length // tf
    stride = int(n * (1 - tiling.temporal_overlap))
    crop = tf * n - int(tf * n * tiling.temporal_overlap)
    sizes = [min(n, latent_frames - start) for start in range(0, latent_frames, stride)]
    return sum(min(1 if size == 1 else tf * size, crop) for size in sizes)


def test_frame_counts_against_the_release():
    vae = build_vae(VAEConfig(embed_dim=256, depth=1, num_heads=4), device="meta")
    _cheap(vae)
    held_out = VAETiling(length=8, temporal_overlap=0.5)
    # 7 latents in 8-frame tiles overlapping by half: the release's tiles start at 0..6, its last is one latent
    assert release_frames(7, held_out) == 25
    assert vae.decoded_frames(7, held_out) == vae.decode(torch.zeros(16, 7, 4, 4), held_out).shape[1] == 28
    for latent_frames in range(1, 30):
        for length in (8, 12, 16, 20):  # no overlap: the release's tiles and counts
            tiling = VAETiling(length=length)
            assert vae.decoded_frames(latent_frames, tiling) == release_frames(latent_frames, tiling)
        # overlaps of whole latents: 4 T against the release's 4 T - 3 where its last tile is one latent
        for tiling in (held_out, SEAMLESS, VAETiling(length=12, temporal_overlap=1 / 3),
                       VAETiling(length=16, temporal_overlap=0.75), VAETiling(length=20, temporal_overlap=0.4)):
            ours = vae.decoded_frames(latent_frames, tiling)
            assert ours == (1 if latent_frames == 1 else 4 * latent_frames)
            stride = int(tiling.length // 4 * (1 - tiling.temporal_overlap))
            short = latent_frames > 1 and (latent_frames - 1) % stride == 0
            assert release_frames(latent_frames, tiling) == ours - (3 if short else 0), (tiling, latent_frames)
    # overlaps of part of a latent: the release's crops miss its stride (checked against its code: 23, 7)
    assert release_frames(5, VAETiling(length=20, temporal_overlap=0.25)) == 23 != vae.decoded_frames(
        5, VAETiling(length=20, temporal_overlap=0.25)) == 20
    assert release_frames(2, VAETiling(length=12, temporal_overlap=0.5)) == 7


# ------------------------------------------------------------------------------------------------ mp4 writer
def _video(frames=30, height=48, width=64):
    """A smooth moving pattern (H.264 keeps it within a few levels) that changes every frame."""
    t = torch.arange(frames).view(1, -1, 1, 1).float()
    y = torch.arange(height).view(1, 1, -1, 1).float()
    x = torch.arange(width).view(1, 1, 1, -1).float()
    phase = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1, 1)
    return torch.sin(x / 9 + y / 13 + t / 3 + phase) * 0.9


def _read(path):
    import av

    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])


def test_mp4_written_in_pieces_is_the_video(tmp_path):
    pytest.importorskip("av")
    from magi1.video.mp4 import Mp4Writer, write_mp4

    video = _video()
    source = ((video.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0)  # [F, H, W, 3], 0..255
    write_mp4(video, tmp_path / "whole.mp4")
    with Mp4Writer(tmp_path / "pieces.mp4") as writer:
        for piece in (video[:, :7], video[:, 7:7], video[:, 7:8], video[:, 8:]):
            piece = piece.clone()
            kept = weakref.ref(piece)
            writer.write(piece)
            del piece
            assert kept() is None  # encoded at once, nothing of it held
        assert writer.frames == 30
    whole, pieces = _read(tmp_path / "whole.mp4").float(), _read(tmp_path / "pieces.mp4").float()
    assert whole.shape == pieces.shape == source.shape
    for decoded in (whole, pieces):
        error = (decoded[:, None] - source[None]).abs().mean(dim=(2, 3, 4))  # [decoded frame, source frame]
        assert torch.equal(error.argmin(dim=1), torch.arange(30))  # every frame once, in order
        assert float(error.diagonal().max()) < 8.0  # yuv420p: colour at half resolution
    # libx264 here is not byte-reproducible from run to run (even single-threaded): compare what it shows
    assert float((whole - pieces).abs().mean()) < 4.0  # measured: 0 to 1.4; the next frame is 24 away


def test_mp4_writer_refuses_other_sizes_and_closed_writes(tmp_path):
    pytest.importorskip("av")
    from magi1.video.mp4 import Mp4Writer

    writer = Mp4Writer(tmp_path / "a.mp4")
    writer.write(_video(2))
    with pytest.raises(ValueError, match="frames of 32x64 in a 48x64 video"):
        writer.write(_video(2, height=32))
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="already closed"):
        writer.write(_video(2))
    assert _read(tmp_path / "a.mp4").shape[0] == 2
