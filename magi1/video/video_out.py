"""A video decoded and written to an mp4 as its latent comes, chunk by chunk: what makes a long video's
host memory flat. Nothing here holds more than a temporal tile's frames; the mp4 encoder takes each piece
as soon as it is decoded."""

from __future__ import annotations

import os

from .mp4 import FPS, Mp4Writer
from .vae import SEAMLESS, StreamingDecode

CHUNK_LATENT_FRAMES = 6  # the pieces an existing latent is fed in: one chunk's latent frames


class StreamedVideo:
    """``generate``'s ``on_frames``: each piece of latent frames is decoded (``StreamingDecode`` with
    ``tiling``, tiles on the VAE's device) and appended to the mp4 at ``path``; ``finish`` writes the end.

    ``total_latent_frames``: the latent's length when known (the last frames then come out with the last
    piece); ``keep_frames``: write at most this many frames (MAGI-1 Decode's count, ``vae.decoded_frames``
    with the release's tiling, which a temporal overlap may exceed for odd lengths). ``stop`` is called
    before every tile. ``abort`` closes and deletes a file left unfinished by an error or interrupt.
    """

    def __init__(self, vae, path, *, tiling=SEAMLESS, total_latent_frames=None, keep_frames=None, stop=None,
                 fps=FPS):
        self.path, self.keep_frames = str(path), keep_frames
        self.decoder = StreamingDecode(vae, tiling, output_device="cpu", stop=stop,
                                       total_latent_frames=total_latent_frames)
        self.writer = Mp4Writer(self.path, fps)

    @property
    def frames(self):
        """Frames written so far."""
        return self.writer.frames

    def __call__(self, latent):
        self._write(self.decoder.feed(latent))

    def finish(self):
        """Write the end and close the file; returns the frames written."""
        self._write(self.decoder.finish())
        self.writer.close()
        return self.frames

    def abort(self):
        self.writer.close()
        if os.path.exists(self.path):
            os.remove(self.path)

    def _write(self, video):
        if self.keep_frames is not None:
            video = video[:, : max(self.keep_frames - self.frames, 0)]
        if video.shape[1]:
            self.writer.write(video)


def write_video(vae, latent, path, *, tiling=SEAMLESS, keep_frames=None, stop=None, on_piece=None, fps=FPS):
    """Decode the latent ``[16, T, h, w]`` (best in host memory: only a tile's latents go to the VAE's device)
    chunk by chunk into the mp4 at ``path``, never holding the decoded video whole; ``on_piece(done, total)``
    after each piece. Returns the frames written; an error or interrupt deletes the unfinished file."""
    total = latent.shape[1]
    video = StreamedVideo(vae, path, tiling=tiling, total_latent_frames=total, keep_frames=keep_frames, stop=stop,
                          fps=fps)
    try:
        for first in range(0, total, CHUNK_LATENT_FRAMES):
            video(latent[:, first:first + CHUNK_LATENT_FRAMES])
            if on_piece is not None:
                on_piece(min(first + CHUNK_LATENT_FRAMES, total), total)
        return video.finish()
    except BaseException:
        video.abort()
        raise
