"""cache_core: which tokens of each video chunk to recompute at every denoising step.

Model-agnostic (torch only, no ComfyUI, no MAGI-1): the sampler asks a per-run ``CacheState`` what to
compute, runs its model on those tokens, and hands the velocity back. ``magi1.sampling.reuse_contract`` states
what a sampler needs from a policy and its state; ``CachePolicy`` and ``CacheState`` provide it.
"""

from .policy import MODES, PRESET_SCHEDULE, PROXIES, CachePolicy
from .decision import ACTIONS, ChunkObservation, ChunkStep, Decision
from .state import CacheState
from .token_weights import COMBINE_MODES, combine_weights, detail_weights, motion_weights

__all__ = [
    "ACTIONS",
    "COMBINE_MODES",
    "MODES",
    "PRESET_SCHEDULE",
    "PROXIES",
    "CachePolicy",
    "CacheState",
    "ChunkObservation",
    "ChunkStep",
    "Decision",
    "combine_weights",
    "detail_weights",
    "motion_weights",
]
