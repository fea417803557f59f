"""MAGI-1 in plain PyTorch: the DiT, VAE, text conditioning and autoregressive sampler (no ComfyUI here)."""

from .config import ModelConfig
from .dit import MagiDiT, distill_dt
from .flops import FlopCount, flops
from .kv_cache import KVCache
from .loader import build_dit, load_dit, random_dit
from .sample_stats import ChunkStepRecord, MaskRecorder, SampleStats
from .sampler import Guidance, SampleResult, SamplingInterrupted, StepProgress, VideoLayout, generate

__all__ = [
    "ChunkStepRecord", "FlopCount", "Guidance", "KVCache", "MagiDiT", "MaskRecorder", "ModelConfig", "SampleResult",
    "SampleStats", "SamplingInterrupted", "StepProgress", "VideoLayout", "build_dit", "distill_dt", "flops",
    "generate", "load_dit", "random_dit",
]
