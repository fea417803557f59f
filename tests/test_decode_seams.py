"""MAGI-1 Decode's temporal tiling (issue 20): the default leaves no seam every 12 frames where the release's
tiles do, on the built-in tiny model; the release's tiling stays one choice away and gives its exact numbers;
both give the release's frame counts; the node passes ComfyUI's interrupt check to the VAE."""

import types

import pytest
import torch

from comfy_stubs import pack_nodes
from magi1 import VAETiling
from magi1 import builtin
from magi1.video.vae import SEAMLESS

SEAMLESS_CHOICE, RELEASED_CHOICE = "seamless", "as released (12 frames, no overlap)"


@pytest.fixture(scope="module")
def pack():
    with pack_nodes() as nodes:
        classes = {node.GET_SCHEMA().node_id: node for node in nodes}
        yield types.SimpleNamespace(**classes)


@pytest.fixture(scope="module")
def vae():
    return builtin.load_tiny_vae()


@pytest.fixture(scope="module")
def generated():
    """A 48-frame tiny generation (12 latent frames: three release tile boundaries)."""
    from demo import sample

    result, _ = sample(frames=48, seed=0)
    return {"samples": result.latent[None]}


def decode(pack, vae, samples, **options):
    return pack.MAGI1Decode.execute(vae=vae, samples=samples, tile_size=256, **options).result[0]


def spike_ratio(images):
    """Mean |frame_t - frame_(t-1)| (0-255) at the release's tile boundaries t = 12, 24, ... over its mean
    at least two frames away from one."""
    d = (images[1:] - images[:-1]).abs().mean(dim=(1, 2, 3)) * 255
    phase = torch.arange(1, images.shape[0]) % 12
    return float(d[phase == 0].mean() / d[(phase >= 2) & (phase <= 10)].mean())


def test_schema_appends_an_optional_temporal_tiling(pack):
    inputs = pack.MAGI1Decode.GET_SCHEMA().inputs
    assert [i.id for i in inputs] == ["vae", "samples", "tile_size", "temporal_tiling"]
    tiling = inputs[-1]
    assert tiling.options["optional"] and tiling.options["default"] == SEAMLESS_CHOICE
    assert tiling.options["options"] == [SEAMLESS_CHOICE, RELEASED_CHOICE]
    assert "flicker" in tiling.options["tooltip"] and "twice" in tiling.options["tooltip"]


def test_default_removes_the_seams_of_the_release_tiling(pack, vae, generated):
    default = decode(pack, vae, generated)
    released = decode(pack, vae, generated, temporal_tiling=RELEASED_CHOICE)
    assert default.shape == released.shape == (48, 64, 64, 3)
    ratios = spike_ratio(default), spike_ratio(released)
    # measured (bench/results/decode_seams.txt, 96 frames): about 1.3 (as the untiled decode) against 2.4
    assert ratios[0] < 1.6 < 2.0 < ratios[1], ratios
    assert torch.equal(decode(pack, vae, generated, temporal_tiling=SEAMLESS_CHOICE), default)  # saved workflows


def test_release_choice_is_the_release_tiling_exactly(pack, vae):
    latent = torch.randn(1, 16, 7, 8, 8, generator=torch.Generator().manual_seed(0))
    images = decode(pack, vae, {"samples": latent}, temporal_tiling=RELEASED_CHOICE)
    expected = vae.decode(latent[0], VAETiling())
    assert torch.equal(images, ((expected.clamp(-1, 1) + 1) / 2).movedim(0, -1))


def test_both_choices_give_the_release_frame_counts(pack, vae):
    g = torch.Generator().manual_seed(1)
    for latent_frames in range(1, 9):
        latent = {"samples": torch.randn(1, 16, latent_frames, 4, 4, generator=g)}
        expected = vae.decoded_frames(latent_frames)  # the release's: 1, 8, 12, 13, 20, 24, 25, 32
        for choice in (SEAMLESS_CHOICE, RELEASED_CHOICE):
            assert decode(pack, vae, latent, temporal_tiling=choice).shape[0] == expected, (latent_frames, choice)
    latent = torch.randn(1, 16, 7, 4, 4, generator=g)
    frames = decode(pack, vae, {"samples": latent})
    assert torch.equal(frames, ((vae.decode(latent[0], SEAMLESS)[:, :25].clamp(-1, 1) + 1) / 2).movedim(0, -1))


def test_decode_and_encode_pass_the_interrupt_check(pack, vae, monkeypatch):
    import sys

    mm = sys.modules[pack.MAGI1Decode.__module__].mm
    calls = []
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", lambda: calls.append(1))
    decode(pack, vae, {"samples": torch.zeros(1, 16, 6, 4, 4)})
    assert len(calls) == 2  # one per tile: 16-frame tiles every 8 frames over 24 frames
    calls.clear()
    pack.MAGI1EncodePrefix.execute(vae=vae, width=32, height=32, prefix_video=torch.rand(24, 32, 32, 3))
    assert len(calls) == 2  # the release's 12-frame tiles

    class Interrupted(Exception):
        pass

    def interrupt():
        raise Interrupted()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupt)
    with pytest.raises(Interrupted):
        decode(pack, vae, {"samples": torch.zeros(1, 16, 6, 4, 4)})
    with pytest.raises(Interrupted):
        pack.MAGI1EncodePrefix.execute(vae=vae, width=32, height=32, start_image=torch.rand(1, 32, 32, 3))


def test_seamless_choice_is_the_library_constant(pack):
    import sys

    import dataclasses

    module = sys.modules[pack.MAGI1Decode.__module__]  # the pack's own copy of magi1: compare the values
    tilings = {name: dataclasses.astuple(tiling) for name, tiling in module.TEMPORAL_TILINGS.items()}
    assert tilings == {SEAMLESS_CHOICE: dataclasses.astuple(SEAMLESS), RELEASED_CHOICE: dataclasses.astuple(VAETiling())}
