"""MAGI-1's video VAE ("ViTVAE"): a transformer KL autoencoder; module and parameter names match the
official ``ckpt/vae/diffusion_pytorch_model.safetensors``.

Compression is 8x in space and 4x in time (``patch_size`` / ``patch_length``) into 16 latent channels.
Encoder: a strided Conv3d cuts the video into ``patch_length x patch_size x patch_size`` patches, a class
token and a learned position grid (resized trilinearly to other grids) are added, transformer blocks,
a LayerNorm and a linear map to the posterior's mean and log-variance; the pipeline uses the mean.
Decoder: a linear map from the latent channels, the same token layout and blocks, then the tokens are
unfolded back into pixels and a 3x3x3 convolution gives RGB in about [-1, 1].

A block is ``x + proj(attention(standardize(qkv(x))))`` then ``x + mlp(norm2(x))``: there is no norm
before ``qkv``; instead q, k and v are each standardized per head without affine weights, dividing by
``std + 1e-5`` (not ``sqrt(var + eps)``).

The DiT works on latents times ``LATENT_SCALE``: ``MagiVAE.decode`` / ``encode`` take and give those,
tiled as the release does (``VAETiling``) so that 720p runs in bounded memory.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..network.attention import BACKENDS, attend, resolve_backend
from ..weights.safetensors_io import check_state_dict, file_kind, read_header, read_tensors, refuse_pickle

LATENT_SCALE = 0.18215  # the pipeline multiplies encoded latents by this and divides before decoding
SINGLE_FRAME_REPEAT = 4  # the release encodes a one-frame video as 4 copies of it and keeps latent 0
HEAD_DIM = 64  # the official VAE's head width; used to infer num_heads when no config is given
CONFIG_METADATA_KEY = "magi1_vae_config"  # optional JSON ddconfig in a checkpoint's metadata
STD_EPS = 1e-5

# ddconfig options the release fixes; a config asking for anything else is another architecture.
_FIXED_OPTIONS = dict(qkv_bias=True, ln_in_attn=True, with_cls_token=True, conv_last_layer=True, norm_code=False,
                      use_rope=False, use_final_proj=False)
_IGNORED_OPTIONS = ("qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate")  # no effect at inference


@dataclass(frozen=True)
class VAEConfig:
    """The ``ddconfig`` of the official ``ckpt/vae/config.json`` (the defaults are its values)."""

    in_chans: int = 3
    z_chans: int = 16
    double_z: bool = True
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 8
    patch_length: int = 4
    video_size: int = 256
    video_length: int = 16

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"VAE embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % (self.patch_size ** 2 * self.patch_length):
            raise ValueError(f"VAE embed_dim {self.embed_dim} must be a multiple of patch_size^2 * patch_length "
                             f"= {self.patch_size ** 2 * self.patch_length} (the decoder unfolds tokens into pixels)")

    @classmethod
    def from_dict(cls, config):
        """From ``config.json`` as released (``{"_class_name": "ViTVAE", "ddconfig": {...}}``) or a bare ddconfig."""
        if config.get("_class_name", "ViTVAE") != "ViTVAE":
            raise ValueError(f"not a MAGI-1 VAE config: _class_name is {config['_class_name']!r}, expected 'ViTVAE'")
        if config.get("model_type", "vit") != "vit":
            raise ValueError(f"unsupported MAGI-1 VAE model_type {config['model_type']!r} (only 'vit' was released)")
        dd = dict(config.get("ddconfig", config))
        for key in ("_class_name", "_diffusers_version", "model_type", *_IGNORED_OPTIONS):
            dd.pop(key, None)
        for key, value in _FIXED_OPTIONS.items():
            if key in dd and bool(dd.pop(key)) != value:
                raise ValueError(f"unsupported MAGI-1 VAE option {key}={not value} (the released VAE has {value})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(dd) - known)
        if unknown:
            raise ValueError(f"unknown MAGI-1 VAE config options: {unknown}")
        return cls(**dd)

    def to_dict(self):
        return asdict(self)

    @property
    def position_grid(self):
        """The (frames, rows, columns) token grid the position embedding was trained on."""
        size = self.video_size // self.patch_size
        return self.video_length // self.patch_length, size, size


@dataclass(frozen=True)
class VAETiling:
    """Tile sizes in pixels and frames. The defaults are the release's: 256x256-pixel tiles overlapping by
    a quarter (blended linearly over 64 pixels), 12-frame tiles (``fps // 2`` at 24 fps) without overlap,
    which leave a visible seam every 12 frames (``SEAMLESS`` overlaps them instead). Smaller tiles use less
    memory; ``height``/``width`` must be multiples of the VAE's spatial factor and ``length`` of its
    temporal factor. In decoding, ``temporal_overlap`` is rounded to whole latent frames: temporal tiles of
    ``n = length / 4`` latents advance by ``int(n * (1 - temporal_overlap))`` and cross-fade linearly over
    the frames two of them share. With temporal overlap ``T`` latent frames always decode to ``4 T`` frames
    (1 for ``T = 1``), which is not the count the release's tiler would give for the same tiles
    (``MagiVAE.decoded_frames`` has both rules); without, the counts are the release's."""

    height: int = 256
    width: int = 256
    length: int = 12
    spatial_overlap: float = 0.25
    temporal_overlap: float = 0.0

    def __post_init__(self):
        for name in ("spatial_overlap", "temporal_overlap"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"VAE tiling {name} must be in [0, 1), got {getattr(self, name)}")

    def check(self, spatial, temporal):
        if self.height % spatial or self.width % spatial or self.height < spatial or self.width < spatial:
            raise ValueError(f"VAE tile height/width must be positive multiples of {spatial} pixels, got "
                             f"{self.height}x{self.width}")
        if self.length % temporal or self.length < temporal:
            raise ValueError(f"VAE tile length must be a positive multiple of {temporal} frames, got {self.length}")


# The decode without seams (MAGI-1 Decode's default; bench/results/decode_seams.txt): 16-frame tiles, the VAE's trained
# length, overlapping by half (2 latent frames) and cross-faded over 8 frames. At 720p: 1.4x the release's
# tiles of a third more tokens each, about twice its decoder FLOPs.
SEAMLESS = VAETiling(length=16, temporal_overlap=0.5)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, embed_dim, patch_size, patch_length):
        super().__init__()
        kernel = (patch_length, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, backend):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = standardize(qkv).unbind(dim=2)
        return self.proj(attend(q, k, v, resolve_backend(backend, x.device, x.dtype)).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, backend):
        x = x + self.attn(x, backend)
        return x + self.mlp(layer_norm(self.norm2, x))


