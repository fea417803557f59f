"""The DiT architecture settings: the official ``model_config`` section, with its defaults and derived sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import check_int, check_number

_DTYPES = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}


@dataclass(frozen=True)
class ModelConfig:
    """The ``model_config`` of the official ``example/{4.5B,24B}/*_config.json``.

    Field names and defaults are the official ones (``inference/common/config.py``), so the official JSON
    section loads as it is. ``params_dtype`` is the checkpoint's storage dtype (the JSON spells it
    ``"torch.bfloat16"``).
    """

    model_name: str = "videodit_ardf"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: int = 1
    kv_channels: Optional[int] = None
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = False
    x_rescale_factor: float = 1.0
    half_channel_vae: bool = False
    params_dtype: Optional[torch.dtype] = None
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 4
    out_channels: int = 4
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False

    @classmethod
    def from_dict(cls, config):
        """From the official JSON: the whole file's dict or just its ``model_config`` section."""
        if not isinstance(config, dict):
            raise ValueError(f"a MAGI-1 model config must be a dict, got {type(config).__name__}")
        section = config.get("model_config", config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown MAGI-1 model_config keys {unknown}; the known keys are {sorted(known)}")
        values = dict(section)
        if isinstance(values.get("params_dtype"), str):
            name = values["params_dtype"]
            if name not in _DTYPES:
                raise ValueError(f"params_dtype must be one of {sorted(_DTYPES)}, got {name!r}")
            values["params_dtype"] = _DTYPES[name]
        return cls(**values)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                     "num_query_groups", "patch_size", "t_patch_size", "in_channels", "out_channels",
                     "caption_channels", "caption_max_length"):
            check_int(f"model_config.{name}", getattr(self, name), low=1)
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model_config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.hidden_size % 8 or (self.num_attention_heads * self.kv_channels) % 8:
            # the attention output is interleaved in 8 shards before linear_proj (trained with TP 8)
            raise ValueError(f"model_config.hidden_size ({self.hidden_size}) and num_attention_heads * kv_channels "
                             f"({self.num_attention_heads * self.kv_channels}) must be multiples of 8")
        if self.half_channel_vae and self.in_channels % 2:
            raise ValueError(f"half_channel_vae needs an even in_channels, got {self.in_channels}")
        for name in ("layernorm_epsilon", "x_rescale_factor", "cond_hidden_ratio"):
            check_number(f"model_config.{name}", getattr(self, name), low=0.0, low_open=True)

    @property
    def head_dim(self):
        return self.kv_channels

    @property
    def cond_dim(self):
        """Width of the per-chunk condition (timestep + adaLN caption vector)."""
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def fc1_out(self):
        """Output width of mlp.linear_fc1: doubled for the gated (SwiGLU) MLP."""
        return self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)

    @property
    def latent_channels(self):
        """Channels of the VAE latent the model takes (24B duplicates 16 into its 32 input channels)."""
        return self.in_channels // 2 if self.half_channel_vae else self.in_channels
