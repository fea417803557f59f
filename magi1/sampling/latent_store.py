"""The latent video of one generation: whole in host memory, and on the compute device only the chunks
the window is denoising, so that device memory does not grow with the video.

Chunks enter the device when a step first reads them (from the noise in host memory), are copied back
to the host once finished (``finish``) and leave the device when the window has passed them
(``drop_before``): copies both ways, so the values are exactly those of a run that keeps the whole video
on the device. On the CPU the host tensor is the device tensor and nothing is copied.
"""

from __future__ import annotations

import torch


class LatentStore:
    """``host`` ``[C, T, h, w]`` float32 (the initial noise, changed in place as chunks finish), in chunks of
    ``chunk_width`` latent frames; ``device``: where the window's chunks are computed."""

    def __init__(self, host, chunk_width, device):
        self.host, self.cw, self.device = host, chunk_width, torch.device(device)
        self.on_host = self.device.type == "cpu"
        self._resident = {}  # chunk -> its [C, cw, h, w] on the device (not used on the CPU)

    def chunks(self, first, end):
        """A new device tensor of the frames of chunks ``[first, end)``."""
        if self.on_host:
            return self.host[:, first * self.cw: end * self.cw].clone()
        return torch.cat([self._chunk(c) for c in range(first, end)], dim=1)

    def write(self, first, frames):
        """Store the device tensor ``frames`` as the chunks from ``first`` on."""
        if self.on_host:
            self.host[:, first * self.cw: first * self.cw + frames.shape[1]] = frames
            return
        for j in range(frames.shape[1] // self.cw):
            self._resident[first + j] = frames[:, j * self.cw:(j + 1) * self.cw].clone()

    def frame(self, index):
        """One latent frame on the device (from the host once its chunk left the device)."""
        chunk, offset = divmod(index, self.cw)
        if chunk in self._resident:
            return self._resident[chunk][:, offset]
        return self.host[:, index].to(self.device)

    def finish(self, chunk):
        """Chunk ``chunk`` took its last step: its frames are final in host memory from now on. Returns them
        (host; a view on the CPU)."""
        frames = slice(chunk * self.cw, (chunk + 1) * self.cw)
        if chunk in self._resident:
            self.host[:, frames].copy_(self._resident[chunk])
        return self.host[:, frames]

    def drop_before(self, chunk):
        """Free the device copies of the chunks before ``chunk`` (finished: their values are in the host)."""
        for c in [c for c in self._resident if c < chunk]:
            del self._resident[c]

    def close(self):
        self._resident.clear()
        self.host = None

    def _chunk(self, chunk):
        if chunk not in self._resident:
            frames = self.host[:, chunk * self.cw:(chunk + 1) * self.cw]
            self._resident[chunk] = frames.to(self.device)  # (host to device: always a copy)
        return self._resident[chunk]
