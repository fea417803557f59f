"""Live previews (magi1/video/preview.py, nodes/preview.py): the latent-to-RGB projection fitted from a VAE
recovers a known linear map, reproduces the tiny VAE's solid colours, and a preview of a real tiny run
looks like the VAE's decoding of the same latents; the ComfyUI side sends ComfyUI's preview tuple, honours
``--preview-method none`` and fits once per VAE."""

import importlib
import sys
import types
from enum import Enum

import pytest
import torch
from PIL import Image

import magi1
import run_request
from comfy_stubs import pack_nodes
from magi1 import builtin
from magi1.video import preview


class LinearVAE:
    """A stand-in VAE whose encoding is a known affine function of the pixels plus noise."""

    def __init__(self, channels=16, noise=0.01, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, 3, generator=g)
        self.offset = torch.randn(channels, generator=g)
        self.noise, self.generator = noise, g
        self.device = torch.device("cpu")

    def encode(self, video, tiling):
        b, _, f, h, w = video.shape
        z = torch.einsum("zc,bcfhw->bzfhw", self.weight, video[:, :, :1, ::8, ::8]) + self.offset[:, None, None, None]
        return z + self.noise * torch.randn(z.shape, generator=self.generator)


def psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def vae():
    return builtin.load_tiny_vae()


# ------------------------------------------------------------------------------------------- the fit
def test_the_fit_recovers_a_known_linear_map():
    fake = LinearVAE()
    exact = preview.fit_rgb_projection(fake, ridge=0.0)
    # pixels v = 2c - 1 in [-1, 1] give z = W v + o: the projection must undo that, M (W (2c - 1) + o) + b = c
    assert torch.allclose(2 * exact.matrix @ fake.weight, torch.eye(3), atol=0.01)
    colours = torch.rand(50, 3, generator=torch.Generator().manual_seed(1))
    latents = (2 * colours - 1) @ fake.weight.T + fake.offset
    assert (latents @ exact.matrix.T + exact.bias - colours).abs().max() < 0.01
    # the default ridge shrinks the map a little, no more
    ridged = preview.fit_rgb_projection(fake)
    assert (latents @ ridged.matrix.T + ridged.bias - colours).abs().mean() < 0.02


def test_projection_of_the_tiny_vaes_solid_colours_is_close_to_them(vae):
    projection = preview.fit_rgb_projection(vae)
    assert projection.matrix.shape == (3, 16) and projection.bias.shape == (3,)
    assert preview.fit_error(vae, projection) < 0.05  # measured 0.038 (0 to 1 scale)
    held_out = torch.rand(40, 3, generator=torch.Generator().manual_seed(2))  # colours not in the fit grid
    latents = preview.encode_colours(vae, held_out)
    assert (latents @ projection.matrix.T + projection.bias - held_out).abs().mean() < 0.05
    # one frame of a solid colour projects to that colour, as uint8
    image = preview.project(vae.encode(torch.tensor([1.0, -1.0, -1.0])[:, None, None, None].expand(3, 1, 32, 32),
                                       None)[:, 0], projection)
    assert image.dtype == torch.uint8 and image.shape == (4, 4, 3)
    assert image[..., 0].float().mean() > 200 and image[..., 1:].float().mean() < 60


def test_the_fit_is_cached_per_vae(vae, monkeypatch):
    calls = []
    fit = preview.fit_rgb_projection
    monkeypatch.setattr(preview, "fit_rgb_projection", lambda v: calls.append(v) or fit(v))
    other = LinearVAE()
    first = preview.projection_for(other)
    assert preview.projection_for(other) is first and len(calls) == 1
    preview.projection_for(LinearVAE(seed=3))
    assert len(calls) == 2


def test_preview_frame_is_the_middle_of_the_first_chunk():
    latents = torch.arange(12.0).view(1, 12, 1, 1).expand(16, 12, 2, 2)  # two chunks of 6 frames
    assert preview.preview_frame(latents, (3, 5))[0, 0, 0] == 3
    assert preview.preview_frame(latents[:, :6], (4, 5))[0, 0, 0] == 3
    assert preview.project(latents, preview.RGBProjection(torch.zeros(3, 16), torch.ones(3))).shape == (12, 2, 2, 3)


# ------------------------------------------------------------------------------------ a real tiny run
@pytest.fixture(scope="module")
def run_steps():
    dit, encoder = builtin.load_tiny_dit(), builtin.load_tiny_text_encoder()
    states, mask = encoder.encode(builtin.TINY.example_prompt)
    chunks = magi1.VideoLayout.plan(24, builtin.SIZE, builtin.SIZE).chunk_num
    caption, caption_mask = magi1.chunk_captions(states, mask, chunks, builtin.tiny_special_tokens())
    steps = []
    run_request.generate(dit, caption, caption_mask, frames=24, height=builtin.SIZE, width=builtin.SIZE, steps=builtin.STEPS,
                   seed=0, on_step=steps.append)
    return steps


