"""One generation, described once: ``VideoRequest``.

Every front end (MAGI-1 Sampler, the Multi-GPU node's workers, ``python -m magi1``, ``demo.py``) builds one
request from what its user gave, and the layout (``request.layout``), the memory plan
(``magi1.memory_plan(config, request)``), the time estimate and ``magi1.generate(model, request)`` read it.
The rules every front end states live here: how frames asked become whole chunks (``FRAMES_RULE``), the
official window and chunk width, the release's guidance at a chosen text scale, the report's
"asked / made" line.

A request crosses a process boundary (the Multi-GPU node's worker jobs) as ``to_dict()``: plain JSON with a
``format`` number, its tensors apart (``tensors()``, saved as safetensors). ``from_dict`` refuses a format
or a field it does not know, so a worker of another version of the pack says so instead of guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..checks import check_int
from .guidance import Guidance
from .layout import VideoLayout, frames_made, frames_to_generate
from .reuse_contract import ReusePolicy

WINDOW_SIZE = 4  # chunks denoised together (the release's); steps per chunk are a multiple of it
CHUNK_WIDTH = 6  # latent frames per chunk (24 video frames)
REQUEST_FORMAT = 1  # the version of to_dict's format; bump it when a field changes meaning or goes
TENSOR_FIELDS = ("caption", "caption_mask", "negative_caption", "negative_mask", "prefix")


def release_guidance(text_scale=None):
    """The release's guidance table (``Guidance()``), with its text scale set to ``text_scale`` where the
    release guides by text (None: the release's 7.5)."""
    return Guidance() if text_scale is None else Guidance().with_text_scale(float(text_scale))


@dataclass(frozen=True)
class VideoRequest:
    """What to generate and how, as a user asked it.

    ``frames``: the video frames asked; ``FRAMES_RULE`` makes them whole chunks (``frames_to_generate``,
    ``layout``). ``width``, ``height``: pixels. ``steps``: per chunk, a multiple of ``window_size``.
    ``seed``: the initial noise, drawn on the CPU (the same video on any device).
    ``caption``, ``caption_mask``: the prompt, per chunk to generate (see ``magi1.generate``); a
    ``ChunkCaptions`` needs no mask. ``negative_caption``, ``negative_mask``: base models' negative prompt.
    ``prefix``: clean latents ``[16, P, H/8, W/8]`` to continue from (a start image: P = 1);
    ``prefix_frames``: P, for a plan made before the prefix is encoded (set from ``prefix`` when given).
    ``guidance``: a ``Guidance`` (``release_guidance(scale)`` for the release's at another text scale);
    ``policy``: the token-reuse policy (``cache_core.CachePolicy``) or None. ``kv_offload``: the KV caches
    in host memory; ``token_block``: the DiT's low-memory mode for this run (None: the model's own setting,
    off unless ``MagiDiT.configure`` set it); ``record_masks``:
    record where the policy computed. ``window_size``, ``chunk_width``: the release's 4 and 6.
    """

    frames: int
    width: int
    height: int
    steps: int = 64
    seed: int = 0
    caption: Any = None
    caption_mask: Optional[torch.Tensor] = None
    negative_caption: Any = None
    negative_mask: Optional[torch.Tensor] = None
    prefix: Optional[torch.Tensor] = None
    prefix_frames: Optional[int] = None
    guidance: Guidance = Guidance()
    policy: Optional[ReusePolicy] = None
    kv_offload: bool = False
    token_block: Optional[int] = None
    record_masks: bool = False
    window_size: int = WINDOW_SIZE
    chunk_width: int = CHUNK_WIDTH

    def __post_init__(self):
        for name in ("frames", "width", "height", "steps", "window_size", "chunk_width"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0, high=2**64 - 1)
        if self.token_block is not None:
            check_int("token_block", self.token_block, low=1)
        if not isinstance(self.guidance, Guidance):
            raise TypeError(f"guidance must be a magi1.Guidance, got {type(self.guidance).__name__}")
        if self.policy is not None and not isinstance(self.policy, ReusePolicy):
            raise TypeError(f"policy must be a cache_core.CachePolicy (or follow "
                            f"magi1.sampling.reuse_contract.ReusePolicy) or None, got {type(self.policy).__name__}")
        given = int(self.prefix.shape[1]) if self.prefix is not None and self.prefix.dim() > 1 else None
        if self.prefix_frames is None:
            object.__setattr__(self, "prefix_frames", given or 0)
        elif given is not None and given != self.prefix_frames:
            raise ValueError(f"prefix_frames is {self.prefix_frames} but the prefix holds {given} latent frames")
        check_int("prefix_frames", self.prefix_frames, low=0)

    # -------------------------------------------------------------------------------- derived
    @property
    def frames_to_generate(self):
        """``VideoLayout.plan``'s frames: the frames asked by ``FRAMES_RULE`` (a start image counts among them)."""
        return frames_to_generate(self.frames, self.prefix_frames, self.chunk_width)

    def layout(self, patch_size=2) -> VideoLayout:
        """The chunks and tokens of this video for a DiT of ``patch_size``."""
        return VideoLayout.plan(self.frames_to_generate, self.height, self.width, prefix_frames=self.prefix_frames,
                                chunk_width=self.chunk_width, patch_size=patch_size)

    @property
    def chunks(self):
        """Chunks to generate (after a prefix's whole chunks): they do not depend on the DiT's patch size."""
        layout = self.layout(patch_size=1)
        return layout.chunk_num - layout.chunk_offset

    @property
    def reuse(self):
        """What the policy keeps, in the memory plan's terms: "off", "chunk" (whole chunks reused) or "token"."""
        if self.policy is None or not self.policy.enabled:
            return "off"
        return "token" if self.policy.uses_token_weights else "chunk"

    def frames_report(self, latent_frames):
        """The reports' line about length, for a run that returned ``latent_frames``: e.g. ``"48 asked, 48 made
        (2 chunks of 24, the start image the first frame)"``."""
        chunks = self.chunks
        if self.prefix_frames == 1:
            how = ", the start image the first frame"
        elif self.prefix_frames:
            how = f", after the prefix's {frames_made(self.prefix_frames)} frames"
        else:
            how = ""
        return (f"{self.frames} asked, {frames_made(latent_frames)} made ({chunks} chunk{'s' * (chunks > 1)} "
                f"of {frames_made(self.chunk_width)}{how})")

    def with_changes(self, **changes):
        """A copy with some fields changed (``dataclasses.replace``): e.g. the captions, once the layout has
        said how many chunks they are for. A new ``prefix`` brings its own ``prefix_frames``."""
        if "prefix" in changes and "prefix_frames" not in changes:
            changes["prefix_frames"] = None
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- to and from dict
    def to_dict(self):
        """The request as plain JSON values, ``{"format": REQUEST_FORMAT, ...}``, without its tensors (see
        ``tensors``); the policy as its own ``to_dict()``."""
        data = {"format": REQUEST_FORMAT}
        for f in dataclasses.fields(self):
            if f.name in TENSOR_FIELDS:
                continue
            value = getattr(self, f.name)
            if f.name == "guidance":
                value = _guidance_dict(value)
            elif f.name == "policy":
                value = None if value is None else _policy_dict(value)
            data[f.name] = value
        return data

    def tensors(self):
        """``{name: tensor}`` of the request's tensors (``TENSOR_FIELDS``, None ones left out), in host memory;
        ``ChunkCaptions`` as one row per chunk."""
        out = {}
        for name, mask in (("caption", "caption_mask"), ("negative_caption", "negative_mask")):
            value, value_mask = getattr(self, name), getattr(self, mask)
            if value is not None and hasattr(value, "dense"):
                value, value_mask = value.dense()
            out[name], out[mask] = value, value_mask
        out["prefix"] = self.prefix
        return {name: t.detach().to("cpu").contiguous() for name, t in out.items() if t is not None}

    @classmethod
    def from_dict(cls, data, tensors=None, policy_from_dict: Optional[Callable[[dict], Any]] = None):
        """The request ``to_dict`` wrote, with its ``tensors``; ``policy_from_dict`` rebuilds a policy (e.g.
        ``cache_core.CachePolicy.from_dict``). Refuses another format and unknown fields."""
        data = dict(data)
        version = data.pop("format", None)
        if version != REQUEST_FORMAT:
            raise ValueError(
                f"this request is in format {version!r}, and this version of the pack reads format {REQUEST_FORMAT}: "
                "the request was written by another version of ComfyUI-MAGI1-MotionDetailCache; restart ComfyUI "
                "after updating the pack so that both sides are the same version")
        known = {f.name for f in dataclasses.fields(cls)} - set(TENSOR_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"the request has fields this version of the pack does not know: {unknown} (format "
                             f"{REQUEST_FORMAT} has {sorted(known)})")
        tensors = dict(tensors or {})
        stray = sorted(set(tensors) - set(TENSOR_FIELDS))
        if stray:
            raise ValueError(f"unknown request tensors {stray}; expected some of {TENSOR_FIELDS}")
        if "guidance" in data:
            data["guidance"] = Guidance(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in data["guidance"].items()})
        if data.get("policy") is not None:
            if policy_from_dict is None:
                raise ValueError("the request carries a cache policy: pass policy_from_dict (e.g. "
                                 "cache_core.CachePolicy.from_dict) to rebuild it")
            data["policy"] = policy_from_dict(data["policy"])
        return cls(**data, **tensors)


def _guidance_dict(guidance):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(guidance).items()}


def _policy_dict(policy):
    to_dict = getattr(policy, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"a {type(policy).__name__} policy cannot cross to another process: it has no to_dict()")
    return to_dict()
