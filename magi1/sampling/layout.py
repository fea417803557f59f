"""How a video request maps onto MAGI-1's chunks of latent frames and tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import check_int

TEMPORAL_DOWNSAMPLE = 4  # video frames per latent frame


def check_pixel_size(name, value, patch_size=2):
    """A width or height MAGI-1 takes: a multiple of the VAE's 8 x the patch size (16), else an error naming
    the nearest one."""
    multiple = 8 * patch_size
    if value % multiple:
        lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
        nearest = lower if lower and value - lower < upper - value else upper
        raise ValueError(f"{name} must be a multiple of {multiple}; the nearest valid value is {nearest}")
    return value


@dataclass(frozen=True)
class VideoLayout:
    """How a request maps onto chunks of latent frames."""

    chunk_num: int  # chunks of the whole latent video, prefix included
    chunk_offset: int  # leading chunks that are entirely prefix (clean, never denoised)
    chunk_width: int  # latent frames per chunk
    prefix_frames: int  # latent frames given (image: 1, video: its latents)
    latent_height: int
    latent_width: int
    tokens_per_chunk: int

    @classmethod
    def plan(cls, frames, height, width, *, prefix_frames=0, chunk_width=6, patch_size=2):
        """As the official ``extract_feature_for_inference``: ``frames // 4`` new latent frames after the
        prefix, rounded up to whole chunks. ``height`` and ``width`` are in pixels."""
        for name, value in (("frames", frames), ("height", height), ("width", width), ("chunk_width", chunk_width)):
            check_int(name, value, low=1)
        if frames < TEMPORAL_DOWNSAMPLE:
            raise ValueError(f"frames must be at least {TEMPORAL_DOWNSAMPLE} (one latent frame), got {frames}")
        for name, value in (("height", height), ("width", width)):
            check_pixel_size(name, value, patch_size)
        new = frames // TEMPORAL_DOWNSAMPLE
        chunk_num = math.ceil((new + prefix_frames) / chunk_width)
        h, w = height // 8, width // 8
        return cls(chunk_num, prefix_frames // chunk_width, chunk_width, prefix_frames, h, w,
                   chunk_width * (h // patch_size) * (w // patch_size))

    @property
    def latent_frames(self):
        return self.chunk_num * self.chunk_width

    @property
    def output_start(self):
        """First latent frame returned: after the prefix video, but from frame 0 for one image."""
        return 0 if self.prefix_frames == 1 else self.prefix_frames


FRAMES_RULE = ("The video is made in whole chunks of 24 frames (1 s at 24 fps): frames is rounded up to whole "
               "chunks (25 gives 48). A start image is the video's first frame and counts among them (as does a "
               "prefix video of under 8 frames, encoded as one image); after a longer prefix video, frames "
               "counts the new frames, and the prefix with them fills whole chunks.")


def frames_to_generate(frames, prefix_frames=0, chunk_width=6):
    """The ``frames`` argument of ``generate`` / ``VideoLayout.plan`` for a video of ``frames`` frames asked,
    by the one rule every front end states (``FRAMES_RULE``): rounded up to whole latent frames (4 video
    frames each), and with a start image (``prefix_frames`` = 1, returned as the video's first latent
    frame) one latent frame fewer to generate, so that 48 asked give 48 made, as without it."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    latent = -(-int(frames) // TEMPORAL_DOWNSAMPLE)
    if prefix_frames == 1:
        latent = max(1, latent - 1)
    return latent * TEMPORAL_DOWNSAMPLE


def frames_made(latent_frames):
    """Video frames of ``latent_frames`` returned latent frames, as the reports count them."""
    return latent_frames * TEMPORAL_DOWNSAMPLE
