"""MAGI1SaveVideo: MAGI-1 latents decoded and written to an mp4 in ComfyUI's output folder chunk by chunk,
never holding the decoded video whole (a minute of 720p is 8 GB of float32 frames as an image batch). For
long videos; MAGI-1 Decode -> CreateVideo -> SaveVideo stays the path for short ones."""

import dataclasses
import os

import folder_paths
from comfy_api.latest import io, ui

import comfy.model_management as mm
import comfy.utils

from ..magi1.video.video_out import write_video
from .loaders import MAGI1_VAE
from .queue_checks import CheckedNode, output_prefix_problems
from .vae import SEAMLESS_CHOICE, TEMPORAL_TILINGS, check_vae

SUFFIX = ".mp4"


class MAGI1SaveVideo(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1SaveVideo",
            display_name="MAGI-1 Decode and Save Video",
            category="MAGI-1",
            description=("Decodes MAGI-1 latents chunk by chunk and writes each piece to an H.264 mp4 (24 fps) in "
                         "ComfyUI's output folder as it is decoded: memory stays flat however long the video. The "
                         "same frames as MAGI-1 Decode with the same tiling; for long videos."),
            inputs=[
                MAGI1_VAE.Input("vae", tooltip="The MAGI-1 VAE from MAGI-1 VAE Loader."),
                io.Latent.Input("samples", tooltip="Latents from MAGI-1 Sampler."),
                io.String.Input("filename_prefix", default="video/MAGI1", tooltip=(
                    "Where to save, inside ComfyUI's output folder: <prefix>_00001_.mp4 (the number counts up).")),
                io.Int.Input("tile_size", default=256, min=64, max=4096, step=64, tooltip=(
                    "Tile width and height in pixels (256 as released). Smaller uses less GPU memory.")),
                io.Combo.Input("temporal_tiling", options=list(TEMPORAL_TILINGS), default=SEAMLESS_CHOICE,
                               tooltip="As MAGI-1 Decode's: seamless (default) cross-fades overlapping tiles."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The saved mp4's full path (the first, for a batch).")],
            is_output_node=True,
        )

    @classmethod
    def input_rules(cls, values):
        return output_prefix_problems(values)

    @classmethod
    def execute(cls, vae, samples, filename_prefix, tile_size, temporal_tiling=SEAMLESS_CHOICE) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.dim() != 5 or latent.shape[1] != vae.config.z_chans:
            raise ValueError(f"MAGI-1 Decode and Save Video takes MAGI-1 latents [1, {vae.config.z_chans}, T, h, w], "
                             f"got {list(latent.shape)}")
        check_vae(vae)
        tiling = dataclasses.replace(TEMPORAL_TILINGS[temporal_tiling], height=tile_size, width=tile_size)
        keep = vae.decoded_frames(latent.shape[2])  # MAGI-1 Decode's count, whatever the tiling
        height, width = latent.shape[3] * vae.spatial_factor, latent.shape[4] * vae.spatial_factor
        progress = comfy.utils.ProgressBar(latent.shape[0] * latent.shape[2])
        saved, paths = [], []
        for index, clip in enumerate(latent):
            # ComfyUI's own rule for output files: numbered, and kept inside the output folder.
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
                filename_prefix, folder_paths.get_output_directory(), width, height)
            file = f"{name}_{counter:05}_{SUFFIX}"
            os.makedirs(folder, exist_ok=True)
            paths.append(os.path.join(folder, file))
            done = index * latent.shape[2]
            write_video(vae, clip.cpu(), paths[-1], tiling=tiling, keep_frames=keep,
                        stop=mm.throw_exception_if_processing_interrupted,
                        on_piece=lambda made, total, done=done: progress.update_absolute(done + made))
            saved.append(ui.SavedResult(file, subfolder, io.FolderType.output))
        return io.NodeOutput(paths[0], ui=ui.PreviewVideo(saved))
