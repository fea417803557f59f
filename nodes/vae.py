"""The MAGI-1 VAE outside the sampler, as ComfyUI's Wan nodes do it: MAGI1EncodePrefix turns a start image
or a prefix video into the clean latents MAGI-1 Sampler continues from; MAGI1Decode turns latents into
frames."""

import dataclasses
import logging

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..magi1 import VAETiling
from ..magi1.sampling.layout import check_pixel_size
from ..magi1.video.vae import SEAMLESS
from .loaders import MAGI1_VAE
from .queue_checks import CheckedNode

LATENT_CHANNELS = 16  # what every MAGI-1 DiT reads (the 24B duplicates them into its 32 input channels)
# MAGI-1 Decode's temporal tilings (the names are saved in workflows: keep them). The default overlaps its
# 16-frame tiles by half and cross-fades them (bench/results/decode_seams.txt); the release's tiles leave a seam.
SEAMLESS_CHOICE, RELEASED_CHOICE = "seamless", "as released (12 frames, no overlap)"
TEMPORAL_TILINGS = {SEAMLESS_CHOICE: SEAMLESS, RELEASED_CHOICE: VAETiling()}


def check_vae(vae):
    """The VAE must make the latents MAGI-1 denoises: 16 channels, 8x smaller, 4x fewer frames."""
    if (vae.config.z_chans, vae.spatial_factor, vae.temporal_factor) != (LATENT_CHANNELS, 8, 4):
        raise ValueError(f"this VAE ({vae.config.z_chans} channels, {vae.spatial_factor}x/{vae.temporal_factor}x) "
                         f"does not match the MAGI-1 DiT ({LATENT_CHANNELS} channels, 8x/4x): load the "
                         "MAGI-1 VAE (ckpt/vae/diffusion_pytorch_model.safetensors) with MAGI-1 VAE Loader")


def one_of(has_start_image, has_prefix_video):
    """``{input: message}`` unless exactly one of start_image and prefix_video is connected."""
    if has_start_image and has_prefix_video:
        return {"prefix_video": "connect start_image or prefix_video, not both (a start image is a prefix video of "
                                "one frame): disconnect one"}
    if not (has_start_image or has_prefix_video):
        return {"start_image": "connect start_image (image-to-video) or prefix_video (video continuation); for "
                               "text-to-video leave MAGI-1 Sampler's prefix_latent unconnected instead"}
    return {}


def size_problems(values, checks=None):
    """``{input: message}`` for a width or height MAGI-1 does not take (multiples of 16), or what else
    ``checks`` (``{input: check(name, value)}``, raising ValueError) refuses; linked inputs (None) are left
    to execution."""
    problems = {}
    for name, check in (checks or {"width": check_pixel_size, "height": check_pixel_size}).items():
        if values.get(name) is not None:
            try:
                check(name, values[name])
            except ValueError as error:
                problems[name] = str(error)
    return problems


def fit_frames(images, width, height):
    """IMAGE frames resized to ``width`` x ``height`` (bicubic, stretched like the release's ffmpeg scale)."""
    if tuple(images.shape[1:3]) == (height, width):
        return images
    resized = comfy.utils.common_upscale(images.movedim(-1, 1), width, height, "bicubic", "disabled")
    return resized.movedim(1, -1).clamp(0.0, 1.0)


def images_to_video(images):
    """ComfyUI IMAGE ``[F, H, W, 3]`` in 0..1 -> ``[3, F, H, W]`` in [-1, 1]."""
    return images.movedim(-1, 0) * 2.0 - 1.0


def video_to_images(video):
    """``[3, F, H, W]`` in about [-1, 1] -> IMAGE ``[F, H, W, 3]`` in 0..1."""
    return ((video.clamp(-1.0, 1.0) + 1.0) / 2.0).movedim(0, -1).contiguous()


