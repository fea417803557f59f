"""How a video request maps onto MAGI-1's chunks of latent frames and tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .checks import check_int

TEMPORAL_DOWNSAMPLE = 4  # video frames per latent frame


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
        multiple = 8 * patch_size  # VAE downsampling x patch size
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
                nearest = lower if lower and value - lower < upper - value else upper
                raise ValueError(f"{name} must be a multiple of {multiple}; the nearest valid value is {nearest}")
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