def test_the_preview_of_a_tiny_run_looks_like_the_decoded_frame(vae, run_steps):
    projection = preview.projection_for(vae)
    for step in (run_steps[len(run_steps) // 2], run_steps[-1]):
        frame = preview.preview_frame(step.preview, step.chunks)
        shown = preview.project(frame, projection).float().div(255).permute(2, 0, 1)  # [3, h, w]
        k = step.preview.shape[1] // (step.chunks[1] - step.chunks[0]) // 2  # the latent frame shown
        video = vae.decode(step.preview, None)  # the same latents decoded: 4 video frames per latent frame
        decoded = ((video[:, 4 * k:4 * k + 4].mean(1) + 1) / 2).clamp(0, 1)
        target = torch.nn.functional.avg_pool2d(decoded, 8)  # at latent resolution
        correlation = torch.corrcoef(torch.stack([shown.flatten(), target.flatten()]))[0, 1]
        assert psnr(shown, target) > 24 and correlation > 0.95, (step.step, psnr(shown, target), correlation)


# --------------------------------------------------------------------------------- the ComfyUI side
class PreviewMethod(Enum):  # comfy.cli_args.LatentPreviewMethod
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


@pytest.fixture
def live(monkeypatch):
    """nodes/preview.py imported with the stand-ins (and a stand-in comfy.cli_args if they lack one),
    its ``args`` replaced by a namespace the test sets."""
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.LatentPreviewMethod = PreviewMethod
    cli_args.args = types.SimpleNamespace(preview_method=PreviewMethod.Auto, preview_size=512)
    if "comfy.cli_args" not in sys.modules:
        monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    with pack_nodes() as nodes:
        package = nodes[0].__module__.rsplit(".", 2)[0]
        module = importlib.import_module(f"{package}.nodes.preview")
        monkeypatch.setattr(module, "args", cli_args.args)
        monkeypatch.setattr(module, "LatentPreviewMethod", PreviewMethod)
        yield module


def test_live_preview_sends_comfyuis_preview_tuple(live, vae, run_steps):
    previewer = live.LivePreview(vae)
    kind, image, size = previewer(run_steps[-1])
    assert (kind, size) == ("JPEG", 512) and isinstance(image, Image.Image)
    assert image.size == (builtin.SIZE // 8, builtin.SIZE // 8) and image.mode == "RGB"
    pack_preview = sys.modules[live.__name__.replace(".nodes.preview", ".magi1.video.preview")]  # the pack's own magi1.video.preview
    assert previewer.projection is pack_preview.projection_for(vae)  # fitted once, shared


def test_no_previews_without_a_vae_or_when_comfyui_turns_them_off(live, vae, run_steps):
    assert live.LivePreview(None)(run_steps[-1]) is None
    live.args.preview_method = PreviewMethod.NoPreviews
    assert not live.LivePreview(vae).enabled and live.LivePreview(vae)(run_steps[-1]) is None
    for method in (PreviewMethod.Latent2RGB, PreviewMethod.TAESD):  # no TAESD for MAGI-1: the projection
        live.args.preview_method = method
        assert live.LivePreview(vae)(run_steps[-1]) is not None


def test_live_preview_refuses_a_vae_that_is_not_magi1s(live):
    wrong = types.SimpleNamespace(config=types.SimpleNamespace(z_chans=4), spatial_factor=8, temporal_factor=4)
    with pytest.raises(ValueError, match="does not match the MAGI-1 DiT"):
        live.LivePreview(wrong)


class RecordingProgressBar:
    """comfy.utils.ProgressBar that keeps what it was sent."""

    sent = []

    def __init__(self, total, node_id=None):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        RecordingProgressBar.sent.append((value, total, preview))


def test_the_sampler_node_sends_previews_with_a_preview_vae(live, vae, monkeypatch):
    sampler = sys.modules[live.__name__.replace(".preview", ".sampler")]
    if "preview_vae" not in [i.id for i in sampler.MAGI1Sampler.define_schema().inputs]:
        pytest.skip("MAGI-1 Sampler has no preview_vae input yet")
    loaders = sys.modules[live.__name__.replace(".preview", ".loaders")]
    model = loaders.MAGI1DiTLoader.execute(checkpoint="MAGI-1 tiny demo (built-in)", variant="auto",
                                           weight_dtype="auto", attention="auto").result[0]
    monkeypatch.setattr(sampler.comfy.utils, "ProgressBar", RecordingProgressBar)
    RecordingProgressBar.sent = []
    positive = [[torch.randn(1, 5, 64), {"attention_mask": torch.ones(1, 5, dtype=torch.bool)}]]
    request = dict(model=model, positive=positive, width=64, height=64, frames=24, steps=4, seed=0, guidance=5.0)
    sampler.MAGI1Sampler.execute(**request, preview_vae=vae)
    assert [v for v, _, _ in RecordingProgressBar.sent] == [1, 2, 3, 4]
    assert all(p[0] == "JPEG" and p[1].size == (8, 8) for _, _, p in RecordingProgressBar.sent)
    RecordingProgressBar.sent = []
    sampler.MAGI1Sampler.execute(**request)  # no VAE: progress without previews
    assert RecordingProgressBar.sent and all(p is None for _, _, p in RecordingProgressBar.sent)
