"""MAGI-1 in plain PyTorch: the DiT, VAE, text conditioning and autoregressive sampler (no ComfyUI here)."""

from .config import ModelConfig
from .dit import MagiDiT, distill_dt
from .flops import FlopCount, flops
from .kv_cache import KVCache
from .loader import build_dit, load_dit, random_dit

__all__ = ["FlopCount", "KVCache", "MagiDiT", "ModelConfig", "build_dit", "distill_dt", "flops", "load_dit", "random_dit"]
