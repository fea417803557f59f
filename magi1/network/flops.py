"""Analytic FLOPs of one DiT call (a multiply-add counts as 2), for cache statistics and benchmarks.

A call runs ``query_tokens`` video tokens through every layer. Each query token attends to
``key_tokens`` video keys (its chunk's real key range: ``kv_range`` chunks of tokens, or fewer at the
start of the video) and to ``caption_tokens`` valid caption tokens of its chunk. A sparse call has fewer
query tokens and the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_int


@dataclass(frozen=True)
class FlopCount:
    linear: float  # per-token layer GEMMs: q, qx, k, v, linear_proj, fc1, fc2
    attention: float  # self-attention scores and weighted sum
    cross_attention: float  # caption K/V projections, scores and weighted sum
    other: float  # patch embedding, final linear, per-chunk conditioning

    @property
    def total(self):
        return self.linear + self.attention + self.cross_attention + self.other

    def __add__(self, other):
        return FlopCount(
            self.linear + other.linear,
            self.attention + other.attention,
            self.cross_attention + other.cross_attention,
            self.other + other.other,
        )


def flops(config, *, query_tokens, key_tokens, caption_tokens=0, chunks=1):
    """FLOPs of one call of the DiT described by ``config`` (a ``ModelConfig``).

    ``chunks`` is the number of chunks the call conditions (one timestep and caption embedding each).
    """
    for name, value in (("query_tokens", query_tokens), ("key_tokens", key_tokens),
                        ("caption_tokens", caption_tokens), ("chunks", chunks)):
        check_int(name, value, low=0)
    D, L = config.hidden_size, config.num_layers
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_query_groups * config.head_dim
    per_token_layer = (
        2 * D * q_width * 2  # q and qx (cross-attention query)
        + 2 * D * kv_width * 2  # k and v
        + 2 * (2 * D) * D  # linear_proj over [self, cross]
        + 2 * D * config.fc1_out  # fc1
        + 2 * config.ffn_hidden_size * D  # fc2
    )
    linear = float(L * query_tokens * per_token_layer)
    # scores q·k and the weighted sum of v: 2 GEMMs of 2·Sq·Sk·q_width each
    attention = float(L * 4 * query_tokens * key_tokens * q_width)
    cross = float(L * (4 * query_tokens * caption_tokens * q_width + 2 * caption_tokens * D * 2 * kv_width))
    patch_volume = config.t_patch_size * config.patch_size**2
    other = float(
        2 * query_tokens * patch_volume * config.in_channels * D  # x_embedder
        + 2 * query_tokens * D * patch_volume * config.out_channels  # final_linear
        + chunks * 2 * config.caption_max_length * config.caption_channels * D  # caption embedder, all 800 rows
        + chunks * L * 2 * config.cond_dim * 2 * D  # the two gates of every layer
    )
    return FlopCount(linear, attention, cross, other)
