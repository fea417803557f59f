"""The tiny MAGI-1 demo model that ships with the pack: a DiT, VAE, text encoder and special-token table
of the MAGI-1 architecture (same code, same loaders, same key names), trained on procedural videos by
``python -m train.tiny`` (the repository's ``train/`` folder, outside the pack's runtime). It runs on any CPU
in seconds and needs no download: for trying the pack, the tests and the cache benchmark. Its text encoder is
its own (``text_encoder``); real checkpoints read T5-XXL.
"""

from __future__ import annotations

import os

from ..loader import load_dit
from ..text import SpecialTokens
from ..vae import load_vae
from .text_encoder import load_text_encoder

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DIT_FILE = os.path.join(WEIGHTS, "dit.safetensors")
VAE_FILE = os.path.join(WEIGHTS, "vae.safetensors")
TEXT_ENCODER_FILE = os.path.join(WEIGHTS, "text_encoder.safetensors")
SPECIAL_TOKENS_FILE = os.path.join(WEIGHTS, "special_tokens.npz")
# What it was trained on: 64x64 videos; 8 to 16 distilled steps. The demo, the workflow and the cache
# presets use 16 (bench/calibration.md).
SIZE = 64
STEPS = 16


def load_tiny_dit(device=None, dtype=None):
    return load_dit(DIT_FILE, device=device, dtype=dtype, distill=True)


def load_tiny_vae(device=None, dtype=None):
    return load_vae(VAE_FILE, device=device, dtype=dtype)


def load_tiny_text_encoder(device="cpu"):
    return load_text_encoder(TEXT_ENCODER_FILE, device=device)


def tiny_special_tokens():
    return SpecialTokens.load(SPECIAL_TOKENS_FILE)


__all__ = ["DIT_FILE", "SIZE", "SPECIAL_TOKENS_FILE", "STEPS", "TEXT_ENCODER_FILE", "VAE_FILE", "WEIGHTS",
           "load_tiny_dit", "load_tiny_text_encoder", "load_tiny_vae", "tiny_special_tokens"]
