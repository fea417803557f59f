"""MAGI1Sampler: the autoregressive MAGI-1 sampler as a node; MAGI1Decode: latents to frames."""

import logging

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from ..magi1 import Guidance, VAETiling, VideoLayout, chunk_captions, generate
from .cache_policy import POLICY_KEY
from .loaders import MAGI1_VAE
from .t5 import special_tokens

T5_WIDTH = 4096  # what the official checkpoints read


def conditioning_states(conditioning, name, width):
    """The text states ``(L, D)`` and mask ``(L,)`` of the first entry of a CONDITIONING, checked against
    the width the DiT reads (4096 for T5-XXL, 64 for the tiny demo model)."""
    if not conditioning:
        raise ValueError(f"{name} is empty; connect MAGI-1 Text Encode")
    states, options = conditioning[0][0], conditioning[0][1]
    mask = options.get("attention_mask")
    if mask is None:
        raise ValueError(f"{name} has no attention mask: encode the prompt with MAGI-1 Text Encode (T5-XXL loaded "
                         "with CLIPLoader, type 'mochi')")
    if states.shape[-1] != width:
        raise ValueError(
            f"{name} holds {states.shape[-1]}-wide text states but this model reads {width}-wide ones: encode the "
            "prompt with " + ("MAGI-1 Tiny Text Encode (the built-in tiny model has its own text encoder)"
                              if width != T5_WIDTH else "MAGI-1 Text Encode and T5-XXL (CLIPLoader, type 'mochi')"))
    return states[0], mask[0]


def check_vae(vae, config):
    """The VAE must make the latents this DiT denoises: 16 channels, 8x smaller, 4x fewer frames."""
    if (vae.config.z_chans, vae.spatial_factor, vae.temporal_factor) != (config.latent_channels, 8, 4):
        raise ValueError(f"this VAE ({vae.config.z_chans} channels, {vae.spatial_factor}x/{vae.temporal_factor}x) "
                         f"does not match the MAGI-1 DiT ({config.latent_channels} channels, 8x/4x): load the "
                         "MAGI-1 VAE (ckpt/vae/diffusion_pytorch_model.safetensors) with MAGI-1 VAE Loader")


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