class MAGI1EncodePrefix(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1EncodePrefix",
            display_name="MAGI-1 Encode Prefix",
            category="MAGI-1",
            description=("Image-to-video and video continuation: encodes a start image or the frames of a video "
                         "with the MAGI-1 VAE, resized to the video size, into the prefix_latent of MAGI-1 Sampler."),
            inputs=[
                MAGI1_VAE.Input("vae", tooltip="The MAGI-1 VAE from MAGI-1 VAE Loader."),
                io.Int.Input("width", default=720, min=16, max=4096, step=16, tooltip=(
                    "Width of the video to make, in pixels: the same as MAGI-1 Sampler's width. The frames "
                    "are stretched to width x height.")),
                io.Int.Input("height", default=720, min=16, max=4096, step=16, tooltip=(
                    "Height of the video to make, in pixels: the same as MAGI-1 Sampler's height.")),
                io.Image.Input("start_image", optional=True, tooltip=(
                    "Image-to-video: the first frame of the video (of a batch, the first image only). "
                    "Connect this or prefix_video.")),
                io.Image.Input("prefix_video", optional=True, tooltip=(
                    "Video continuation: the frames to continue from (e.g. GetVideoComponents' images). The "
                    "VAE encodes 1, 4, 8, 12, 13, 16, ... frames: longer clips keep their last such count; "
                    "under 8 frames make one latent frame, continued like a start image. "
                    "Connect this or start_image.")),
            ],
            outputs=[io.Latent.Output(display_name="prefix_latent", tooltip=(
                "The clean MAGI-1 latents of the prefix, for MAGI-1 Sampler's prefix_latent."))],
        )

    @classmethod
    def input_rules(cls, values):
        # ComfyUI passes a connected input (None: not made yet) and leaves an unconnected optional one out.
        return {**one_of("start_image" in values, "prefix_video" in values), **size_problems(values)}

    @classmethod
    def execute(cls, vae, width, height, start_image=None, prefix_video=None) -> io.NodeOutput:
        problems = one_of(start_image is not None, prefix_video is not None)
        if problems:
            raise ValueError(next(iter(problems.values())))
        check_vae(vae)
        for name, value in (("width", width), ("height", height)):
            check_pixel_size(name, value)  # a size MAGI-1 takes (multiples of 16), before encoding
        images = start_image[:1] if start_image is not None else prefix_video
        # Temporal tiles of 1 or a multiple of 4 frames: keep the last frames that fit, the ones continued from.
        usable = max(n for n in range(1, images.shape[0] + 1) if vae.encodable_frames(n))
        if usable < images.shape[0]:
            logging.warning("MAGI-1 Encode Prefix: the prefix video has %d frames; continuing from its last %d (the "
                            "VAE encodes 1, 4, 8, 12, 13, 16, ... frames)", images.shape[0], usable)
        images = fit_frames(images[images.shape[0] - usable:], width, height)
        latent = vae.encode(images_to_video(images.to(vae.device)), VAETiling(),
                            stop=mm.throw_exception_if_processing_interrupted)
        return io.NodeOutput({"samples": latent[None].to(mm.intermediate_device())})


class MAGI1Decode(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1Decode",
            display_name="MAGI-1 Decode",
            category="MAGI-1",
            description=("Decodes MAGI-1 latents into frames, in tiles (by default overlapping in time, so that no "
                         "seam shows every 12 frames). Feed the frames to CreateVideo."),
            inputs=[
                MAGI1_VAE.Input("vae", tooltip="The MAGI-1 VAE from MAGI-1 VAE Loader."),
                io.Latent.Input("samples", tooltip="Latents from MAGI-1 Sampler."),
                io.Int.Input("tile_size", default=256, min=64, max=4096, step=64, tooltip=(
                    "Tile width and height in pixels (256 as released). Smaller uses less GPU memory.")),
                io.Combo.Input("temporal_tiling", options=list(TEMPORAL_TILINGS), default=SEAMLESS_CHOICE,
                               optional=True, tooltip=(
                    "How the frames are split into tiles in time. seamless (default): 16-frame tiles (the "
                    "VAE's training length) overlapping by 8 frames and cross-faded, so no jump shows at tile "
                    "boundaries; about twice the release's decode time, a third more memory per tile. as "
                    "released: 12-frame tiles without overlap, the official pipeline's numbers; cheapest, "
                    "but a visible jump (flicker) every 12 frames. Both give the same number of frames.")),
            ],
            outputs=[io.Image.Output(tooltip="The video frames (24 per second).")],
        )

    @classmethod
    def execute(cls, vae, samples, tile_size, temporal_tiling=SEAMLESS_CHOICE) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.dim() != 5 or latent.shape[1] != vae.config.z_chans:
            raise ValueError(f"MAGI-1 Decode takes MAGI-1 latents [1, {vae.config.z_chans}, T, h, w], got "
                             f"{list(latent.shape)}")
        if temporal_tiling not in TEMPORAL_TILINGS:
            raise ValueError(f"MAGI-1 Decode's temporal_tiling must be one of {list(TEMPORAL_TILINGS)}, got "
                             f"{temporal_tiling!r}")
        tiling = dataclasses.replace(TEMPORAL_TILINGS[temporal_tiling], height=tile_size, width=tile_size)
        frames = vae.decoded_frames(latent.shape[2])  # the release's count, whatever the tiling
        videos = [vae.decode(clip_latent, tiling, output_device=mm.intermediate_device(),
                             stop=mm.throw_exception_if_processing_interrupted)[:, :frames] for clip_latent in latent]
        return io.NodeOutput(torch.cat([video_to_images(video) for video in videos]))
