"""MAGI-1 in plain PyTorch: the DiT, VAE, text conditioning and autoregressive sampler (no ComfyUI here)."""

from .config import ModelConfig
from .flops import FlopCount, flops

__all__ = ["FlopCount", "ModelConfig", "flops"]
