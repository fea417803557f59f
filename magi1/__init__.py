"""MAGI-1 in plain PyTorch: the DiT, VAE, text conditioning and autoregressive sampler (no ComfyUI here)."""

from .distributed.parallel import Parallel
from .network.config import ModelConfig
from .network.dit import MagiDiT, distill_dt
from .network.flops import FlopCount, flops
from .network.kv_cache import KVCache
from .network.ops import CastOps
from .planning.memory_plan import MemoryPlan, memory_plan
from .prompts.text import (ChunkCaptions, SpecialTokens, chunk_captions, find_special_tokens, null_caption,
                           parse_prompt_schedule, prepare_prompt, scheduled_caption_rows, scheduled_captions)
from .sampling.guidance import Guidance
from .sampling.layout import VideoLayout
from .sampling.request import VideoRequest, release_guidance
from .sampling.reuse_contract import ReuseDecision, ReusePolicy, ReuseState
from .sampling.sample_stats import ChunkStepRecord, MaskRecorder, SampleStats
from .sampling.sampler import SampleResult, SamplingInterrupted, StepProgress, generate
from .weights.loader import build_dit, load_dit, random_dit
from .weights.streaming import LayerStreamer, stream_layers
from .video.vae import LATENT_SCALE, MagiVAE, VAEConfig, VAETiling, build_vae, load_vae, random_vae

__all__ = [
    "LATENT_SCALE", "CastOps", "ChunkCaptions", "ChunkStepRecord", "FlopCount", "Guidance", "KVCache", "LayerStreamer", "MagiDiT", "MagiVAE", "MaskRecorder", "MemoryPlan", "Parallel",
    "ModelConfig", "ReuseDecision", "ReusePolicy", "ReuseState", "SampleResult", "SampleStats", "SamplingInterrupted", "SpecialTokens", "StepProgress", "VAEConfig",
    "VAETiling", "VideoLayout", "VideoRequest", "build_dit", "build_vae", "chunk_captions", "distill_dt", "find_special_tokens",
    "flops", "generate", "load_dit", "load_vae", "memory_plan", "null_caption", "parse_prompt_schedule", "prepare_prompt", "random_dit", "random_vae", "release_guidance", "scheduled_caption_rows", "scheduled_captions", "stream_layers",
]
