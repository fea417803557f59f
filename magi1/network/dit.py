"""The MAGI-1 DiT ("VideoDiTModel"): module and parameter names match the official checkpoints.

One call denoises a window of consecutive chunks of the latent video, each at its own time ``t``
(0 = noise, 1 = clean), and returns their velocities. Video tokens are 1x2x2 latent patches in
(frame, row, column) order; a chunk is ``frames_per_chunk * (H/2) * (W/2)`` tokens.

A layer is a parallel self-attention + cross-attention block and a sandwich-norm MLP, each branch
gated per chunk: ``h = h + PostNorm(branch * tanh(gate))``; there is no shift/scale modulation.
Self-attention is block-causal: the queries of window chunk ``j`` attend to all keys in the contiguous
token range ``kv_range[j]`` (earlier clean chunks from the KV cache and window chunks up to itself).
Cross-attention reads only the chunk's own valid caption tokens.

Precision follows the official ``_high_precision_promoter``: the embedders, RoPE, q/k norms, post
norms, final norm and final linear hold float32 weights; ``linear_proj`` computes in float32; the rest
runs in the model's dtype (bfloat16 on GPU).

Every Linear, LayerNorm and Conv3d comes from an injected ``operations`` namespace (``magi1.network.ops``), and
the transformer layers' large weights may be stored in float8 (``weights``, see ``LayerFactory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from .attention import BACKENDS, attend, attend_segments, resolve_backend
from .config import ModelConfig
from .ops import FP8, CastOps, QuantizedFp8Linear, cast_to, on_device_of, scaled_fp8_linear

TIMESTEP_FREQUENCIES = 256  # width of the sinusoidal timestep embedding
TIMESTEP_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000
PROJ_SHARDS = 8  # the attention output is interleaved in 8 shards before linear_proj (trained with TP 8)
# Work between two polls of a stop check inside a layer's attention (FLOPs): about half a second on a 2-core
# CPU, and on a GPU more than any real chunk needs (blocks of whole multiples of 128 queries, so that the
# values are those of one call).
BLOCK_FLOPS = {"cpu": 5e10, "cuda": 1e14}


def distill_dt(num_steps, distill_interval=1):
    """The step-size value distilled models embed with the timestep embedder and add to every chunk's
    condition: ``num_steps / 2``, or ``8 / distill_interval`` on the 12-step shortcut schedule."""
    if num_steps == 12:
        return 4 / distill_interval * 2
    return num_steps / 4 * 2


class ZeroCenteredLayerNorm(nn.Module):
    """LayerNorm whose stored weight is centred on 0 when ``one_plus`` (``apply_layernorm_1p``):
    the scale applied is ``weight + 1``. Computes in the dtype of its input, on its device."""

    def __init__(self, dim, eps, one_plus, dtype=None):
        super().__init__()
        self.eps = eps
        self.one_plus = one_plus
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype))

    def forward(self, x):
        weight = on_device_of(self.weight, x)
        weight = weight + 1 if self.one_plus else weight
        return F.layer_norm(x, self.weight.shape, cast_to(weight, x), cast_to(self.bias, x), self.eps)


WEIGHT_KINDS = ("fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official")


@dataclass(frozen=True)
class LayerFactory:
    """How the DiT's layers are made: the ``operations`` namespace, the compute ``dtype`` and how the
    transformer layers' large weights are stored (``weights``):

    - ``None``: in ``dtype``;
    - ``"fp8_e4m3fn"``: float8 (q, qx, k, v, linear_kv_xattn, linear_proj, fc1, fc2, the gate projection),
      computed in the input's dtype by the operations' cast; ``"fp8_e4m3fn_scaled"``: the same with one
      float32 ``scale_weight`` per weight (ComfyUI's scaled-fp8 convention);
    - ``"fp8_official"``: the official ``*_distill_quant`` layout (``QuantizedFp8Linear``) in layers
      ``1 .. L-2``: per-tensor q, qx, k, v and fc1, per-channel linear_proj and fc2; the rest as ``None``.
    """

    operations: object = CastOps
    dtype: torch.dtype = torch.float32
    weights: Optional[str] = None
    num_layers: int = 0

    def __post_init__(self):
        if self.weights is not None and self.weights not in WEIGHT_KINDS:
            raise ValueError(f"weights must be None or one of {WEIGHT_KINDS}, got {self.weights!r}")

    def float32_linear(self, n_in, n_out, bias=True):
        """The float32 layers the official model promotes (embedders, final linear)."""
        return self.operations.Linear(n_in, n_out, bias=bias, dtype=torch.float32)

    def linear(self, n_in, n_out, *, layer, official=None, bias=False):
        """A transformer layer's linear; ``official``: its kind in the official fp8 checkpoints:
        ``"per_tensor_bf16"`` (q, qx, k, v: the official model builds them returning bfloat16 whatever its
        dtype), ``"per_tensor"`` (fc1), ``"per_channel"`` (linear_proj, fc2), or None (never quantised)."""
        if self.weights == "fp8_official":
            if official is not None and 0 < layer < self.num_layers - 1:
                out_dtype = torch.bfloat16 if official == "per_tensor_bf16" else self.dtype
                return QuantizedFp8Linear(n_in, n_out, per_channel=official == "per_channel", out_dtype=out_dtype)
        elif self.weights in ("fp8_e4m3fn", "fp8_e4m3fn_scaled"):
            kind = self.operations.Linear if self.weights == "fp8_e4m3fn" else scaled_fp8_linear(self.operations)
            module = kind(n_in, n_out, bias=bias, dtype=FP8)
            if bias:  # biases stay in the compute dtype
                module.bias = nn.Parameter(torch.empty(n_out, dtype=self.dtype, device=module.weight.device),
                                           requires_grad=False)
            return module
        return self.operations.Linear(n_in, n_out, bias=bias, dtype=self.dtype)

    def layer_norm(self, dim, eps):
        return self.operations.LayerNorm(dim, eps=eps, dtype=self.dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim, make):
        super().__init__()
        self.mlp = nn.Sequential(make.float32_linear(TIMESTEP_FREQUENCIES, cond_dim), nn.SiLU(),
                                 make.float32_linear(cond_dim, cond_dim))

    def forward(self, t, round_to):
        half = TIMESTEP_FREQUENCIES // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None] * TIMESTEP_SCALE
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        # The official model rounds the embedding to its storage dtype before the float32 MLP.
        embedding = embedding.to(round_to).float()
        return self.mlp(embedding)


class NullCaption(nn.Module):
    """The learned null caption ``(L, caption_channels)``, float32. Its own module, so that ComfyUI's
    partial loading (which moves leaf modules) moves it; the checkpoint key stays
    ``y_embedder.null_caption_embedding`` (see ``CaptionEmbedder``)."""

    def __init__(self, length, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(length, channels, dtype=torch.float32))

    def row(self, index, like):
        """Row ``index`` in float32 on ``like``'s device."""
        return on_device_of(self.weight[index], like).float()


NULL_CAPTION_KEYS = ("null_caption_embedding", "null_caption.weight")  # (in the checkpoints, in the module)


def _checkpoint_names(module, state_dict, prefix, local_metadata):
    state_dict[prefix + NULL_CAPTION_KEYS[0]] = state_dict.pop(prefix + NULL_CAPTION_KEYS[1])


def _module_names(module, state_dict, prefix, *args):
    if prefix + NULL_CAPTION_KEYS[0] in state_dict:
        state_dict[prefix + NULL_CAPTION_KEYS[1]] = state_dict.pop(prefix + NULL_CAPTION_KEYS[0])


class CaptionEmbedder(nn.Module):

    def __init__(self, config: ModelConfig, make):
        super().__init__()
        width = int(config.hidden_size * config.xattn_cond_hidden_ratio)
        # Rows [0, L) are the null caption; rows -2 / -1 feed adaLN for conditional / unconditional calls.
        # (Registered first: parameter order, and so random_dit's draws, stay those of the official layout.)
        self.null_caption = NullCaption(config.caption_max_length, config.caption_channels)
        self.y_proj_xattn = nn.Sequential(make.float32_linear(config.caption_channels, width), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(make.float32_linear(config.caption_channels, config.cond_dim))
        # (public names since torch 2.5; the private ones before)
        post = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post(_checkpoint_names)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_module_names)
        else:
            self._register_load_state_dict_pre_hook(_module_names, with_module=True)

    @property
    def null_caption_embedding(self):
        return self.null_caption.weight


class RotaryEmbedding(nn.Module):
    """3-D RoPE over (frame, row, column) with learned bands: ``dim // 8`` bands per axis, so
    ``6 * (dim // 8)`` of each head's dims are rotated (96 of 128), NeoX style (halves, not pairs)."""

    def __init__(self, dim):
        super().__init__()
        self.bands = nn.Parameter(self.default_bands(dim))  # the checkpoint's learned values replace these

    @staticmethod
    def default_bands(dim):
        """The bands before training: ``10000 ** -(i / bands)``."""
        exponent = torch.arange(dim // 8, dtype=torch.float32) / (dim // 8)
        return 1.0 / 10000.0 ** exponent

    def forward(self, first_frame, frames, height, width, device):
        """cos and sin ``(frames * height * width, 3 * bands)`` for frames ``first_frame ..`` of the video,
        on ``device``.

        Frame positions are absolute latent-frame indices; row and column positions are centred and
        rescaled to the extent of a 16x16 token grid, whatever the resolution.
        """
        bands = self.bands.to(device)
        total = first_frame + frames
        scale = math.sqrt(height * width / 256)
        axes = []
        for size, ref, centred in ((total, total, False), (height, height / scale, True), (width, width / scale, True)):
            pos = torch.arange(size, device=device).float()
            if centred:
                pos = pos - (size - 1) / 2
            if size > 1:
                pos = pos / (size - 1) * (ref - 1)
            axes.append(pos)
        axes[0] = axes[0][first_frame:]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (T, H, W, 3)
        angles = (grid[..., None] * bands.float()).reshape(frames * height * width, -1)
        return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x (N, S, heads, dim)`` by the angles of each token."""
    half = cos.shape[-1]
    cos, sin = cos[None, :, None], sin[None, :, None]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class LinearQKV(nn.Module):
    """The pre-attention LayerNorm and the four projections it feeds (self q/k/v, cross-attention q)."""

    def __init__(self, config: ModelConfig, make, layer):
        super().__init__()
        d, q_dim, kv_dim = config.hidden_size, config.num_attention_heads * config.kv_channels, \
            config.num_query_groups * config.kv_channels
        self.layer_norm = make.layer_norm(d, config.layernorm_epsilon)
        self.q = make.linear(d, q_dim, layer=layer, official="per_tensor_bf16")
        self.qx = make.linear(d, q_dim, layer=layer, official="per_tensor_bf16")
        self.k = make.linear(d, kv_dim, layer=layer, official="per_tensor_bf16")
        self.v = make.linear(d, kv_dim, layer=layer, official="per_tensor_bf16")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, make, layer):
        super().__init__()
        eps, one_plus, hd = config.layernorm_epsilon, config.apply_layernorm_1p, config.kv_channels
        q_dim = config.num_attention_heads * hd
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_query_groups, hd
        self.linear_qkv = LinearQKV(config, make, layer)
        self.linear_kv_xattn = make.linear(int(config.hidden_size * config.xattn_cond_hidden_ratio),
                                           2 * config.num_query_groups * hd, layer=layer)
        self.linear_proj = make.linear(2 * q_dim, config.hidden_size, layer=layer, official="per_channel")
        self.q_layernorm = ZeroCenteredLayerNorm(hd, eps, one_plus, torch.float32)
        self.k_layernorm = ZeroCenteredLayerNorm(hd, eps, one_plus, torch.float32)
        self.q_layernorm_xattn = ZeroCenteredLayerNorm(hd, eps, one_plus, make.dtype)
        self.k_layernorm_xattn = ZeroCenteredLayerNorm(hd, eps, one_plus, make.dtype)

    def forward(self, h, call, layer_index):
        a = self.linear_qkv.layer_norm(h)
        q, k, v = self._qkv(a, call, slice(None))
        if call.cp is not None:  # Ulysses: the whole sequence for this rank's heads, and back after
            q, k, v = call.cp.to_heads(q, "q"), call.cp.to_heads(k, "kv"), call.cp.to_heads(v, "kv")
        self_out = call.self_attention(q, k, v, layer_index)
        if call.cp is not None:
            self_out = call.cp.to_tokens(self_out)
        kx, vx = self.caption_keys(call)
        return self._projected(a, self_out, kx, vx, call.local_lengths, call)

    def self_attention_in_blocks(self, h, call, layer_index):
        """Token-block mode (``MagiDiT.set_token_block``): the layer norm, q/k/v, their norms and RoPE
        computed ``call.token_block`` tokens at a time into whole q, k, v (attention needs every key),
        then the self-attention: its output ``(N, tokens, heads, head_dim)``."""
        n, s, _ = h.shape
        q = h.new_empty(n, s, self.heads, self.head_dim, dtype=call.dtype)
        k = h.new_empty(n, s, self.kv_heads, self.head_dim, dtype=call.dtype)
        v = torch.empty_like(k)
        for rows in call.token_blocks(s):
            q[:, rows], k[:, rows], v[:, rows] = self._qkv(self.linear_qkv.layer_norm(h[:, rows]), call, rows)
        if call.cp is not None:
            q, k, v = call.cp.to_heads(q, "q"), call.cp.to_heads(k, "kv"), call.cp.to_heads(v, "kv")
        self_out = call.self_attention(q, k, v, layer_index)
        del q, k, v
        return self_out if call.cp is None else call.cp.to_tokens(self_out)

    def output_block(self, h, self_out, kx, vx, call, rows):
        """Token-block mode: the float32 attention output of tokens ``rows`` (the layer norm is computed
        again: cheaper than keeping it for every token)."""
        a = self.linear_qkv.layer_norm(h[:, rows])
        return self._projected(a, self_out[:, rows], kx, vx, call.block_lengths(rows), call)

    def caption_keys(self, call):
        """The cross-attention keys and values of the call's packed caption tokens."""
        kv = self.linear_kv_xattn(call.caption).view(-1, self.kv_heads, 2 * self.head_dim)
        return self.k_layernorm_xattn(kv[..., :self.head_dim]), kv[..., self.head_dim:]

    def _qkv(self, a, call, rows):
        """Self-attention q, k, v (normed, rotated, in the compute dtype) of the tokens ``rows`` of ``a``."""
        n, s, _ = a.shape
        q = self._normed_rotated(self.linear_qkv.q(a), self.heads, self.q_layernorm, call, rows)
        k = self._normed_rotated(self.linear_qkv.k(a), self.kv_heads, self.k_layernorm, call, rows)
        v = self.linear_qkv.v(a).view(n, s, self.kv_heads, self.head_dim).to(call.dtype)
        return q, k, v

    def _projected(self, a, self_out, kx, vx, lengths, call):
        """Cross-attention of ``a``'s tokens (``lengths``: their counts per sequence and chunk), then
        linear_proj of [self | cross]: float32 ``(N, S, D)``."""
        n, s, _ = a.shape
        qx = self.linear_qkv.qx(a).to(call.dtype).view(n, s, self.heads, self.head_dim)
        qx = self.q_layernorm_xattn(qx)
        cross_out = attend_segments(qx.reshape(n * s, self.heads, self.head_dim), kx, vx,
                                    lengths, call.caption_lengths, call.backend)

        # [self | cross] -> 8 interleaved shards [self_0, cross_0, self_1, cross_1, ...]
        shard = self.heads * self.head_dim // PROJ_SHARDS  # (explicit: a rank may hold no tokens, s = 0)
        out = torch.stack([self_out.reshape(n, s, PROJ_SHARDS, shard), cross_out.view(n, s, PROJ_SHARDS, shard)], dim=3)
        out = out.reshape(n, s, 2 * PROJ_SHARDS * shard)
        if isinstance(self.linear_proj, QuantizedFp8Linear):  # the official fp8 layer takes the compute dtype
            return self.linear_proj(out).float()
        return self.linear_proj(out.float())  # in float32, as the official model does

    def _normed_rotated(self, x, heads, norm, call, rows):
        x = norm(x.view(*x.shape[:2], heads, self.head_dim).float())
        return apply_rotary(x, call.rope_cos[rows], call.rope_sin[rows]).to(call.dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, make, layer):
        super().__init__()
        self.gated = config.gated_linear_unit
        self.layer_norm = make.layer_norm(config.hidden_size, config.layernorm_epsilon)
        self.linear_fc1 = make.linear(config.hidden_size, config.fc1_out, layer=layer, official="per_tensor")
        self.linear_fc2 = make.linear(config.ffn_hidden_size, config.hidden_size, layer=layer, official="per_channel")

    def forward(self, h):
        x = self.linear_fc1(self.layer_norm(h))
        if self.gated:  # SwiGLU: the first half is the gate
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(x)
        return self.linear_fc2(x)


class AdaModulateLayer(nn.Module):
    """The two per-chunk output gates (attention, MLP) of a layer, from the chunk's condition."""

    def __init__(self, config: ModelConfig, make, layer):
        super().__init__()
        width = int(2 * config.hidden_size * config.cond_gating_ratio)
        self.proj = nn.Sequential(make.linear(config.cond_dim, width, layer=layer, bias=True))

    def forward(self, condition):
        gates = self.proj(F.silu(condition))
        return torch.tanh(gates.float()).to(gates.dtype).float().chunk(2, dim=-1)  # soft cap 1


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, make, layer):
        super().__init__()
        eps, one_plus = config.layernorm_epsilon, config.apply_layernorm_1p
        self.ada_modulate_layer = AdaModulateLayer(config, make, layer)
        self.self_attention = Attention(config, make, layer)
        self.self_attn_post_norm = ZeroCenteredLayerNorm(config.hidden_size, eps, one_plus, torch.float32)
        self.mlp = MLP(config, make, layer)
        self.mlp_post_norm = ZeroCenteredLayerNorm(config.hidden_size, eps, one_plus, torch.float32)

    def forward(self, h, call, layer_index):
        if call.token_block is not None:
            return self._forward_in_blocks(h, call, layer_index)
        gate_attn, gate_mlp = self.ada_modulate_layer(call.condition)
        attn = self.self_attention(h, call, layer_index)
        h = (self.self_attn_post_norm(call.gated(attn, gate_attn)) + h.float()).to(call.dtype)
        del attn  # float32 and as large as h twice over: not kept through the MLP
        mlp = self.mlp(h)
        return (self.mlp_post_norm(call.gated(mlp.float(), gate_mlp)) + h.float()).to(call.dtype)

    def _forward_in_blocks(self, h, call, layer_index):
        """``forward`` with the per-token work (everything but the two attentions' kernels over all
        tokens) done ``call.token_block`` tokens at a time, each block's result written into one new
        ``h``: the float32 temporaries and the MLP's wide ones exist for one block only."""
        gate_attn, gate_mlp = self.ada_modulate_layer(call.condition)
        attention = self.self_attention
        self_out = attention.self_attention_in_blocks(h, call, layer_index)
        kx, vx = attention.caption_keys(call)
        out = torch.empty_like(h)
        for rows in call.token_blocks(h.shape[1]):
            attn = call.gate_in_place(attention.output_block(h, self_out, kx, vx, call, rows), gate_attn, rows)
            out[:, rows] = (self.self_attn_post_norm(attn) + h[:, rows].float()).to(call.dtype)
            del attn  # (not alive while the next block's is computed)
        del self_out
        for rows in call.token_blocks(h.shape[1]):
            x = out[:, rows]  # the block is read whole before its result overwrites it
            mlp = call.gate_in_place(self.mlp(x).float(), gate_mlp, rows)
            out[:, rows] = (self.mlp_post_norm(mlp) + x.float()).to(call.dtype)
            del mlp
        return out


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, make):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, make, i) for i in range(config.num_layers))
        self.final_layernorm = ZeroCenteredLayerNorm(config.hidden_size, config.layernorm_epsilon,
                                                     config.apply_layernorm_1p, torch.float32)