class MAGI1Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1Sampler",
            display_name="MAGI-1 Sampler",
            category="MAGI-1",
            description=("Generates a MAGI-1 video chunk by chunk (text-to-video, or from a start image or a prefix "
                         "video), applying the model's cache policy if MAGI-1 MotionDetailCache set one."),
            inputs=[
                io.Model.Input("model", tooltip="A MAGI-1 model from MAGI-1 DiT Loader (optionally through the cache)."),
                io.Conditioning.Input("positive", tooltip="The prompt, from MAGI-1 Text Encode."),
                io.Int.Input("width", default=720, min=16, max=4096, step=16, tooltip=(
                    "Video width in pixels, a multiple of 16. Memory and time grow with width x height.")),
                io.Int.Input("height", default=720, min=16, max=4096, step=16, tooltip="Video height in pixels, a multiple of 16."),
                io.Int.Input("frames", default=96, min=4, max=4096, step=4, tooltip=(
                    "Frames to generate (24 per second); made in chunks of 24 frames, so the count is "
                    "rounded up to whole chunks.")),
                io.Int.Input("steps", default=16, min=1, max=1000, tooltip=(
                    "Denoising steps per chunk: 64 as released for base models; 8, 12 or 16 for distilled ones. "
                    "More = slower, usually cleaner.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=(
                    "The noise seed; the same seed gives the same video on any device.")),
                io.Float.Input("guidance", default=7.5, min=0.0, max=30.0, step=0.1, tooltip=(
                    "Text guidance of base models (3 passes) while a chunk is below t = 0.3; the release uses 7.5. "
                    "Higher follows the prompt more, with harsher colours. Distilled models ignore it.")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "Optional negative prompt for base models; without it the learned null caption is used, "
                    "as released.")),
                MAGI1_VAE.Input("vae", optional=True, tooltip="Needed to encode a start image or prefix video."),
                io.Image.Input("start_image", optional=True, tooltip=(
                    "Image-to-video: the first frame (needs vae); resized to width x height.")),
                io.Image.Input("prefix_video", optional=True, tooltip=(
                    "Video continuation: frames to continue from (needs vae); resized to width x height. The "
                    "VAE encodes 1, 4, 8, 12, 13, 16, ... frames: longer clips keep their last such count.")),
                io.Latent.Input("prefix_latent", optional=True, tooltip=(
                    "Video continuation from MAGI-1 latents instead of frames (no vae needed).")),
                io.Boolean.Input("record_masks", default=False, optional=True, tooltip=(
                    "Output one frame per step showing where the cache computed (white) or reused (black).")),
                io.Boolean.Input("kv_offload", default=False, optional=True, tooltip=(
                    "Keep the KV cache in CPU memory: fits longer videos on small GPUs, a little slower.")),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The generated MAGI-1 latents, for MAGI-1 Decode."),
                io.String.Output(display_name="cache_report", tooltip="Share of work computed, FLOP saving, time."),
                io.Image.Output(display_name="cache_masks", tooltip=(
                    "With record_masks: per step, chunks as rows of latent frames; white computed, black "
                    "reused, grey idle.")),
            ],
        )

    @classmethod
    def execute(cls, model, positive, width, height, frames, steps, seed, guidance, negative=None, vae=None,
                start_image=None, prefix_video=None, prefix_latent=None, record_masks=False,
                kv_offload=False) -> io.NodeOutput:
        policy = model.model_options.get("transformer_options", {}).get(POLICY_KEY)
        dit = getattr(model.model, "diffusion_model", None)
        if not hasattr(dit, "y_embedder"):
            raise ValueError("MAGI-1 Sampler needs a model from MAGI-1 DiT Loader")
        config = dit.config
        if vae is not None:
            check_vae(vae, config)
        VideoLayout.plan(frames, height, width, patch_size=config.patch_size)  # a size it takes, before encoding
        prefix = cls.prefix(vae, start_image, prefix_video, prefix_latent, width, height)
        mm.load_models_gpu([model], force_full_load=True)
        layout = VideoLayout.plan(frames, height, width, prefix_frames=0 if prefix is None else prefix.shape[1],
                                  patch_size=config.patch_size)
        chunks = layout.chunk_num - layout.chunk_offset
        states, mask = conditioning_states(positive, "positive", config.caption_channels)
        tokens = getattr(model.model, "special_tokens", None) or special_tokens()
        caption, caption_mask = chunk_captions(states, mask, chunks, tokens, length=config.caption_max_length)
        negative_caption = negative_mask = None
        if negative is not None:
            negative_caption, negative_mask = chunk_captions(
                *conditioning_states(negative, "negative", config.caption_channels), chunks,
                length=config.caption_max_length)
        text_scales = (guidance, guidance, guidance, 0.0, 0.0)
        progress = comfy.utils.ProgressBar(1)

        def on_step(step):  # ComfyUI's interrupt point; the sampler frees its state when it raises
            mm.throw_exception_if_processing_interrupted()
            progress.update_absolute(step.step + 1, step.total)

        result = generate(dit, caption, caption_mask, frames=frames, height=height, width=width, steps=steps,
                          seed=seed, negative_caption=negative_caption, negative_mask=negative_mask, prefix=prefix,
                          guidance=Guidance(text_scales=text_scales), policy=policy, kv_offload=kv_offload,
                          on_step=on_step, record_masks=record_masks)
        latent = {"samples": result.latent[None].to(mm.intermediate_device())}
        if record_masks:
            masks = result.stats.masks.frames()[..., None].expand(-1, -1, -1, 3).contiguous()
        else:
            masks = torch.zeros(1, 8, 8, 3)
        return io.NodeOutput(latent, result.stats.summary(), masks)

    @staticmethod
    def prefix(vae, start_image, prefix_video, prefix_latent, width, height):
        """The clean latents to start from ([16, P, h, w]), or None for text-to-video. Images are resized
        to the video size (stretched, as the release does); a prefix video keeps its last frames that
        the VAE can encode in whole tiles (1, 4, 8, 12, 13, 16, ...)."""
        given = [name for name, value in (("start_image", start_image), ("prefix_video", prefix_video),
                                          ("prefix_latent", prefix_latent)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"connect one of start_image, prefix_video and prefix_latent, not {given}")
        if prefix_latent is not None:
            return prefix_latent["samples"][0].float()
        images = start_image[:1] if start_image is not None else prefix_video
        if images is None:
            return None
        if vae is None:
            raise ValueError(f"{given[0]} needs the MAGI-1 VAE: connect MAGI-1 VAE Loader to vae")
        usable = max(n for n in range(1, images.shape[0] + 1) if vae.encodable_frames(n))
        if usable < images.shape[0]:
            logging.warning("MAGI-1 Sampler: the prefix video has %d frames; continuing from its last %d (the VAE "
                            "encodes 1, 4, 8, 12, 13, 16, ... frames)", images.shape[0], usable)
        images = fit_frames(images[images.shape[0] - usable:], width, height)
        return vae.encode(images_to_video(images.to(vae.device)), VAETiling()).cpu()


class MAGI1Decode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1Decode",
            display_name="MAGI-1 Decode",
            category="MAGI-1",
            description="Decodes MAGI-1 latents into frames, in tiles as released. Feed the frames to CreateVideo.",
            inputs=[
                MAGI1_VAE.Input("vae", tooltip="The MAGI-1 VAE from MAGI-1 VAE Loader."),
                io.Latent.Input("samples", tooltip="Latents from MAGI-1 Sampler."),
                io.Int.Input("tile_size", default=256, min=64, max=4096, step=64, tooltip=(
                    "Tile width and height in pixels (256 as released). Smaller uses less GPU memory.")),
            ],
            outputs=[io.Image.Output(tooltip="The video frames (24 per second).")],
        )

    @classmethod
    def execute(cls, vae, samples, tile_size) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.dim() != 5 or latent.shape[1] != vae.config.z_chans:
            raise ValueError(f"MAGI-1 Decode takes MAGI-1 latents [1, {vae.config.z_chans}, T, h, w], got "
                             f"{list(latent.shape)}")
        frames = [vae.decode(clip_latent, VAETiling(height=tile_size, width=tile_size),
                             output_device=mm.intermediate_device()) for clip_latent in latent]
        return io.NodeOutput(torch.cat([video_to_images(video) for video in frames]))
