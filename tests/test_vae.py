"""The VAE against the official ViTVAE and the release's tiled decode/encode (tests/fixtures/vae, recorded
by tests/fixtures/make_fixtures.py vae), tile bookkeeping, frame counts, loading and errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from magi1.video import vae as vae_module
from magi1.video.vae import (LATENT_SCALE, VAEConfig, VAETiling, build_vae, infer_vae_config, load_vae, random_vae)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vae")


@pytest.fixture(scope="module")
def official():
    with open(os.path.join(FIXTURE, "vae.json")) as f:
        description = json.load(f)
    tensors = load_file(os.path.join(FIXTURE, "vae.safetensors"))
    vae = build_vae(description["config"])
    # strict: the official state dict's names and shapes are exactly ours
    vae.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}, strict=True)
    return description, tensors, vae.eval()


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = json.load(open(os.path.join(FIXTURE, "vae.json")))["cases"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_official(official, name):
    description, tensors, vae = official
    case = description["cases"][name]
    tiling = VAETiling(**case["tiling"]) if case["tiling"] else None
    x, expected = tensors[f"in.{name}"], tensors[f"out.{name}"]
    if case["what"] == "decode":
        out = vae.decode(x, tiling)
    else:
        out = vae.encode(x.float() / 127.5 - 1.0, tiling)  # the pipeline's uint8 -> [-1, 1]
    assert list(out.shape) == case["output"]
    assert _relative(out, expected) <= 1e-4


def test_unbatched_equals_batched(official):
    _, tensors, vae = official
    latent = tensors["in.decode_plain"]
    assert torch.equal(vae.decode(latent[0], None), vae.decode(latent, None)[0])


def test_release_tiling_is_default():
    tiling = VAETiling()
    assert (tiling.height, tiling.width, tiling.length) == (256, 256, 12)
    assert (tiling.spatial_overlap, tiling.temporal_overlap) == (0.25, 0.0)


def _counting(vae, kind):
    """Replace the per-tile transform with a cheap one of the right shape that counts its calls and
    records where each tile started (its input's first value encodes the position)."""
    calls = []
    f, s, z = vae.temporal_factor, vae.spatial_factor, vae.config.z_chans

    def decode_tile(latent):
        calls.append(tuple(latent.shape[2:]))
        t = 1 if latent.shape[2] == 1 else latent.shape[2] * f
        return torch.zeros(latent.shape[0], 3, t, latent.shape[3] * s, latent.shape[4] * s)

    def encode_tile(video):
        calls.append(tuple(video.shape[2:]))
        t = 1 if video.shape[2] == 1 else video.shape[2] // f
        return torch.zeros(video.shape[0], z, t, video.shape[3] // s, video.shape[4] // s)

    setattr(vae, f"{kind}_tile", decode_tile if kind == "decode" else encode_tile)
    return calls


def test_720p_chunk_uses_32_release_tiles():
    # magi1.md 4.3: a 720x720 chunk of 6 latent frames decodes in 2 x 4 x 4 tiles of 32x32x3 latents
    vae = build_vae(VAEConfig(embed_dim=256, depth=1, num_heads=4), device="meta")
    calls = _counting(vae, "decode")
    video = vae.decode(torch.zeros(16, 6, 90, 90))
    assert len(calls) == 32 and calls[0] == (3, 32, 32)
    assert list(video.shape) == [3, 24, 720, 720]
    calls = _counting(vae, "encode")
    latent = vae.encode(torch.zeros(3, 24, 720, 720))
    assert len(calls) == 32 and calls[0] == (12, 256, 256)
    assert list(latent.shape) == [16, 6, 90, 90]


def test_user_tile_size_makes_more_smaller_tiles():
    vae = build_vae(VAEConfig(embed_dim=256, depth=1, num_heads=4), device="meta")
    calls = _counting(vae, "decode")
    video = vae.decode(torch.zeros(16, 6, 90, 90), VAETiling(height=128, width=128))
    assert max(c[1] for c in calls) == 16 and len(calls) == 2 * 8 * 8  # stride 12 latents: 8 tiles per side
    assert list(video.shape) == [3, 24, 720, 720]


@pytest.mark.parametrize("tiling", [VAETiling(), VAETiling(height=32, width=32, length=8), None])
def test_decoded_frames_counts(tiling):
    vae = random_vae(VAEConfig(embed_dim=64, depth=1, num_heads=4, patch_size=4, video_size=16), seed=0)
    for latent_frames in range(1, 9):
        video = vae.decode(torch.randn(16, latent_frames, 2, 2), tiling)
        assert video.shape[1] == vae.decoded_frames(latent_frames, tiling)
    # the release: one latent -> 1 frame; 4 latents in 12-frame tiles -> 12 + 1
    assert vae.decoded_frames(1) == 1 and vae.decoded_frames(4) == 13 and vae.decoded_frames(6) == 24


def test_encodable_frames():
    vae = build_vae(VAEConfig(embed_dim=256, depth=1, num_heads=4), device="meta")
    assert [n for n in range(1, 30) if vae.encodable_frames(n)] == [1, 4, 8, 12, 13, 16, 20, 24, 25, 28]
    assert [n for n in range(1, 14) if vae.encodable_frames(n, None)] == [1, 4, 8, 12]
    with pytest.raises(ValueError, match="cannot encode 14 frames.*use 16 frames or 13"):
        vae.encode(torch.zeros(3, 14, 8, 8))


def test_whole_video_tile_equals_untiled():
    vae = random_vae(VAEConfig(embed_dim=64, depth=2, num_heads=4, patch_size=4, video_size=16), seed=1)
    latent = torch.randn(16, 3, 5, 6)
    big = VAETiling(height=64, width=64, length=12)
    assert torch.equal(vae.decode(latent, big), vae.decode(latent, None))
    video = torch.rand(3, 8, 20, 24) * 2 - 1
    assert torch.equal(vae.encode(video, big), vae.encode(video, None))


def test_encode_is_scaled_posterior_mean():
    vae = random_vae(VAEConfig(embed_dim=64, depth=1, num_heads=4, patch_size=4, video_size=16), seed=2)
    video = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    moments = vae.encoder(video)
    assert moments.shape[1] == 32
    torch.testing.assert_close(vae.encode(video, None), moments[:, :16] * LATENT_SCALE, rtol=0, atol=0)


def test_bfloat16_close_to_float32():
    config = VAEConfig(embed_dim=64, depth=2, num_heads=4, patch_size=4, video_size=16)
    full = random_vae(config, seed=3)
    half = random_vae(config, seed=3, dtype=torch.bfloat16)
    latent = torch.randn(16, 2, 4, 4)
    out = half.decode(latent, None)
    assert out.dtype == torch.float32
    assert _relative(out, full.decode(latent, None)) < 3e-2


# ------------------------------------------------------------------------------------------- loading
def _save(vae, path, metadata=None):
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path, metadata=metadata)


def test_load_with_config_json(official, tmp_path):
    description, tensors, vae = official
    folder = tmp_path / "vae"
    folder.mkdir()
    _save(vae, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**description["config"], "_diffusers_version": "0.33.0"}))
    loaded = load_vae(folder)  # the official ckpt/vae folder layout
    latent = tensors["in.decode_plain"]
    assert loaded.config == vae.config
    assert torch.equal(loaded.decode(latent, None), vae.decode(latent, None))


