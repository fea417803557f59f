"""The built-in models of the MAGI-1 architecture that ship with the pack (same code, same loaders, same key
names as the official checkpoints), trained on procedural videos by ``train/`` (outside the pack's runtime).
They run on any CPU and need no download:

- ``TINY`` (``weights/``): 64x64 videos, a sprite over a plain background; seconds on a CPU. For trying the
  pack and for the tests.
- ``BENCHMARK_MODEL`` (``benchmark_model/``, the tiny model's VAE): 128x128 videos (64 tokens a frame) of one to three
  small objects over detailed backgrounds, with camera pans; chunks that continue each other. The cache
  benchmark's model: it has static regions for token-level reuse to skip, as real videos do.

Each has its own small text encoder (``text_encoder``); real checkpoints read T5-XXL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..prompts.text import SpecialTokens
from ..video.vae import load_vae
from ..weights.loader import load_dit
from .text_encoder import load_text_encoder

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model: where its four files are and what it was trained for."""

    name: str  # as ``python -m magi1 --model`` and MAGI-1 Tiny Text Encode know it
    folder: str  # dit.safetensors, text_encoder.safetensors, special_tokens.npz (and vae.safetensors)
    vae_file: str
    size: int  # trained on size x size videos
    steps: int  # the distilled step count the demo, the workflows and the cache presets use
    example_prompt: str
    title: str = ""  # how the reports name it (``load_dit`` gives it as the DiT's ``variant``), as the loaders list it

    @property
    def dit_file(self):
        return os.path.join(self.folder, "dit.safetensors")

    @property
    def text_encoder_file(self):
        return os.path.join(self.folder, "text_encoder.safetensors")

    @property
    def special_tokens_file(self):
        return os.path.join(self.folder, "special_tokens.npz")

    def load_dit(self, device=None, dtype=None, parallel=None):
        return load_dit(self.dit_file, device=device, dtype=dtype, distill=True, parallel=parallel)

    def load_vae(self, device=None, dtype=None):
        return load_vae(self.vae_file, device=device, dtype=dtype)

    def load_text_encoder(self, device="cpu"):
        return load_text_encoder(self.text_encoder_file, device=device)

    def special_tokens(self):
        return SpecialTokens.load(self.special_tokens_file)


WEIGHTS = os.path.join(HERE, "weights")
VAE_FILE = os.path.join(WEIGHTS, "vae.safetensors")
# Trained on 64x64 videos with 8 to 16 distilled steps; the demo, the workflow and the presets use 16.
TINY = BuiltinModel("tiny", WEIGHTS, VAE_FILE, size=64, steps=16,
                    example_prompt="a red ball moving right over a checkerboard", title="MAGI-1 tiny demo (built-in)")
BENCHMARK_MODEL = BuiltinModel("bench", os.path.join(HERE, "benchmark_model"), VAE_FILE, size=128, steps=16,
                     example_prompt="a red ball moving right slowly and a blue square standing still over a brick wall",
                     title="MAGI-1 benchmark model (built-in, 128x128)")
MODELS = {model.name: model for model in (TINY, BENCHMARK_MODEL)}


def builtin_at(path):
    """The built-in model whose DiT file ``path`` is (the same file, also through a link), else None."""
    for model in MODELS.values():
        try:
            if os.path.samefile(path, model.dit_file):
                return model
        except OSError:  # ``path`` (or a built-in file) does not exist
            continue
    return None

# The tiny model's names, as the tests, nodes and earlier code know them.
DIT_FILE, TEXT_ENCODER_FILE, SPECIAL_TOKENS_FILE = TINY.dit_file, TINY.text_encoder_file, TINY.special_tokens_file
SIZE, STEPS = TINY.size, TINY.steps
load_tiny_dit, load_tiny_vae = TINY.load_dit, TINY.load_vae
load_tiny_text_encoder, tiny_special_tokens = TINY.load_text_encoder, TINY.special_tokens

__all__ = ["BENCHMARK_MODEL", "DIT_FILE", "MODELS", "SIZE", "SPECIAL_TOKENS_FILE", "STEPS", "TEXT_ENCODER_FILE", "TINY",
           "VAE_FILE", "WEIGHTS", "BuiltinModel", "builtin_at", "load_tiny_dit", "load_tiny_text_encoder",
           "load_tiny_vae", "tiny_special_tokens"]