class FinalLinear(nn.Module):
    def __init__(self, config: ModelConfig, make):
        super().__init__()
        patch = config.t_patch_size * config.patch_size * config.patch_size
        self.linear = make.float32_linear(config.hidden_size, patch * config.out_channels, bias=False)


class MagiDiT(nn.Module):
    """The MAGI-1 DiT. Build it with ``magi1.build_dit`` or load it with ``magi1.load_dit``.

    ``operations``: the namespace of Linear / LayerNorm / Conv3d classes (default ``magi1.network.ops.CastOps``;
    ComfyUI's loader passes ``comfy.ops.manual_cast``); ``weights``: how the transformer layers' large
    weights are stored (see ``LayerFactory``).
    """

    def __init__(self, config: ModelConfig, dtype=torch.float32, *, operations=None, weights=None):
        super().__init__()
        self.config = config
        c = config
        make = LayerFactory(operations or CastOps, dtype, weights, c.num_layers)
        self.compute_dtype, self.weights = dtype, weights
        kernel = (c.t_patch_size, c.patch_size, c.patch_size)
        self.x_embedder = make.operations.Conv3d(c.in_channels, c.hidden_size, kernel_size=kernel, stride=kernel,
                                                 bias=False, dtype=torch.float32)
        self.t_embedder = TimestepEmbedder(c.cond_dim, make)
        self.y_embedder = CaptionEmbedder(c, make)
        self.rope = RotaryEmbedding(c.hidden_size // c.num_attention_heads)
        self.videodit_blocks = TransformerBlock(c, make)
        self.final_linear = FinalLinear(c, make)
        self.attention_backend = "auto"
        self.variant = None  # set by load_dit: e.g. "4.5B_distill"; None for a bare build
        self.distill = False  # distilled checkpoints add the step-size embedding (see ``distill_dt``)
        self.variant_reason = "built, not loaded"  # load_dit says why it chose base or distill
        self.execution_device = None  # where calls run when the weights are spread (ComfyUI partial loading)
        self.parallel = None  # a magi1.Parallel when several processes share this model (magi1.weights.layer_sharding)
        self.context_parallel = None  # its magi1.distributed.parallel.ContextParallel: how they share each call
        self.token_block = None  # low-memory mode: see ``set_token_block``

    @property
    def dtype(self):
        """The compute dtype of the transformer layers (their weights' dtype unless those are float8)."""
        return self.compute_dtype

    @property
    def device(self):
        """Where the model computes: ``execution_device`` when set, else where its patch embedding is."""
        if self.execution_device is not None:
            return torch.device(self.execution_device)
        return self.x_embedder.weight.device

    def configure(self, **settings):
        """The one way to change how a built model runs (not what it is): ``attention_backend``,
        ``token_block`` (see their ``set_`` methods) and ``execution_device`` (where calls compute when the
        weights are spread, e.g. by ComfyUI's partial loading; None: where the patch embedding is). Returns
        the previous values of the settings given, so that a caller can restore them."""
        unknown = set(settings) - set(RUN_SETTINGS)
        if unknown:
            raise ValueError(f"MagiDiT.configure takes {sorted(RUN_SETTINGS)}, got {sorted(unknown)}")
        before = {name: getattr(self, name) for name in settings}
        for name, value in settings.items():
            RUN_SETTINGS[name](self, value)
        return before

    def set_attention_backend(self, name):
        """``"auto"`` (flash-attn on CUDA when installed, else SDPA), ``"flash"`` or ``"sdpa"``."""
        if name not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
        self.attention_backend = name

    def set_token_block(self, tokens):
        """Low-memory mode: each layer does its per-token work (q/k/v and their norms and RoPE, the
        cross-attention, linear_proj, the gated post-norms and residuals, the MLP) at most ``tokens`` tokens
        at a time, so that its temporaries are a block's instead of the window's; the self-attention
        still sees every key. The outputs differ only by float rounding. ``None`` (the default): all at once."""
        self.token_block = None if tokens is None else check_int("token_block", tokens, low=1, hint=" or None")

    def _set_execution_device(self, device):
        self.execution_device = None if device is None else torch.device(device)

    def patch_embedding(self, x):
        """The float32 patch embedding ``(N, D, T, H/2, W/2)`` of latents ``(N, 16, T, H, W)``: the first
        thing a forward computes, and the change feature the reuse policy compares between steps."""
        x = x.float() * self.config.x_rescale_factor
        if self.config.half_channel_vae:  # the 24B model doubles the 16 latent channels into its 32 inputs
            x = torch.cat([x, x], dim=1)
        return self.x_embedder(x)

    def forward(self, x, t, caption, caption_mask, kv_range, *, slice_point=0, unconditional=False,
                distill_dt=None, kv_cache=None, kv_write_chunks=0, active=None, stop=None):
        """Velocities of a window of chunks.

        Args:
            x: ``(N, C, T, H, W)`` latents of the window's chunks (``C`` = 16 latent channels), oldest
                first; ``T`` is a multiple of the chunk count. ``N > 1`` runs independent sequences
                (the unconditional guidance pass, one chunk each) and needs no cache.
            t: ``(N, chunks)`` time of each chunk, 0 = noise, 1 = clean.
            caption: ``(N, chunks, L, caption_channels)`` caption tokens of each chunk.
            caption_mask: ``(N, chunks, L)``, true for the caption tokens to attend to.
            kv_range: ``(chunks, 2)`` host integers (or a tensor): window chunk ``j`` attends to key
                tokens ``[start, end)``, numbered from the start of the video (the cache's rows,
                then this window from ``slice_point * chunk_tokens``). Same for every sequence.
            slice_point: chunks of the video before the window (absolute positions start there).
            unconditional: adaLN reads the learned unconditional token instead of the conditional one.
            distill_dt: for distilled checkpoints, the step-size value (``magi1.network.dit.distill_dt``).
            kv_cache: a ``KVCache`` holding the keys/values before the window (required when a range
                reaches before the window, or for a sparse call).
            kv_write_chunks: how many leading window chunks have their fresh keys/values stored
                in ``kv_cache`` at their positions (0: the call reads the cache only).
            active: sparse forward. ``None`` computes every token; otherwise one entry per window
                chunk: ``None`` (all tokens), or a 1-D index tensor of the chunk's tokens to compute
                (empty: skip the chunk). Tokens not computed keep the keys/values stored in ``kv_cache``
                (so those chunks must be among the written ones) and get a zero velocity.
            stop: a callable that interrupts by raising (e.g. ComfyUI's interrupt check), polled before
                every layer and between blocks of ``QUERY_BLOCK`` queries (and of tokens, see
                ``set_token_block``); outputs are unchanged by it.

        Returns:
            ``(N, C, T, H, W)`` float32 velocities.
        """
        n, _, frames, height, width = x.shape
        chunks = t.shape[1]
        call = _Call(self, x, t, caption_mask, kv_range, slice_point, kv_cache, kv_write_chunks, active)
        call.stop = stop
        call.token_block = self.token_block

        h = self._tokens(call, x, slice_point)
        self._condition(call, t, distill_dt, unconditional, x)
        self._caption_tokens(call, caption, caption_mask)
        for index, layer in enumerate(self.videodit_blocks.layers):
            if stop is not None:
                stop()
            h = layer(h, call, index)
        return self._velocities(call, h, n, chunks, frames, height, width)

    def _tokens(self, call, x, slice_point):
        """The patch-embedded tokens this process computes ``(N, tokens, D)``, and their RoPE tables on ``call``."""
        frames = x.shape[2]
        h = self.patch_embedding(x)  # (N, D, T, H/2, W/2)
        h = h.flatten(2).transpose(1, 2).to(call.dtype)  # (N, tokens, D)
        if call.selected is not None:
            h = h[:, call.selected]

        pt = self.config.t_patch_size  # RoPE counts patched frames, from the first frame of the video
        cos, sin = self.rope(slice_point * call.frames_per_chunk // pt, frames // pt, call.grid_h, call.grid_w, x.device)
        if call.selected is not None:
            cos, sin = cos[call.selected], sin[call.selected]
        if call.cp is not None:  # this rank's share of the tokens
            first, end = call.share_tokens(h.shape[1])
            h, cos, sin = h[:, first:end], cos[first:end], sin[first:end]
        call.rope_cos, call.rope_sin = cos, sin
        return h

    def _condition(self, call, t, distill_dt, unconditional, x):
        """Per-chunk condition: timestep (+ step size) embedding plus the learned adaLN caption token."""
        n, chunks = t.shape
        t_flat = t.reshape(-1).float()
        t_emb = self.t_embedder(t_flat, call.dtype)
        if distill_dt is not None:
            t_emb = t_emb + self.t_embedder(torch.full_like(t_flat, float(distill_dt)), call.dtype)
        token = self.y_embedder.null_caption.row(-1 if unconditional else -2, x)
        y_adaln = self.y_embedder.y_proj_adaln(token)
        call.condition = (t_emb.view(n, chunks, -1) + y_adaln).to(call.dtype)

    def _caption_tokens(self, call, caption, caption_mask):
        """Caption tokens for cross-attention: only the valid ones, packed chunk after chunk."""
        valid = caption_mask.reshape(-1, caption_mask.shape[-1]).bool()
        call.caption_lengths = valid.sum(dim=1).tolist()
        y = caption.reshape(-1, caption.shape[-1])[valid.reshape(-1)].float()
        call.caption = self.y_embedder.y_proj_xattn(y).to(call.dtype)

    def _velocities(self, call, h, n, chunks, frames, height, width):
        """The final norm and linear, gathered back to every token of the window: ``(N, C, T, H, W)`` float32."""
        config = self.config
        h = self.videodit_blocks.final_layernorm(h.float())
        out = self.final_linear.linear(h)  # (N, tokens, pT*pH*pW*C), float32
        if call.cp is not None:
            out = call.cp.gather_tokens(out)
        if call.selected is not None:
            full = out.new_zeros(n, chunks * call.chunk_tokens, out.shape[-1])
            full[:, call.selected] = out
            out = full
        p, pt = config.patch_size, config.t_patch_size
        out = out.view(n, frames // pt, call.grid_h, call.grid_w, pt, p, p, config.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(n, config.out_channels, frames, height, width)
        if config.half_channel_vae:
            out = out[:, : config.out_channels // 2]
        return out / config.x_rescale_factor


RUN_SETTINGS = {"attention_backend": MagiDiT.set_attention_backend, "token_block": MagiDiT.set_token_block,
                "execution_device": MagiDiT._set_execution_device}  # what MagiDiT.configure may change


@dataclass
class _KeySpace:
    """One layer's keys/values as seen by this call: the cache rows ``[first, boundary)`` (the clean
    prefix the call reads and the window rows it has just written), then ``tail``: fresh keys/values
    of the window chunks not written to the cache (positions ``boundary ..``)."""

    first: int
    boundary: int
    cached: Optional[tuple]
    tail: tuple

    def keys(self, start, end):
        parts_k, parts_v = [], []
        if start < self.boundary:
            k, v = self.cached
            rows = slice(start - self.first, min(end, self.boundary) - self.first)
            parts_k.append(k[None, rows])
            parts_v.append(v[None, rows])
        if end > self.boundary:
            k, v = self.tail
            rows = slice(max(start, self.boundary) - self.boundary, end - self.boundary)
            parts_k.append(k[:, rows])
            parts_v.append(v[:, rows])
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        return torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)


def _checked_shapes(config, x, t, caption_mask):
    """``(sequences, chunks)`` of a forward call's inputs, or an error naming the shape that does not fit."""
    if x.dim() != 5 or t.dim() != 2 or t.shape[0] != x.shape[0]:
        raise ValueError(f"x must be (N, C, T, H, W) and t (N, chunks); got {tuple(x.shape)} and {tuple(t.shape)}")
    n, channels, frames, height, width = x.shape
    chunks = t.shape[1]
    if channels != config.latent_channels:
        raise ValueError(f"x has {channels} channels; this model takes {config.latent_channels}")
    p, pt = config.patch_size, config.t_patch_size
    if frames % chunks or (frames // chunks) % pt or height % p or width % p:
        raise ValueError(f"x of {frames} frames x {height} x {width} does not split into {chunks} chunks of "
                         f"{pt}x{p}x{p} patches")
    if tuple(caption_mask.shape[:2]) != (n, chunks):
        raise ValueError(f"caption_mask must be (N, chunks, L) = ({n}, {chunks}, L), got {tuple(caption_mask.shape)}")
    return n, chunks


class _Call:
    """Everything one forward call shares across layers: token layout, key ranges, cache access."""

    token_block = None  # the model's token-block mode (see ``MagiDiT.set_token_block``), set by its forward

    def __init__(self, model, x, t, caption_mask, kv_range, slice_point, kv_cache, kv_write_chunks, active):
        n, chunks = _checked_shapes(model.config, x, t, caption_mask)
        p, pt = model.config.patch_size, model.config.t_patch_size
        self.dtype = model.dtype
        self.cp = model.context_parallel
        self.backend = resolve_backend(model.attention_backend, x.device, self.dtype)
        self.frames_per_chunk = x.shape[2] // chunks
        self.grid_h, self.grid_w = x.shape[3] // p, x.shape[4] // p
        self.chunk_tokens = ct = self.frames_per_chunk // pt * self.grid_h * self.grid_w
        self.start = slice_point * ct  # absolute position of the window's first token
        self.kv_cache = kv_cache
        self.stop = None  # polled between layers and between blocks of queries (see ``MagiDiT.forward``)
        self.ranges = self._key_ranges(kv_range, chunks, kv_cache)

        written = int(kv_write_chunks)
        if not 0 <= written <= chunks or (written and kv_cache is None):
            raise ValueError(f"kv_write_chunks must be in [0, {chunks}] and needs a KV cache, got {written}")
        if kv_cache is not None and n != 1:
            raise ValueError(f"a cached call takes one sequence, got N={n}")
        self.written = written
        self.query_lengths = [ct] * (n * chunks)  # per (sequence, chunk): its computed queries
        self.selected = None
        if active is not None:
            self.selected, self.query_lengths = self._selected_tokens(active, n, chunks, written, x.device)
        self.first = min([a for a, _ in self.ranges] + [self.start])
        self.boundary = self.start + written * ct
        if kv_cache is not None:  # the rows this call reads and writes (the cache slides past older ones)
            kv_cache.reserve(self.first, self.boundary)
        self.written_tokens = sum(self.query_lengths[:written])
        if self.selected is not None and written:
            self.written_rows = self.selected[: self.written_tokens]  # relative to the window start
        else:
            self.written_rows = None
        self.local_lengths = self.query_lengths  # the queries of this process (context parallel: its share)

    def _key_ranges(self, kv_range, chunks, kv_cache):
        """The checked ``[start, end)`` key range of each window chunk: in the window, or before it with a KV cache."""
        ranges = kv_range.tolist() if torch.is_tensor(kv_range) else [list(r) for r in kv_range]
        if len(ranges) != chunks or any(len(r) != 2 for r in ranges):
            raise ValueError(f"kv_range must hold one [start, end) per window chunk ({chunks}), got {ranges}")
        ranges = [(int(a), int(b)) for a, b in ranges]
        window_end = self.start + chunks * self.chunk_tokens
        lowest = 0 if kv_cache is not None else self.start
        for j, (a, b) in enumerate(ranges):
            if not lowest <= a < b <= window_end:
                raise ValueError(f"kv_range[{j}] = [{a}, {b}) must lie in [{lowest}, {window_end})"
                                 + ("" if kv_cache is not None else " (keys before the window need a KV cache)"))
        return ranges

    def _selected_tokens(self, active, n, chunks, written, device):
        """A sparse call's computed tokens (indices into the window's tokens) and their count per chunk."""
        ct = self.chunk_tokens
        if n != 1:
            raise ValueError(f"a sparse call (active) takes one sequence, got N={n}")
        if len(active) != chunks:
            raise ValueError(f"active must hold one entry per window chunk ({chunks}), got {len(active)}")
        indices, counts = [], []
        for j, idx in enumerate(active):
            if idx is None:
                idx = torch.arange(ct, device=device)
            elif j >= written:
                raise ValueError(f"window chunk {j} is sparse but its keys/values are not in the KV cache: "
                                 f"sparse chunks must be among the first kv_write_chunks ({written})")
            indices.append(idx.to(device=device, dtype=torch.long) + j * ct)
            counts.append(int(idx.numel()))
        return torch.cat(indices), counts

    def share_tokens(self, total):
        """Context parallel: this rank's tokens ``[first, end)`` of each sequence's ``total``, and the
        per-(sequence, chunk) counts of its share (``local_lengths``)."""
        first, end = self.cp.begin_call(total)
        n = len(self.query_lengths) // len(self.ranges)
        per_chunk, offset = [], 0
        for count in self.query_lengths[: len(self.ranges)]:
            per_chunk.append(max(0, min(end, offset + count) - max(first, offset)))
            offset += count
        self.local_lengths = per_chunk * n
        return first, end

    def gated(self, x, per_chunk):
        """``x (N, tokens, D)`` times the gate of each token's chunk (``per_chunk (N, chunks, D)``): a
        broadcast over each chunk's run of tokens, cheaper than gathering a gate per token."""
        n, s, d = x.shape
        if self.selected is None and self.cp is None:  # every chunk has its full run of tokens
            return (x.view(n, len(self.query_lengths) // n, -1, d) * per_chunk[:, :, None]).view(n, s, d)
        parts, offset = [], 0
        for j, count in enumerate(self.local_lengths[: per_chunk.shape[1]]):
            if count:
                parts.append(x[:, offset:offset + count] * per_chunk[:, j:j + 1])
            offset += count
        if len(parts) < 2:
            return parts[0] if parts else x
        return torch.cat(parts, dim=1)

    def token_blocks(self, total):
        """Token-block mode: slices of at most ``token_block`` of this process's ``total`` tokens, in order;
        the stop check is polled between them (not under context parallel: every rank stops between layers)."""
        for first in range(0, total, self.token_block):
            if first and self.stop is not None and self.cp is None:
                self.stop()
            yield slice(first, min(first + self.token_block, total))

    def gate_in_place(self, x, per_chunk, rows):
        """``gated`` for the tokens ``rows`` of each sequence: ``x (N, rows, D)`` multiplied in place by
        each token's chunk gate (the same products; a block may span chunks), and returned."""
        for j, start, end in self._runs(rows):
            x[:, start - rows.start:end - rows.start] *= per_chunk[:, j:j + 1]
        return x

    def block_lengths(self, rows):
        """Per (sequence, chunk), as ``local_lengths``: how many of its tokens lie in ``rows``."""
        counts = [0] * len(self.ranges)
        for j, start, end in self._runs(rows):
            counts[j] = end - start
        return counts * (len(self.local_lengths) // len(self.ranges))

    def _runs(self, rows):
        """``(chunk, start, end)``: each window chunk's tokens within ``rows`` (a slice of each sequence's
        tokens on this process; sparse and context-parallel calls hold ``local_lengths`` per chunk)."""
        offset = 0
        for j, count in enumerate(self.local_lengths[: len(self.ranges)]):
            start, end = max(rows.start, offset), min(rows.stop, offset + count)
            if start < end:
                yield j, start, end
            offset += count

    def self_attention(self, q, k, v, layer):
        """Block-causal attention: the computed queries of window chunk j attend to ``ranges[j]``."""
        space = self._key_space(k, v, layer)
        out = torch.empty_like(q)
        offset = 0
        for j, (start, end) in enumerate(self.ranges):
            count = self.query_lengths[j]
            if count:
                keys, values = space.keys(start, end)
                if self.cp is not None and self.cp.kv_expand is not None:  # one KV head per query head
                    expand = self.cp.expand_index(keys.device)
                    keys, values = keys.index_select(2, expand), values.index_select(2, expand)
                self._attend_in_blocks(q, out, offset, count, keys, values)
            offset += count
        return out

    def _attend_in_blocks(self, q, out, offset, count, keys, values):
        """One chunk's queries, in blocks of about ``BLOCK_FLOPS`` of work when a stop check is given,
        polling it between blocks (a block of a multiple of 128 queries gives the same values as the whole)."""
        block = count
        if self.stop is not None and self.cp is None:  # (context parallel: between layers only, as every rank)
            work = 4 * keys.shape[1] * q.shape[2] * q.shape[3]  # FLOPs per query
            block = min(count, max(128, int(BLOCK_FLOPS.get(q.device.type, 1e13) // work) // 128 * 128))
        for first in range(offset, offset + count, block):
            last = min(first + block, offset + count)
            if first > offset:
                self.stop()
            out[:, first:last] = attend(q[:, first:last], keys, values, self.backend)

    def _key_space(self, k, v, layer):
        if self.kv_cache is None:
            return _KeySpace(self.first, self.boundary, None, (k, v))
        k0, v0 = k[0], v[0]
        cached_k, cached_v = self.kv_cache.read(layer, self.first, self.boundary)
        if self.written:
            window = self.start - self.first
            fresh_k, fresh_v = k0[: self.written_tokens], v0[: self.written_tokens]
            if self.written_rows is None:
                cached_k[window:].copy_(fresh_k)
                cached_v[window:].copy_(fresh_v)
            else:
                cached_k[window:].index_copy_(0, self.written_rows, fresh_k)
                cached_v[window:].index_copy_(0, self.written_rows, fresh_v)
            if self.kv_cache.offload:
                self.kv_cache.write(layer, self.start, cached_k[window:], cached_v[window:])
        tail = (k[:, self.written_tokens:], v[:, self.written_tokens:])
        return _KeySpace(self.first, self.boundary, (cached_k, cached_v), tail)