def test_load_from_metadata_and_from_shapes(tmp_path):
    config = VAEConfig(embed_dim=64, depth=2, num_heads=4, patch_size=4, video_size=16, video_length=16)
    vae = random_vae(config, seed=4)
    _save(vae, tmp_path / "a.safetensors", {vae_module.CONFIG_METADATA_KEY: json.dumps(config.to_dict())})
    assert load_vae(tmp_path / "a.safetensors").config == config
    _save(vae, tmp_path / "b.safetensors")  # no config: 64-wide heads -> 1 head is inferred here
    inferred = load_vae(tmp_path / "b.safetensors").config
    assert inferred == VAEConfig(embed_dim=64, depth=2, num_heads=1, patch_size=4, video_size=16, video_length=16)


def test_official_config_inferred_from_shapes():
    vae = build_vae(VAEConfig(), device="meta")
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert infer_vae_config(shapes) == VAEConfig()
    assert shapes["encoder.pos_embed"] == (1, 4097, 1024)
    assert shapes["decoder.last_layer.weight"] == (3, 4, 3, 3, 3)
    assert shapes["encoder.last_layer.weight"] == (32, 1024)
    assert not any("norm1" in k or "quant_conv" in k for k in shapes)


def test_position_grid_that_cannot_be_inferred_asks_for_config(official, tmp_path):
    _, _, vae = official  # trained grid 2 x 4 x 4: not the release's 16-frame layout
    _save(vae, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match="config.json"):
        load_vae(tmp_path / "vae.safetensors")