class _Transformer(nn.Module):
    """What encoder and decoder share: class token, position grid, blocks and final norm."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        e = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(config.position_grid), e))
        self.blocks = nn.ModuleList(Block(e, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(e)

    def position_embedding(self, grid):
        """The learned grid resized (trilinear, corners not aligned) to ``grid``; the class position kept."""
        if tuple(grid) == self.config.position_grid:
            return self.pos_embed
        cls, table = self.pos_embed[:, :1], self.pos_embed[:, 1:].float()
        table = table.reshape(1, *self.config.position_grid, -1).permute(0, 4, 1, 2, 3)
        table = F.interpolate(table, size=tuple(grid), mode="trilinear", align_corners=False)
        table = table.permute(0, 2, 3, 4, 1).reshape(1, math.prod(grid), -1)
        return torch.cat([cls, table.to(cls.dtype)], dim=1)

    def run(self, tokens, grid, backend):
        """Class token + positions, the blocks and the final norm; returns the tokens without the class token."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = x + self.position_embedding(grid)
        for block in self.blocks:
            x = block(x, backend)
        return layer_norm(self.norm, x)[:, 1:]


class Encoder(_Transformer):
    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.patch_embed = PatchEmbed(config.in_chans, config.embed_dim, config.patch_size, config.patch_length)
        self.last_layer = nn.Linear(config.embed_dim, config.z_chans * (2 if config.double_z else 1))

    def forward(self, video, backend="auto"):
        """Video ``(B, 3, T, H, W)`` in [-1, 1] -> posterior moments ``(B, 2*z, T/4, H/8, W/8)``."""
        x = self.patch_embed.proj(video.to(self.patch_embed.proj.weight.dtype))
        b, _, *grid = x.shape
        x = self.last_layer(self.run(x.flatten(2).transpose(1, 2), grid, backend))
        return x.transpose(1, 2).reshape(b, -1, *grid)


class Decoder(_Transformer):
    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.proj_in = nn.Linear(config.z_chans, config.embed_dim)
        self.unpatch_channels = config.embed_dim // (config.patch_size ** 2 * config.patch_length)
        self.last_layer = nn.Conv3d(self.unpatch_channels, 3, kernel_size=3, padding=1)

    def forward(self, z, backend="auto"):
        """Latent ``(B, z, T, h, w)`` (unscaled) -> video ``(B, 3, 4T, 8h, 8w)`` in about [-1, 1]."""
        b, _, t, h, w = z.shape
        p, pt, c = self.config.patch_size, self.config.patch_length, self.unpatch_channels
        x = self.proj_in(z.to(self.proj_in.weight.dtype).flatten(2).transpose(1, 2))
        x = self.run(x, (t, h, w), backend)
        # each token unfolds into a (patch_length, patch_size, patch_size) block of c-channel pixels
        x = x.reshape(b, t, h, w, pt, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, t * pt, h * p, w * p)
        return self.last_layer(x)


