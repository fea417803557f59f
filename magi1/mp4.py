"""Writing a decoded MAGI-1 video as an H.264 mp4 with PyAV (for demo.py and ``python -m magi1``; ComfyUI
saves videos with its own nodes)."""

from __future__ import annotations

import torch

FPS = 24  # MAGI-1's frame rate


def write_mp4(video, path, fps=FPS):
    """``[3, F, H, W]`` in [-1, 1] -> an H.264 mp4 at ``fps``."""
    import av  # PyAV: a requirement of the pack (ComfyUI ships it too); imported here, so only writers need it

    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "16"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