def test_wrong_checkpoints_are_refused(official, tmp_path):
    _, _, vae = official
    save_file({"videodit_blocks.layers.0.mlp.linear_fc1.weight": torch.zeros(2, 2)}, tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="not a MAGI-1 VAE checkpoint: this file is a MAGI-1 DiT: load it as the DiT"):
        load_vae(tmp_path / "dit.safetensors")
    state = {k: v for k, v in vae.state_dict().items() if k != "decoder.blocks.1.mlp.fc2.bias"}
    folder = tmp_path / "partial"
    folder.mkdir()
    save_file(state, folder / "vae.safetensors")
    with open(folder / "config.json", "w") as f:
        json.dump(official[0]["config"], f)
    with pytest.raises(ValueError, match=r"missing keys.*decoder\.blocks\.1\.mlp\.fc2\.bias"):
        load_vae(folder)
    (tmp_path / "vae.ckpt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_vae(tmp_path / "vae.ckpt")
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "absent.safetensors")


def test_config_options():
    assert VAEConfig.from_dict({"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": {
        "embed_dim": 1024, "ln_in_attn": True, "use_rope": False, "drop_rate": 0.0}}) == VAEConfig()
    with pytest.raises(ValueError, match="use_rope=True"):
        VAEConfig.from_dict({"ddconfig": {"use_rope": True}})
    with pytest.raises(ValueError, match="unknown MAGI-1 VAE config options: \\['zz'\\]"):
        VAEConfig.from_dict({"zz": 1})
    with pytest.raises(ValueError, match="_class_name"):
        VAEConfig.from_dict({"_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VAEConfig(embed_dim=128)


def test_bad_inputs():
    vae = random_vae(VAEConfig(embed_dim=64, depth=1, num_heads=4, patch_size=4, video_size=16), seed=5)
    with pytest.raises(ValueError, match="multiples of 4 pixels"):
        vae.decode(torch.zeros(16, 1, 2, 2), VAETiling(height=30, width=32))
    with pytest.raises(ValueError, match="multiple of 4 frames"):
        vae.decode(torch.zeros(16, 1, 2, 2), VAETiling(length=10))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VAETiling(spatial_overlap=1.0)
    with pytest.raises(ValueError, match="decodes latents"):
        vae.decode(torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError, match="height and width must be multiples of 4"):
        vae.encode(torch.zeros(3, 4, 6, 8))
    with pytest.raises(ValueError, match="attention backend"):
        vae.set_attention_backend("xformers")


# ------------------------------------------------------------------------- temporal overlap, stop checks
def _previous_tiled_decode(vae, z, tiling):
    """The tiled decode as it was before temporal overlap was reworked (the release's, pinned by the
    fixtures for no temporal overlap): the reference the release tiling must still equal exactly."""
    sf, tf = vae.spatial_factor, vae.temporal_factor
    tile = (tiling.length // tf, tiling.height // sf, tiling.width // sf)
    stride = (tile[0], int(tile[1] * (1 - tiling.spatial_overlap)), int(tile[2] * (1 - tiling.spatial_overlap)))
    blend = (int(tile[1] * sf * tiling.spatial_overlap), int(tile[2] * sf * tiling.spatial_overlap))
    keep = (tile[1] * sf - blend[0], tile[2] * sf - blend[1])
    slabs = []
    for f in range(0, z.shape[2], stride[0]):
        row = [[vae.decode_tile(z[:, :, f:f + tile[0], i:i + tile[1], j:j + tile[2]]).float()
                for j in range(0, z.shape[4], stride[2])] for i in range(0, z.shape[3], stride[1])]
        rows = []
        for ii, tiles in enumerate(row):
            crops = []
            for jj, decoded in enumerate(tiles):
                out = decoded.clone()
                if ii > 0:
                    vae_module._blend(row[ii - 1][jj], out, blend[0], 3)
                if jj > 0:
                    vae_module._blend(tiles[jj - 1], out, blend[1], 4)
                crops.append(out[:, :, :, :keep[0], :keep[1]])
            rows.append(torch.cat(crops, dim=4))
        slabs.append(torch.cat(rows, dim=3))
    return torch.cat(slabs, dim=2)


@pytest.fixture(scope="module")
def small():
    return random_vae(VAEConfig(embed_dim=64, depth=1, num_heads=4, patch_size=4, video_size=16), seed=6)


@pytest.mark.parametrize("tiling", [VAETiling(), VAETiling(height=16, width=16), VAETiling(height=16, width=12, length=8),
                                    VAETiling(height=16, width=16, length=4)])
def test_release_tiling_unchanged(small, tiling):
    g = torch.Generator().manual_seed(0)
    for latent_frames in range(1, 9):
        latent = torch.randn(16, latent_frames, 9, 7, generator=g)
        expected = _previous_tiled_decode(small, latent[None] / LATENT_SCALE, tiling)[0]
        assert torch.equal(small.decode(latent, tiling), expected), latent_frames


def _reference_overlap_decode(vae, latent, tiling):
    """Each temporal tile decoded on its own (spatially tiled, whole in time), cross-faded by hand frame by
    frame: in the 4 * overlap frames two tiles share, the later one's weight rises as i / (4 * overlap)."""
    n = tiling.length // 4
    stride = int(n * (1 - tiling.temporal_overlap))
    whole = VAETiling(height=tiling.height, width=tiling.width, length=4 * latent.shape[1])
    starts = [0]
    while starts[-1] + n < latent.shape[1]:
        starts.append(starts[-1] + stride)
    pieces = [vae.decode(latent[:, s:s + n], whole) for s in starts]
    frames = []
    for f in range(4 * latent.shape[1] if latent.shape[1] > 1 else 1):
        covering = [k for k, s in enumerate(starts) if 4 * s <= f < 4 * s + pieces[k].shape[1]]
        if len(covering) == 1:
            frames.append(pieces[covering[0]][:, f - 4 * starts[covering[0]]])
            continue
        a, b = covering
        w = torch.tensor((f - 4 * starts[b]) / (4 * (n - stride)), dtype=torch.float64).float()
        frames.append(pieces[a][:, f - 4 * starts[a]] * (1 - w) + pieces[b][:, f - 4 * starts[b]] * w)
    return torch.stack(frames, dim=1)


@pytest.mark.parametrize("tiling", [VAETiling(height=16, width=16, length=16, temporal_overlap=0.5),
                                    VAETiling(height=16, width=12, length=12, temporal_overlap=1 / 3),
                                    VAETiling(height=64, width=64, length=8, temporal_overlap=0.5),
                                    VAETiling(height=16, width=16, length=20, temporal_overlap=0.25)])
def test_temporal_overlap_cross_fades_like_a_slow_reference(small, tiling):
    g = torch.Generator().manual_seed(1)
    for latent_frames in (1, 2, 4, 5, 7, 10):
        latent = torch.randn(16, latent_frames, 9, 7, generator=g)
        video = small.decode(latent, tiling)
        assert video.shape[1] == small.decoded_frames(latent_frames, tiling) == (
            1 if latent_frames == 1 else 4 * latent_frames)
        torch.testing.assert_close(video, _reference_overlap_decode(small, latent, tiling), rtol=0, atol=1e-6)


def test_overlapping_tiles_are_counted_and_none_is_wasted():
    vae = build_vae(VAEConfig(embed_dim=256, depth=1, num_heads=4), device="meta")
    calls = _counting(vae, "decode")
    video = vae.decode(torch.zeros(16, 24, 24, 24), vae_module.SEAMLESS)
    # 16-frame tiles (4 latents) every 2 latents; the last one reaches the end: starts 0, 2, ..., 20
    assert [c[0] for c in calls] == [4] * 11 and list(video.shape) == [3, 96, 192, 192]
    for frames in range(1, 30):
        assert vae.decoded_frames(frames, vae_module.SEAMLESS) == (1 if frames == 1 else 4 * frames)
        # the release's count: 4 per latent frame, but a last tile of one latent frame makes one
        assert vae.decoded_frames(frames) == 4 * frames - (3 if frames % 3 == 1 else 0)
    with pytest.raises(ValueError, match="leave no stride"):
        vae.decode(torch.zeros(16, 2, 2, 2), VAETiling(length=4, temporal_overlap=0.5))


def test_seamless_is_the_release_tiling_but_in_time():
    assert vae_module.SEAMLESS == VAETiling(length=16, temporal_overlap=0.5)
    assert VAETiling() == VAETiling(length=12, temporal_overlap=0.0)  # the release's stays the default


class _Stop(Exception):
    pass


@pytest.mark.parametrize("what", ["decode", "encode"])
@pytest.mark.parametrize("tiling", [VAETiling(height=16, width=16), VAETiling(height=16, width=16, length=16,
                                                                                temporal_overlap=0.5), None])
def test_stop_is_polled_before_every_tile_and_changes_nothing(small, what, tiling):
    if what == "encode" and tiling is not None and tiling.temporal_overlap:
        return  # encoding keeps the release's temporal tiling
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 7, 9, 7, generator=g) if what == "decode" else torch.rand(3, 24, 36, 28, generator=g) * 2 - 1
    run = getattr(small, what)
    expected = run(x, tiling)
    polls = []
    assert torch.equal(run(x, tiling, stop=lambda: polls.append(1)), expected)
    original = getattr(small, f"{what}_tile")
    tiles = []

    def counted(t):
        tiles.append(len(polls))  # the polls made before this tile
        return original(t)

    setattr(small, f"{what}_tile", counted)
    try:
        polls.clear()
        run(x, tiling, stop=lambda: polls.append(1))
    finally:
        del small.__dict__[f"{what}_tile"]
    assert tiles == list(range(1, len(tiles) + 1)) and len(polls) == len(tiles)
    assert len(tiles) == (1 if tiling is None else len(tiles)) and (tiling is None or len(tiles) > 4)


@pytest.mark.parametrize("what", ["decode", "encode"])
def test_interrupt_between_tiles_releases_everything(small, what):
    import gc
    import weakref

    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 10, 9, 7, generator=g) if what == "decode" else torch.rand(3, 24, 36, 28, generator=g) * 2 - 1
    tiling = (VAETiling(height=16, width=16, length=16, temporal_overlap=0.5) if what == "decode"
              else VAETiling(height=16, width=16))
    run = getattr(small, what)
    expected = run(x, tiling)
    original = getattr(small, f"{what}_tile")
    made = []

    def tracked(t):
        out = original(t)
        made.append(weakref.ref(out))
        if what == "decode":  # a view of the scaled float32 copy of the latent
            made.append(weakref.ref(t._base))
        return out

    count = [0]

    def stop():
        count[0] += 1
        if count[0] == 9:  # inside the third temporal tile of the decode, the second slab of the encode
            raise _Stop()

    setattr(small, f"{what}_tile", tracked)
    try:
        with pytest.raises(_Stop) as info:
            run(x, tiling, stop=stop)
    finally:
        del small.__dict__[f"{what}_tile"]
    gc.collect()
    assert info.value.__traceback__ is not None and len(made) == (16 if what == "decode" else 8)
    assert all(ref() is None for ref in made)  # the tiles and the scaled input, even while the traceback lives
    assert torch.equal(run(x, tiling), expected)
