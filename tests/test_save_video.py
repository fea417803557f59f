"""MAGI-1 Decode and Save Video (stand-ins for ComfyUI, tests/comfy_stubs.py): the mp4 holds MAGI-1 Decode's
frames, written piece by piece into the output folder, and the node shows it as ComfyUI's SaveVideo does."""

import av
import numpy as np
import pytest
import torch

from comfy_stubs import pack_namespace
from magi1 import builtin
from magi1.video.mp4 import write_mp4


@pytest.fixture(scope="module")
def pack():
    with pack_namespace() as pack:
        yield pack


@pytest.fixture(scope="module")
def vae():
    return builtin.load_tiny_vae()


def read_mp4(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("latent_frames, tiling", [(12, "seamless"), (7, "seamless"),
                                                   (9, "as released (12 frames, no overlap)")])
def test_the_mp4_holds_magi1_decodes_frames(pack, vae, tmp_path, monkeypatch, latent_frames, tiling):
    folder_paths = pack.modules["save_video"].folder_paths
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    latent = {"samples": torch.randn(1, 16, latent_frames, 8, 8, generator=torch.Generator().manual_seed(latent_frames))}
    images = pack.MAGI1Decode.execute(vae=vae, samples=latent, tile_size=64, temporal_tiling=tiling).result[0]
    out = pack.MAGI1SaveVideo.execute(vae=vae, samples=latent, filename_prefix="long/clip", tile_size=64,
                                      temporal_tiling=tiling)
    path = out.result[0]
    assert path == str(tmp_path / "long" / "clip_00001_.mp4")
    assert out.ui.as_dict() == {"images": [dict(filename="clip_00001_.mp4", subfolder="long", type="output")],
                                "animated": (True,)}
    written = read_mp4(path)
    assert written.shape == images.shape  # MAGI-1 Decode's frame count and size
    write_mp4(images.permute(3, 0, 1, 2) * 2 - 1, tmp_path / "whole.mp4")  # Decode's frames, encoded whole
    whole = read_mp4(tmp_path / "whole.mp4")
    assert np.abs(written.astype(float) - whole).mean() < 2  # the same frames through the same encoder
    again = pack.MAGI1SaveVideo.execute(vae=vae, samples=latent, filename_prefix="long/clip", tile_size=64,
                                        temporal_tiling=tiling).result[0]
    assert again.endswith("clip_00002_.mp4")  # numbered as ComfyUI numbers its outputs


def test_a_prefix_outside_the_output_folder_is_refused(pack, tmp_path, monkeypatch):
    monkeypatch.setattr(pack.modules["save_video"].folder_paths, "output_directory", str(tmp_path))
    problems = pack.MAGI1SaveVideo.validate_inputs(filename_prefix="../elsewhere/clip")
    assert problems is not True and "inside ComfyUI's output folder" in str(problems)
    assert pack.MAGI1SaveVideo.validate_inputs(filename_prefix="video/MAGI1", tile_size=256) is True


def test_an_interrupt_leaves_no_file(pack, vae, tmp_path, monkeypatch):
    monkeypatch.setattr(pack.modules["save_video"].folder_paths, "output_directory", str(tmp_path))
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(pack.modules["save_video"].mm, "throw_exception_if_processing_interrupted", interrupt)
    latent = {"samples": torch.randn(1, 16, 24, 8, 8)}
    with pytest.raises(KeyboardInterrupt):
        pack.MAGI1SaveVideo.execute(vae=vae, samples=latent, filename_prefix="clip", tile_size=64)
    assert not any(p.suffix == ".mp4" for p in tmp_path.rglob("*"))