class MagiVAE(nn.Module):
    """The MAGI-1 VAE. ``decode``/``encode`` work on DiT latents (scaled by ``LATENT_SCALE``) with tiling;
    ``decode_tile``/``encode_tile`` are the untiled transforms of the release's ``decode``/``encode``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.attention_backend = "auto"

    @property
    def spatial_factor(self):
        return self.config.patch_size

    @property
    def temporal_factor(self):
        return self.config.patch_length

    @property
    def dtype(self):
        return self.decoder.proj_in.weight.dtype

    @property
    def device(self):
        return self.decoder.proj_in.weight.device

    def set_attention_backend(self, name):
        """``"auto"`` (flash-attn on CUDA when installed, else SDPA), ``"flash"`` or ``"sdpa"``."""
        if name not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
        self.attention_backend = name

    # ------------------------------------------------------------------------------- untiled transforms
    @torch.no_grad()
    def decode_tile(self, z):
        """Unscaled latent ``(B, z, T, h, w)`` -> video ``(B, 3, F, H, W)``; one latent frame gives one video
        frame (the first of the four the decoder makes), as released."""
        video = self.decoder(z.to(self.device), self.attention_backend)
        return video[:, :, :1] if z.shape[2] == 1 else video

    @torch.no_grad()
    def encode_tile(self, video):
        """Video ``(B, 3, F, H, W)`` in [-1, 1] -> the posterior mean ``(B, z, F/4, H/8, W/8)``, unscaled. A
        single frame is encoded as four copies of itself and gives one latent frame."""
        video = video.to(self.device)
        single = video.shape[2] == 1
        if single:
            video = video.expand(-1, -1, SINGLE_FRAME_REPEAT, -1, -1)
        elif video.shape[2] % self.temporal_factor:
            raise ValueError(f"the VAE encodes 1 frame or a multiple of {self.temporal_factor} frames at a time, got "
                             f"{video.shape[2]}")
        mean = self.encoder(video, self.attention_backend)[:, : self.config.z_chans]
        return mean[:, :, :1] if single else mean

    # --------------------------------------------------------------------------------- tiled, DiT scale
    @torch.no_grad()
    def decode(self, latent, tiling: Optional[VAETiling] = VAETiling(), output_device=None, stop=None):
        """DiT latents ``([B,] 16, T, h, w)`` -> video ``([B,] 3, F, 8h, 8w)`` float32 in about [-1, 1].

        Tiled as released by default (``tiling=None`` decodes in one piece, ``SEAMLESS`` overlaps the temporal
        tiles). A temporal tile of one latent frame gives one video frame, so ``T`` latents give
        ``decoded_frames(T, tiling)`` frames. Finished frames go to ``output_device`` (default: the latent's
        device) as they are made. ``stop``, a callable that interrupts by raising (e.g. ComfyUI's interrupt
        check), is called before every tile; an interrupt or error leaves nothing allocated behind it.
        This is a ``StreamingDecode`` fed the whole latent at once (it decodes a video as its chunks come).
        """
        _check_latent(self, latent)
        stream = StreamingDecode(self, tiling, output_device, stop, total_latent_frames=latent.shape[-3])
        try:
            return stream.feed(latent)
        except BaseException as error:
            _drop_locals(error)
            raise

    @torch.no_grad()
    def encode(self, video, tiling: Optional[VAETiling] = VAETiling(), stop=None):
        """Video ``([B,] 3, F, H, W)`` in [-1, 1] -> DiT latents ``([B,] 16, T, H/8, W/8)`` float32 (the
        posterior mean times ``LATENT_SCALE``), tiled as released. Each temporal tile must hold 1 frame or a
        multiple of 4 (``encodable_frames``): 1, 4, 8, 12, 13, 16, ... with the release's 12-frame tiles.
        ``stop`` is called before every tile, as in ``decode``."""
        batched = video.dim() == 5
        x = video if batched else video[None]
        if x.dim() != 5 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"the VAE encodes videos ({self.config.in_chans}, frames, H, W), got {list(video.shape)}")
        frames, (height, width) = x.shape[2], x.shape[3:]
        if not self.encodable_frames(frames, tiling):
            near = [n for n in range(max(frames - 8, 1), frames + 9) if self.encodable_frames(n, tiling)]
            low = max((n for n in near if n < frames), default=None)
            high = min(n for n in near if n > frames)
            raise ValueError(f"the VAE cannot encode {frames} frames: every temporal tile must hold 1 frame or a "
                             f"multiple of {self.temporal_factor}; use {high} frames" +
                             (f" or {low}" if low is not None else ""))
        sf = self.spatial_factor
        if height % sf or width % sf:
            raise ValueError(f"video height and width must be multiples of {sf}, got {height}x{width}")
        try:
            if tiling is None:
                _poll(stop)
                z = self.encode_tile(x)
            else:
                z = _tiled_encode(self, x, tiling, stop)
        except BaseException as error:
            _drop_locals(error)
            raise
        z = z.float() * LATENT_SCALE
        return z if batched else z[0]

    def encodable_frames(self, frames, tiling: Optional[VAETiling] = VAETiling()):
        """Whether ``encode`` takes ``frames`` frames: each temporal tile must hold 1 or a multiple of 4."""
        tf = self.temporal_factor
        if tiling is None:
            return frames == 1 or (frames > 0 and frames % tf == 0)
        stride = int(tiling.length * (1 - tiling.temporal_overlap))
        sizes = [min(tiling.length, frames - start) for start in range(0, frames, max(stride, 1))]
        return frames > 0 and all(n == 1 or n % tf == 0 for n in sizes)

    def decoded_frames(self, latent_frames, tiling: Optional[VAETiling] = VAETiling()):
        """How many video frames ``decode`` makes from ``latent_frames`` latent frames ``T``: 4 per latent
        frame, but a temporal tile of one latent frame gives one.

        Without temporal overlap the tiles are the release's, ``range(0, T, n)`` for tiles of ``n > 1``
        latents: ``4 T``, less 3 when ``T % n == 1`` (a last tile of one latent; 1, 4, 7, ... latents in the
        release's 12-frame tiles). With overlap the tiles stop once one reaches the end, so none is one latent:
        ``4 T`` (1 for ``T = 1``).

        The release's ``TileProcessor.tiled_decode`` (whose pipeline never overlaps in time) counts otherwise
        with overlap: it starts a tile at every multiple of the stride ``s`` below ``T`` and crops each to
        ``c = 4 n - int(4 n * overlap)`` frames, making ``sum(min(frames made, c))`` over those tiles. Where
        ``n * overlap`` is whole (``c = 4 s``, as ``SEAMLESS``) that is ``4 T - 3`` when ``(T - 1) % s == 0``
        (its last tile is one latent, whose one frame becomes a copy of the tile before's last frame): 25
        against our 28 for 7 latents in 8-frame tiles overlapping by half, and odd ``T`` with ``SEAMLESS``.
        Elsewhere its crops do not match its stride and it makes other counts, more or fewer than ``4 T``
        (6 T + 1 in 12-frame tiles overlapping by half). We keep ``4 T``, each latent frame's four once
        (MAGI-1 Decode cuts its videos to the release's count without overlap)."""
        tf = self.temporal_factor
        if tiling is None:
            return 1 if latent_frames == 1 else latent_frames * tf
        tiles = _temporal_tiles(latent_frames, *_temporal_tile_stride(tiling, tf))
        return sum(keep for _, _, keep in tiles)


class StreamingDecode:
    """``MagiVAE.decode`` of a latent video that arrives in pieces (the sampler's chunks). ``feed`` it the latent
    frames in order, any number at a time, and it returns the video frames that are final; ``finish`` returns
    the rest. Everything returned, concatenated, equals ``decode`` of the whole latent exactly, however the
    latent is split. It holds only what the tiles to come need, whatever the video's length: the latent frames
    from the next temporal tile's start on and, with temporal overlap, the last tile's frames the next one
    fades into.

    A temporal tile is decoded as soon as all its latents have arrived. Where the video ends changes only its
    end: the last tile may be shorter than the rest, and the frames the next tile would fade into are the
    video's last frames when no tile follows. So those frames (``4 * (n - stride)`` for tiles of ``n``
    latents: 8 with ``SEAMLESS``, none without overlap) are held back, and a shorter last tile is decoded,
    when ``finish`` says the video ended, or when the last of ``total_latent_frames`` (if given) is fed: then
    that ``feed`` returns the end and ``finish`` nothing. ``tiling=None`` decodes the video in one piece, so
    nothing comes out before the end.

    Pieces are DiT-scale latents ``([B,] 16, n, h, w)``, all batched or none, all of the first one's batch and
    size. What comes back is float32 ``([B,] 3, k, H, W)`` on ``output_device`` (default: the first piece's
    device); ``k`` may be 0. ``stop`` is called before every tile, as in ``decode``; an interrupt or error
    releases all the stream holds and ends it.
    """

    def __init__(self, vae, tiling: Optional[VAETiling] = VAETiling(), output_device=None, stop=None,
                 total_latent_frames=None):
        if tiling is not None:
            tiling.check(vae.spatial_factor, vae.temporal_factor)
            self._tile, self._stride, _ = _temporal_tile_stride(tiling, vae.temporal_factor)
            self._plan = _spatial_plan(vae, tiling)
        if total_latent_frames is not None and total_latent_frames < 1:
            raise ValueError(f"a streamed decode needs at least 1 latent frame, got total {total_latent_frames}")
        self.vae, self.tiling, self.stop = vae, tiling, stop
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.total_latent_frames = total_latent_frames
        self.latent_frames = 0  # fed so far
        self.frames = 0  # returned so far
        self._latents = None  # scaled, from the next temporal tile's start on (untiled: all of them)
        self._start = 0  # the next temporal tile's first latent frame
        self._reached = 0  # the latent frame after the last decoded tile
        self._tail = None  # the last tile's frames past the next one's start, un-blended: the next fades from them
        self._ending = None  # the same frames as the video's end, if no tile follows (the fade may reach them)
        self._shape = None  # (batched, B, h, w) of the first piece
        self._state = "open"  # "ended" once the end was returned, "failed" after an error

    @property
    def total_frames(self):
        """The video frames it makes in all, when ``total_latent_frames`` was given (``decoded_frames``)."""
        if self.total_latent_frames is None:
            return None
        return self.vae.decoded_frames(self.total_latent_frames, self.tiling)

    @torch.no_grad()
    def feed(self, latent):
        """The next latent frames ``([B,] 16, n, h, w)`` -> the video frames now final, ``([B,] 3, k, H, W)``."""
        if self._state == "ended":
            raise ValueError(f"the video already ended at {self.latent_frames} latent frames")
        return self._guarded(self._feed, latent)

    @torch.no_grad()
    def finish(self):
        """The video ends here: the frames held back and the last tile (``tiling=None``: the whole video)."""
        if self._state == "ended":
            return self._join([])
        return self._guarded(lambda: self._join(self._end()))

    def _guarded(self, step, *args):
        if self._state == "failed":
            raise RuntimeError("this streamed decode failed or was interrupted; start a new one")
        try:
            return step(*args)
        except BaseException as error:
            self._release()
            self._state = "failed"
            _drop_locals(error)
            raise

    def _feed(self, latent):
        self._accept(latent)
        parts = []
        if self.tiling is not None:
            while self._start + self._tile <= self.latent_frames:
                last = self._start + self._tile == self.total_latent_frames  # known to end the video: kept whole
                parts.append(self._decode_next(self._tile, last))
        if self.latent_frames == self.total_latent_frames:
            parts += self._end()
        return self._join(parts)

    def _accept(self, latent):
        """Check a piece against the first, scale it and append it to the latents kept."""
        _check_latent(self.vae, latent)
        batched = latent.dim() == 5
        shape = (batched, latent.shape[0] if batched else None, *latent.shape[-2:])
        if self._shape is None:
            self._shape = shape
            if self.output_device is None:
                self.output_device = latent.device
        elif shape != self._shape:
            raise ValueError(f"every piece of a streamed decode has the first one's batch and size "
                             f"{list(self._describe())}, got {list(latent.shape)}")
        n = latent.shape[-3]
        if self.total_latent_frames is not None and self.latent_frames + n > self.total_latent_frames:
            raise ValueError(f"{self.latent_frames + n} latent frames fed, more than the "
                             f"{self.total_latent_frames} announced")
        z = (latent if batched else latent[None]).float() / LATENT_SCALE
        self._latents = z if self._latents is None else torch.cat([self._latents, z], dim=2)
        self.latent_frames += n

    def _describe(self):
        batched, b, h, w = self._shape
        return [b, self.vae.config.z_chans, "n", h, w] if batched else [self.vae.config.z_chans, "n", h, w]

    def _decode_next(self, size, last):
        """Decode the temporal tile of ``size`` latents at ``_start``; returns its frames before the next tile's
        start (the last tile: all), its first ones faded from the tile before."""
        tf = self.vae.temporal_factor
        slab = _decode_slab(self.vae, self._latents[:, :, :size], self._plan, self.stop)
        cut = slab.shape[2] if last else min(slab.shape[2], tf * self._stride)
        tail = slab[:, :, cut:].clone() if cut < slab.shape[2] else None
        faded = 0
        if self._tail is not None:
            faded = min(self._tail.shape[2], slab.shape[2])
            _blend(self._tail, slab, self._tail.shape[2], 2)
        # with more than half overlap the fade reaches past the cut: the end differs from the un-blended tail
        ending = slab[:, :, cut:].clone() if tail is not None and faded > cut else tail
        part = slab[:, :, :cut].to(self.output_device, copy=cut < slab.shape[2])  # not a view of the slab
        slab = None
        self._tail, self._ending = tail, ending
        self._reached = self._start + size
        self._start += self._stride
        self._latents = self._latents[:, :, self._stride:]  # the next tile starts there
        return part

    def _end(self):
        """The frames that depend on where the video ends; releases everything."""
        if self.latent_frames == 0:
            raise ValueError("a streamed decode ended before any latent frame was fed")
        if self.tiling is None:
            _poll(self.stop)
            parts = [self.vae.decode_tile(self._latents).float().to(self.output_device)]
        elif self._reached < self.latent_frames:  # a last tile, shorter than the others
            parts = [self._decode_next(self.latent_frames - self._start, last=True)]
        else:  # the last tile decoded reached the end: what it held back ends the video
            parts = [] if self._ending is None else [self._ending.to(self.output_device)]
        self._release()
        self._state = "ended"
        return parts

    def _release(self):
        self._latents = self._tail = self._ending = None

    def _join(self, parts):
        if parts:
            video = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        else:
            video = torch.zeros(self._empty_shape(), device=self.output_device)
        self.frames += video.shape[2]
        return video if self._shape[0] else video[0]

    def _empty_shape(self):
        """``(B, 3, 0, H, W)``: what a decode of these latents' size gives in space."""
        _, b, h, w = self._shape
        sf = self.vae.spatial_factor
        if self.tiling is None:
            return (b or 1, 3, 0, h * sf, w * sf)
        (th, tw), stride, _, keep = self._plan
        return (b or 1, 3, 0, _stitched_size(h, th, stride[0], keep[0], sf),
                _stitched_size(w, tw, stride[1], keep[1], sf))


# ------------------------------------------------------------------------------------------- helpers
def standardize(x):
    """Per-vector standardization without affine weights, in float32: ``(x - mean) / (std + 1e-5)``."""
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    std = xf.std(dim=-1, keepdim=True, unbiased=False)
    return ((xf - mean) / (std + STD_EPS)).to(x.dtype)


def layer_norm(norm, x):
    """A LayerNorm computed in float32 (as autocast does), returned in ``x``'s dtype."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


def _blend(a, b, extent, dim):
    """Cross-fade the first ``extent`` slices of ``b`` along ``dim`` from the last ones of ``a`` (in place,
    linear weights ``i / extent``); ``extent`` shrinks to what both tiles have."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1] * b.dim()
    shape[dim] = extent
    w = (torch.arange(extent, dtype=torch.float64) / extent).to(torch.float32).view(shape).to(b.device)
    head = a.narrow(dim, a.shape[dim] - extent, extent).float() * (1 - w) + b.narrow(dim, 0, extent).float() * w
    b.narrow(dim, 0, extent).copy_(head)
    return b


def _starts(size, stride):
    return list(range(0, size, stride))


def _poll(stop):
    if stop is not None:
        stop()


def _drop_locals(error):
    """Clear the locals of the finished frames an error's traceback holds (the tiles, the slabs), so that an
    interrupt or error releases the memory even while the traceback is kept (ComfyUI keeps it to report)."""
    traceback.clear_frames(error.__traceback__)


def _temporal_tile_stride(tiling, tf):
    """Temporal tile length and stride in latent frames."""
    tile = tiling.length // tf
    stride = int(tile * (1 - tiling.temporal_overlap))
    if stride < 1:
        raise ValueError(f"VAE tiles of {tiling.length} frames with temporal overlap {tiling.temporal_overlap} "
                         "leave no stride; use longer tiles or a smaller overlap")
    return tile, stride, tf


def _temporal_tiles(latent_frames, tile, stride, tf):
    """``(start, size, frames kept)`` of each temporal tile of a decode, in latent frames (kept: video frames).
    Without overlap they are the release's ``range(0, T, tile)``, each kept whole; with overlap they stop
    once one reaches the end, and each but the last keeps the ``tf * stride`` frames before the next one's
    start (the next one starts with the cross-fade). A tile of one latent frame makes one video frame."""
    tiles = []
    for start in range(0, latent_frames, stride):
        size = min(tile, latent_frames - start)
        made = 1 if size == 1 else size * tf
        last = start + tile >= latent_frames
        tiles.append((start, size, made if last else min(made, tf * stride)))
        if last:
            break
    return tiles


def _spatial_plan(vae, tiling):
    """Spatial tile size, stride, blend extent and kept size: (rows, columns) in latents and pixels."""
    sf = vae.spatial_factor
    tile = (tiling.height // sf, tiling.width // sf)
    stride = (int(tile[0] * (1 - tiling.spatial_overlap)), int(tile[1] * (1 - tiling.spatial_overlap)))
    if min(stride) < 1:
        raise ValueError(f"VAE tiles of {tiling.height}x{tiling.width}x{tiling.length} with these overlaps leave "
                         "no stride; use larger tiles or smaller overlaps")
    blend = (int(tile[0] * sf * tiling.spatial_overlap), int(tile[1] * sf * tiling.spatial_overlap))
    keep = (tile[0] * sf - blend[0], tile[1] * sf - blend[1])
    return tile, stride, blend, keep


def _check_latent(vae, latent):
    if latent.dim() not in (4, 5) or latent.shape[-4] != vae.config.z_chans:
        raise ValueError(f"the VAE decodes latents ({vae.config.z_chans}, T, h, w), got {list(latent.shape)}")


def _stitched_size(latents, tile, stride, keep, sf):
    """Pixels ``_decode_slab`` makes along one side: each tile's decode cropped to ``keep`` (which is more than
    the stride when the overlap is not a whole number of latents, as released)."""
    return sum(min(sf * min(tile, latents - start), keep) for start in _starts(latents, stride))


def _decode_slab(vae, z, plan, stop):
    """One temporal tile of latents decoded in overlapping spatial tiles, as the release does: each tile is
    blended with the un-blended decodes of the tiles above and to its left, cropped to the stride, and the
    crops are concatenated. ``stop`` is called before every tile."""
    (th, tw), stride, blend, keep = plan
    rows, cols = _starts(z.shape[3], stride[0]), _starts(z.shape[4], stride[1])
    decoded = []
    for i in rows:
        for j in cols:
            _poll(stop)
            decoded.append(vae.decode_tile(z[:, :, :, i:i + th, j:j + tw]).float())
    stitched = []
    for ii in range(len(rows)):
        crops = []
        for jj in range(len(cols)):
            out = decoded[ii * len(cols) + jj].clone()
            if ii > 0:
                _blend(decoded[(ii - 1) * len(cols) + jj], out, blend[0], 3)
            if jj > 0:
                _blend(decoded[ii * len(cols) + jj - 1], out, blend[1], 4)
            crops.append(out[:, :, :, :keep[0], :keep[1]])
        stitched.append(torch.cat(crops, dim=4))
    return torch.cat(stitched, dim=3)


def _tiled_encode(vae, x, tiling, stop):
    """Encode overlapping pixel tiles. Unlike decoding, the release blends in place in tile order, so a tile
    blends against neighbours that were already blended with theirs. ``stop`` is called before every tile."""
    sf, tf = vae.spatial_factor, vae.temporal_factor
    tiling.check(sf, tf)
    stride = (int(tiling.length * (1 - tiling.temporal_overlap)), int(tiling.height * (1 - tiling.spatial_overlap)),
              int(tiling.width * (1 - tiling.spatial_overlap)))
    if min(stride) < 1:
        raise ValueError(f"VAE tiles of {tiling.height}x{tiling.width}x{tiling.length} with these overlaps leave "
                         "no stride; use larger tiles or smaller overlaps")
    latent = (tiling.length // tf, tiling.height // sf, tiling.width // sf)
    blend = (int(latent[0] * tiling.temporal_overlap), int(latent[1] * tiling.spatial_overlap),
             int(latent[2] * tiling.spatial_overlap))
    keep = tuple(n - e for n, e in zip(latent, blend))
    size = (tiling.length, tiling.height, tiling.width)
    starts = [_starts(x.shape[2 + d], stride[d]) for d in range(3)]
    encoded = [[[] for _ in starts[1]] for _ in starts[0]]
    for ff, f in enumerate(starts[0]):
        for ii, i in enumerate(starts[1]):
            for j in starts[2]:
                _poll(stop)
                encoded[ff][ii].append(vae.encode_tile(x[:, :, f:f + size[0], i:i + size[1], j:j + size[2]]).float())
    slabs = []
    for ff, plane in enumerate(encoded):
        rows = []
        for ii, tiles in enumerate(plane):
            crops = []
            for jj, tile in enumerate(tiles):
                if ff > 0:
                    _blend(encoded[ff - 1][ii][jj], tile, blend[0], 2)
                if ii > 0:
                    _blend(plane[ii - 1][jj], tile, blend[1], 3)
                if jj > 0:
                    _blend(tiles[jj - 1], tile, blend[2], 4)
                crops.append(tile[:, :, :keep[0], :keep[1], :keep[2]])
            rows.append(torch.cat(crops, dim=4))
        slabs.append(torch.cat(rows, dim=3))
    return torch.cat(slabs, dim=2)


# --------------------------------------------------------------------------------------------- loading
def build_vae(config, *, device=None, dtype=None):
    """The VAE for a ``VAEConfig`` or config dict, weights uninitialised (``device="meta"`` allocates nothing)."""
    config = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
    with torch.device(device if device is not None else "cpu"):
        return MagiVAE(config).to(dtype or torch.float32)


def infer_vae_config(shapes):
    """A ``VAEConfig`` from tensor shapes (key -> shape). The head count assumes 64-wide heads and the
    position grid the release's 16-frame training clips, as in the official VAE."""
    required = ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "encoder.last_layer.weight",
                "encoder.blocks.0.mlp.fc1.weight", "decoder.proj_in.weight", "decoder.last_layer.weight")
    absent = [k for k in required if k not in shapes]
    if absent:
        kind = file_kind(shapes)
        if kind is not None and not kind.startswith("a MAGI-1 VAE"):
            raise ValueError(f"not a MAGI-1 VAE checkpoint: this file is {kind}")
        raise ValueError(f"not a MAGI-1 VAE checkpoint: missing {absent} (expected the official "
                         "ckpt/vae/diffusion_pytorch_model.safetensors, key names unchanged)")
    embed_dim, in_chans, patch_length, patch_size, _ = shapes["encoder.patch_embed.proj.weight"]
    z_chans = shapes["decoder.proj_in.weight"][1]
    depth = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.blocks."))
    video_length = 16
    positions = shapes["encoder.pos_embed"][1] - 1
    frames = video_length // patch_length
    side = math.isqrt(positions // frames) if frames and positions % frames == 0 else 0
    if side * side * frames != positions:
        raise ValueError(f"cannot infer the VAE's position grid from {positions} positions; put the VAE's "
                         "config.json (from ckpt/vae) beside the weights")
    return VAEConfig(in_chans=in_chans, z_chans=z_chans, double_z=shapes["encoder.last_layer.weight"][0] == 2 * z_chans,
                     embed_dim=embed_dim, depth=depth, num_heads=max(embed_dim // HEAD_DIM, 1),
                     mlp_ratio=shapes["encoder.blocks.0.mlp.fc1.weight"][0] / embed_dim, patch_size=patch_size,
                     patch_length=patch_length, video_size=side * patch_size, video_length=video_length)


def vae_file(path):
    """The weights file for ``path``: a ``.safetensors`` file, or a folder holding exactly one
    (the official ``ckpt/vae`` holds ``diffusion_pytorch_model.safetensors`` and ``config.json``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no MAGI-1 VAE at {path}")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if len(names) != 1:
            raise ValueError(f"{path} holds {len(names)} .safetensors files; pass the VAE weights file itself")
        return os.path.join(path, names[0])
    refuse_pickle(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{os.path.basename(path)}: the VAE is loaded from .safetensors only (nothing is unpickled)")
    return path


def load_vae(path, *, device=None, dtype=None):
    """Load the official MAGI-1 VAE (``ckpt/vae/diffusion_pytorch_model.safetensors``, any file name).

    The config comes from ``config.json`` beside the weights when it is there, else from the checkpoint's
    metadata, else from the tensor shapes. ``dtype`` defaults to bfloat16 on CUDA (as released) and
    float32 elsewhere; norms and standardization always compute in float32.
    """
    file = vae_file(path)
    shapes, _, metadata = read_header(file)
    beside = os.path.join(os.path.dirname(file), "config.json")
    if os.path.exists(beside):
        with open(beside) as fh:
            config = VAEConfig.from_dict(json.load(fh))
    elif CONFIG_METADATA_KEY in metadata:
        config = VAEConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    else:
        config = infer_vae_config(shapes)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = build_vae(config, device="meta", dtype=dtype)
    check_state_dict(vae, shapes, what="MAGI-1 VAE")
    state = read_tensors(file, device, lambda key: dtype)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def random_vae(config, *, seed=0, device=None, dtype=None, draw_device="cpu"):
    """A VAE with random weights of sensible scale (tests, benchmarks, training from scratch): matrices and
    kernels ~ N(0, 1/fan_in), biases ~ 0.1 N(0, 1), norm scales ~ 1 + 0.1 N(0, 1), class tokens and
    positions ~ 0.5 N(0, 1). Drawn on the CPU by default, so a seed gives the same weights everywhere
    (``draw_device="cuda"``: faster, other values)."""
    vae = build_vae(config, device="meta", dtype=dtype)
    generator = torch.Generator(device=draw_device).manual_seed(int(seed))
    modules = dict(vae.named_modules())
    values = {}
    for name, param in vae.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        noise = torch.randn(param.shape, generator=generator, device=draw_device)
        if isinstance(modules.get(module_name), nn.LayerNorm):
            value = float(leaf == "weight") + 0.1 * noise
        elif leaf == "bias":
            value = 0.1 * noise
        elif leaf in ("cls_token", "pos_embed"):
            value = 0.5 * noise
        else:
            value = noise / param[0].numel() ** 0.5
        values[name] = value.to(device=device or "cpu", dtype=dtype or torch.float32)
    vae.load_state_dict(values, strict=True, assign=True)
    return vae.eval().requires_grad_(False)
