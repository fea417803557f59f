"""Writing a decoded MAGI-1 video as an H.264 mp4 with PyAV (for demo.py and ``python -m magi1``; ComfyUI
saves videos with its own nodes)."""

from __future__ import annotations

import torch

FPS = 24  # MAGI-1's frame rate
CRF = "16"


class Mp4Writer:
    """An H.264 mp4 (libx264, crf 16, yuv420p) written as the video comes: ``write`` takes pieces
    ``[3, k, H, W]`` in [-1, 1] (e.g. what a ``StreamingDecode`` returns) and encodes them at once, so
    memory stays flat however long the video. The first piece sets the size; ``H`` and ``W`` must be
    even (yuv420p). Use it as a context manager, or call ``close``, which flushes the encoder."""

    def __init__(self, path, fps=FPS):
        import av  # PyAV: a requirement of the pack (ComfyUI ships it too); imported here, so only writers need it

        self._av = av
        self.fps = fps
        self.frames = 0  # written so far
        self._container = av.open(str(path), mode="w")
        self._stream = None  # added with the first piece, which gives the size

    def write(self, frames):
        """Encode the next frames, ``[3, k, H, W]`` in [-1, 1] (``k`` may be 0)."""
        if self._container is None:
            raise ValueError("this mp4 is already closed")
        pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
        pixels = pixels.contiguous().cpu().numpy()  # [k, H, W, 3]
        if self._stream is None:
            stream = self._container.add_stream("libx264", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
            stream.options = {"crf": CRF}
            self._stream = stream
        elif pixels.shape[1:3] != (self._stream.height, self._stream.width):
            raise ValueError(f"frames of {pixels.shape[1]}x{pixels.shape[2]} in a {self._stream.height}x"
                             f"{self._stream.width} video")
        for frame in pixels:
            self._container.mux(self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += len(pixels)

    def close(self):
        """Flush the encoder and finish the file (again: nothing)."""
        if self._container is None:
            return
        container, self._container = self._container, None
        try:
            if self._stream is not None:
                container.mux(self._stream.encode())
        finally:
            container.close()

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.close()


def write_mp4(video, path, fps=FPS):
    """``[3, F, H, W]`` in [-1, 1] -> an H.264 mp4 at ``fps``."""
    with Mp4Writer(path, fps) as writer:
        writer.write(video)
