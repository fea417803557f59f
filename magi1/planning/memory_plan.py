"""GPU memory of a MAGI-1 generation, predicted before anything is allocated.

``memory_plan(config, request, ...)`` counts, analytically from the ``ModelConfig`` and the
``VideoRequest``, what a ``magi1.generate`` run followed by a tiled VAE decode puts on the GPU (on the CPU: in
memory, the same numbers; ``device`` words ``MemoryPlan.lines`` by where the run is): the DiT weights
(by dtype, with fp8 and block-swap streaming), the KV caches each guidance stream keeps
(``magi1.sampling.guidance``), the cache policy's per-chunk state (``cache_core``), the activation peak of one
DiT window call and the peak of the tiled decode. ``MemoryPlan.savings(available)`` says which changes
would make a run fit.

What is not counted: the text encoder (it runs before the DiT and is unloaded), the CUDA context and
allocator fragmentation (a few hundred MB: keep a margin), and attention score matrices (flash-attn /
SDPA flash and memory-efficient kernels never materialise them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from ..checks import check_choice, check_int
from ..network.config import ModelConfig
from ..sampling.layout import TEMPORAL_DOWNSAMPLE, VideoLayout
from ..sampling.request import VideoRequest
from ..sampling.schedule import (NOISE2CLEAN_KVRANGE, call_rows, kv_span, prefix_pieces, total_forward_steps,
                                 window_step)
from ..video.vae import SEAMLESS, VAEConfig, VAETiling

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official")
REUSE_KINDS = ("off", "chunk", "token")  # what a policy keeps: VideoRequest.reuse
FP8 = "float8_e4m3fn"
# The weight matrices of a transformer layer that the fp8 kinds store in float8_e4m3fn.
FP8_LINEARS = ("self_attention.linear_qkv.q", "self_attention.linear_qkv.qx", "self_attention.linear_qkv.k",
               "self_attention.linear_qkv.v", "self_attention.linear_kv_xattn", "self_attention.linear_proj",
               "mlp.linear_fc1", "mlp.linear_fc2", "ada_modulate_layer.proj.0")
# fp8_official: which linears are fp8 in layers 1..L-2, and which of them carry a smooth scale
OFFICIAL_FP8 = ("self_attention.linear_qkv.q", "self_attention.linear_qkv.qx", "self_attention.linear_qkv.k",
                "self_attention.linear_qkv.v", "mlp.linear_fc1", "self_attention.linear_proj", "mlp.linear_fc2")
OFFICIAL_SMOOTHED = ("self_attention.linear_proj", "mlp.linear_fc2")
GB = 1e9


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _add(total, dtype, nbytes):
    total[dtype] = total.get(dtype, 0) + int(nbytes)


# ----------------------------------------------------------------------------------------------- weights
def layer_tensors(config: ModelConfig):
    """``(name, shape, role)`` of every tensor of one transformer layer (names as in the checkpoint);
    role: "linear" (a weight matrix), "compute" (compute dtype) or "float32" (promoted by the model)."""
    c = config
    d, hd, f = c.hidden_size, c.kv_channels, c.fc1_out
    q, kv, dx = c.num_attention_heads * hd, c.num_query_groups * hd, int(d * c.xattn_cond_hidden_ratio)
    gates = int(2 * d * c.cond_gating_ratio)
    out = [("ada_modulate_layer.proj.0.weight", (gates, c.cond_dim), "linear"),
           ("ada_modulate_layer.proj.0.bias", (gates,), "compute")]
    for name, rows in (("q", q), ("qx", q), ("k", kv), ("v", kv)):
        out.append((f"self_attention.linear_qkv.{name}.weight", (rows, d), "linear"))
    out += [("self_attention.linear_kv_xattn.weight", (2 * kv, dx), "linear"),
            ("self_attention.linear_proj.weight", (d, 2 * q), "linear"),
            ("mlp.linear_fc1.weight", (f, d), "linear"),
            ("mlp.linear_fc2.weight", (d, c.ffn_hidden_size), "linear")]
    norms = (("self_attention.linear_qkv.layer_norm", d, "compute"), ("self_attention.q_layernorm", hd, "float32"),
             ("self_attention.k_layernorm", hd, "float32"), ("self_attention.q_layernorm_xattn", hd, "compute"),
             ("self_attention.k_layernorm_xattn", hd, "compute"), ("self_attn_post_norm", d, "float32"),
             ("mlp.layer_norm", d, "compute"), ("mlp_post_norm", d, "float32"))
    for name, width, role in norms:
        out += [(f"{name}.weight", (width,), role), (f"{name}.bias", (width,), role)]
    return out


def outer_tensors(config: ModelConfig):
    """``(name, shape)`` of the tensors outside the transformer layers: all float32."""
    c = config
    d, patch = c.hidden_size, c.t_patch_size * c.patch_size * c.patch_size
    dx, bands = int(d * c.xattn_cond_hidden_ratio), (d // c.num_attention_heads) // 8
    return [("x_embedder.weight", (d, c.in_channels, c.t_patch_size, c.patch_size, c.patch_size)),
            ("t_embedder.mlp.0.weight", (c.cond_dim, 256)), ("t_embedder.mlp.0.bias", (c.cond_dim,)),
            ("t_embedder.mlp.2.weight", (c.cond_dim, c.cond_dim)), ("t_embedder.mlp.2.bias", (c.cond_dim,)),
            ("y_embedder.y_proj_xattn.0.weight", (dx, c.caption_channels)), ("y_embedder.y_proj_xattn.0.bias", (dx,)),
            ("y_embedder.y_proj_adaln.0.weight", (c.cond_dim, c.caption_channels)),
            ("y_embedder.y_proj_adaln.0.bias", (c.cond_dim,)),
            ("y_embedder.null_caption_embedding", (c.caption_max_length, c.caption_channels)),
            ("rope.bands", (bands,)),
            ("videodit_blocks.final_layernorm.weight", (d,)), ("videodit_blocks.final_layernorm.bias", (d,)),
            ("final_linear.linear.weight", (patch * c.out_channels, d))]


def layer_weight_bytes(config, index, weight_dtype="bfloat16", compute_dtype=torch.bfloat16):
    """``{dtype name: bytes}`` of transformer layer ``index`` stored as ``weight_dtype``."""
    check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    fp8 = weight_dtype.startswith("fp8")
    compute = dtype_name(compute_dtype) if fp8 else weight_dtype
    official = weight_dtype == "fp8_official" and 0 < index < config.num_layers - 1
    total = {}
    for name, shape, role in layer_tensors(config):
        n, linear = math.prod(shape), name[: -len(".weight")]
        if role == "float32":
            _add(total, "float32", 4 * n)
        elif role == "linear" and official and linear in OFFICIAL_FP8:
            _add(total, FP8, n)
            scales = 1 + (1 + shape[1] if linear in OFFICIAL_SMOOTHED else shape[1])  # weight, input, smooth
            _add(total, "float32", 4 * scales)
        elif role == "linear" and fp8 and weight_dtype != "fp8_official" and linear in FP8_LINEARS:
            _add(total, FP8, n)
            if weight_dtype == "fp8_e4m3fn_scaled":
                _add(total, "float32", 4)
        else:
            _add(total, compute, n * _size(getattr(torch, compute)))
    return total


def weight_bytes(config, weight_dtype="bfloat16", compute_dtype=torch.bfloat16):
    """``{dtype name: bytes}`` of the whole DiT stored as ``weight_dtype`` (see ``memory_plan``)."""
    total = {"float32": 4 * sum(math.prod(shape) for _, shape in outer_tensors(config))}
    for index in range(config.num_layers):
        for dtype, nbytes in layer_weight_bytes(config, index, weight_dtype, compute_dtype).items():
            _add(total, dtype, nbytes)
    return total


def vae_weight_bytes(config: VAEConfig = VAEConfig(), dtype=torch.bfloat16):
    """Bytes of the whole VAE (encoder and decoder, as loaded) in ``dtype``."""
    e, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    block = 4 * e * e + 4 * e + 2 * e + 2 * e * hidden + hidden + e
    shared = e + (1 + math.prod(config.position_grid)) * e + config.depth * block + 2 * e
    z_out = config.z_chans * (2 if config.double_z else 1)
    encoder = shared + e * config.in_chans * config.patch_length * config.patch_size ** 2 + e + e * z_out + z_out
    unpatch = e // (config.patch_size ** 2 * config.patch_length)
    decoder = shared + config.z_chans * e + e + 3 * unpatch * 27 + 3
    return (encoder + decoder) * _size(dtype)


def _size(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def streamed_weight_bytes(config, weight_dtype="bfloat16", compute_dtype=torch.bfloat16, resident_layers=None):
    """Bytes of the DiT weights on the GPU: everything, or with ``resident_layers=k`` (block swap,
    ``magi1.stream_layers``) what is outside the layers, the first ``k`` layers, and two streamed layers
    (the one running and the one being prefetched), each counted as large as the largest layer."""
    total = sum(weight_bytes(config, weight_dtype, compute_dtype).values())
    if resident_layers is None or resident_layers + 2 >= config.num_layers:
        return total
    outer = 4 * sum(math.prod(shape) for _, shape in outer_tensors(config))
    largest = max(sum(layer_weight_bytes(config, i, weight_dtype, compute_dtype).values())
                  for i in range(config.num_layers))
    return outer + (resident_layers + 2) * largest


# ------------------------------------------------------------------------------------------- KV caches
def kv_cache_bytes(config, layout, *, passes, reuse="off", window_size=4, compute_dtype=torch.bfloat16):
    """``{stream: bytes}`` of the KV caches ``generate`` allocates (``magi1.sampling.guidance``), each as wide as the
    widest call of the schedule (``magi1.sampling.schedule.kv_span``: 5 chunks once the video is longer than the
    window, whatever its length): 1 pass keeps ``main`` (one chunk more when reusing, for the nearly-clean
    copy); 3 passes keep ``cond_pre``, ``cond`` (the same, when reusing) and ``uncond`` (``window_size``
    caches of one chunk, when single tokens are reused). A row is keys and values of every layer."""
    row = 2 * config.num_layers * config.num_query_groups * config.kv_channels * _size(compute_dtype)
    ct, reusing = layout.tokens_per_chunk, reuse != "off"
    steps = math.lcm(window_size, len(NOISE2CLEAN_KVRANGE))  # the chunk pattern does not depend on steps

    def span(extra_blocks=0):
        return kv_span(layout.chunk_num, steps, window_size, layout.chunk_offset, extra_blocks) * ct * row

    if passes == 1:
        return {"main": span(int(reusing))}
    caches = {"cond_pre": span()}
    if reusing:
        caches["cond"] = span()
    if reuse == "token":
        caches["uncond"] = window_size * ct * row
    return caches


@dataclass(frozen=True)
class WindowCalls:
    """The largest DiT calls of a run, in chunks: ``query`` (chunks computed by one call) and ``read``
    (cache rows, in chunks, one layer of an offloaded cache copies to the GPU in one call)."""

    query: int
    read: int
    gathers: bool  # some call's key range spans cache rows and fresh window rows (a concatenated copy)


def window_calls(layout, *, passes, reuse="off", window_size=4):
    """Walk the released schedule (``magi1.sampling.schedule``) and find the largest calls. A 1-pass call is
    counted with its nearly-clean copy (added while the oldest chunk's t > 0.3)."""
    steps = math.lcm(window_size, len(NOISE2CLEAN_KVRANGE))  # the chunk pattern does not depend on steps
    offset, reusing = layout.chunk_offset, reuse != "off"
    copy_blocks = int(passes == 1 and reusing)  # the prefix goes in calls as wide as the cache (guidance.write_prefix)
    pieces = prefix_pieces(offset, kv_span(layout.chunk_num, steps, window_size, offset, copy_blocks))
    query = read = max([end - first for first, end in pieces], default=0)
    gathers = passes == 3 and not reusing  # the cond pass reads the cache without writing its window
    for step in range(total_forward_steps(layout.chunk_num, steps, window_size, offset)):
        plan = window_step(step, chunk_num=layout.chunk_num, num_steps=steps, window_size=window_size,
                           chunk_offset=offset)
        first, end = call_rows(plan, copy_blocks)  # the cache rows the call reads and writes
        query = max(query, len(plan.kv_ranges) + int(passes == 1))
        read = max(read, end - first)
    if passes == 3 and reuse == "token":
        read = max(read, 1)
    return WindowCalls(query, read, gathers)


# ----------------------------------------------------------------------------------------- activations
def dit_activation_bytes(config, layout, calls, *, compute_dtype=torch.bfloat16, fp8=False, token_block=None):
    """Peak bytes of one DiT window call of ``calls.query`` chunks (``S`` query tokens), as ``magi1.network.dit``
    computes it. Per token (``b`` compute bytes; D hidden, Q = heads*head_dim, K = groups*head_dim,
    F = fc1 width) the layer holds its input ``h`` (bD) and the RoPE tables (float32), and at most one of:

    * q: layer norm ``a`` (bD), q (bQ) and three float32 copies for the q norm and RoPE (12Q);
    * attention: a, q, k, v, the output (bD + 2bQ + 2bK), plus one chunk's kernel output (ct * bQ) and,
      when a key range spans the cache and the window, the concatenated keys/values of the widest range;
    * linear_proj: a, q, k, v, self/cross outputs and qx (bD + 4bQ + 2bK), the stacked [self | cross]
      and its float32 copy (2bQ + 8Q) or that copy and the float32 output (8Q + 4D), plus the float32
      copy of the linear_proj weight (2Q * D * 4 bytes);
    * the gated residual after attention: the float32 output, gated, normed, h.float() and the sum (16D)
      and the new h (bD);
    * MLP: h (bD), the layer norm and fc1 output and its activation (bD + 2bF);
    * the gated residual after the MLP: three float32 copies and the sum (16D), h, the MLP output and
      the new h (3bD).

    ``token_block``: the model's low-memory mode (``MagiDiT.set_token_block``), whose phases are those of
    ``_token_block_phases``; None: the default above.

    fp8 weights add one dequantized copy of the largest matrix in the compute dtype. Outside the layers:
    the run's caption table and the call's caption tensors (float32), and the latents (float32: the whole
    video, the call's clone and three copies of its velocity output). Attention scores are never
    materialised (flash kernels); conservative otherwise: every temporary is counted until the Python
    reference to it is dropped.
    """
    c, b = config, _size(compute_dtype)
    d, hd, f = c.hidden_size, c.kv_channels, c.fc1_out
    q, k = c.num_attention_heads * hd, c.num_query_groups * hd
    ct = layout.tokens_per_chunk
    tokens = calls.query * ct
    held = b * d + 2 * 3 * ((d // c.num_attention_heads) // 8) * 4
    gathered = 2 * max(NOISE2CLEAN_KVRANGE) * ct * k * b if calls.gathers else 0
    if token_block is None:
        phases = [(b * d + b * q + 12 * q, 0),
                  (b * d + 2 * b * q + 2 * b * k, ct * q * b + gathered),
                  (b * d + 4 * b * q + 2 * b * k + max(2 * b * q + 8 * q, 8 * q + 4 * d), 2 * q * d * 4),
                  (16 * d + b * d, 0),
                  (2 * b * d + 2 * b * f, 0),
                  (16 * d + 3 * b * d, 0)]
        peak = max(tokens * (held + per_token) + fixed for per_token, fixed in phases)
    else:
        block = min(check_int("token_block", token_block, low=1, hint=" or None"), tokens)
        peak = max(tokens * (held + whole) + block * per_block + fixed
                   for whole, per_block, fixed in _token_block_phases(c, b, ct * q * b + gathered))
    return peak + _fp8_copy_bytes(c, b, fp8) + _sampler_bytes(config, layout, calls)


def _token_block_phases(config, b, attention_fixed):
    """``(whole, per_block, fixed)`` bytes of each phase of a layer in token-block mode: per token of the
    call (besides ``h`` and the RoPE tables), per token of one block, and once. Held for every token:
    q, k, v (bQ + 2bK) until the self-attention has run, its output (bQ) until the last linear_proj block
    has read it, and the layer's new ``h`` (bD) from linear_proj on (each block's result is written into
    it). Per block, as in the default phases and as conservative:

    * q/k/v: the layer norm, q, the block's q, k, v and three float32 copies for a norm and RoPE
      (bD + 2bQ + 2bK + 12Q);
    * attention: nothing per block (``attention_fixed``: one chunk's kernel output, gathered keys/values);
    * linear_proj: the layer norm (computed again), qx, the cross output, the self output's block (a copy
      when N > 1), the stacked [self | cross], its float32 copy and the float32 output
      (bD + 5bQ + 8Q + 4D), plus the float32 copy of the linear_proj weight (once);
    * the gated residual after attention (gated in place): four float32 temporaries and the new h
      (16D + bD);
    * MLP: the layer norm, fc1's output and its activation (bD + 2bF);
    * the gated residual after the MLP: its output, four float32 temporaries and the new h (16D + 2bD).
    """
    c = config
    d, f, q, k = c.hidden_size, c.fc1_out, c.num_attention_heads * c.kv_channels, c.num_query_groups * c.kv_channels
    qkv, attended = b * q + 2 * b * k, b * q  # q, k, v; the self-attention output
    return [(qkv, b * d + 2 * b * q + 2 * b * k + 12 * q, 0),
            (qkv + attended, 0, attention_fixed),
            (attended + b * d, b * d + 5 * b * q + 8 * q + 4 * d, 2 * q * d * 4),
            (attended + b * d, 16 * d + b * d, 0),
            (b * d, b * d + 2 * b * f, 0),
            (b * d, 16 * d + 2 * b * d, 0)]


def _fp8_copy_bytes(config, b, fp8):
    """fp8 weights: one dequantized copy of the largest layer matrix in the compute dtype."""
    return b * max(math.prod(shape) for _, shape, role in layer_tensors(config) if role == "linear") if fp8 else 0


def _sampler_bytes(config, layout, calls):
    """Captions and latents the sampler keeps on the GPU during a call (float32): the caption rows the
    call reads and their stacked copy; the window's chunks (``magi1.sampling.latent_store``), the call's input and
    three copies of its velocity output. None of it grows with the video: the rest is in host memory."""
    caption_row = config.caption_max_length * (config.caption_channels * 4 + 1)
    call_latent = calls.query * layout.chunk_width * config.latent_channels * layout.latent_height * layout.latent_width * 4
    return 2 * calls.query * caption_row + 5 * call_latent


# ---------------------------------------------------------------------------------------- policy state
def policy_state_bytes(config, layout, *, reuse="off", window_size=4, compute_dtype=torch.bfloat16,
                       extrapolation=True):
    """``(held, transient)`` bytes of a cache policy's state (``cache_core``) for the window's chunks.

    Held per chunk (the window's ``window_size`` chunks at most): the previous change feature (the
    patch embedding in the compute dtype, ct x D), the last computed velocity (float32 latent chunk) and,
    with ``extrapolation`` (the presets), the one before; token level adds per token the accumulator,
    reuse count, weights (4 bytes each), the pending mask (1) and with extrapolation the two compute
    times (8). Transient, while deciding (no DiT call runs then): the window's new features and a
    float32 patch embedding (the whole window's when it is at most 64 MiB, else one chunk's)."""
    if reuse == "off":
        return 0, 0
    ct, d, b = layout.tokens_per_chunk, config.hidden_size, _size(compute_dtype)
    chunks = min(window_size, layout.chunk_num - layout.chunk_offset)
    feature = ct * d * b
    velocity = config.latent_channels * layout.chunk_width * layout.latent_height * layout.latent_width * 4
    per_chunk = feature + velocity * (2 if extrapolation else 1) + 16  # + the scalar accumulator
    if reuse == "token":
        per_chunk += ct * (13 + (8 if extrapolation else 0))
    embedding = ct * chunks * d * 4
    if embedding > 64 * 2 ** 20:
        embedding = ct * d * 4
    return chunks * per_chunk, chunks * feature + embedding


# ------------------------------------------------------------------------------------------ VAE decode
def vae_decode_bytes(latent_frames, latent_height, latent_width, tiling=SEAMLESS, *,
                     config: VAEConfig = VAEConfig(), dtype=torch.bfloat16):
    """Peak bytes of ``MagiVAE.decode`` of a latent in host memory with the finished frames going to the host
    (as the ComfyUI node and the CLI do): the whole VAE, a temporal tile's latents twice, two temporal rows of decoded float32 tiles
    (the row being blended and the one before), a row's blended clones and concatenated slab (twice the
    slab), and one tile's decoder activations (per token: x, qkv and its three float32 standardization
    copies, i.e. 4bE + 36E; the unfolded pixels and the output convolution)."""
    sf, tf, b, e = config.patch_size, config.patch_length, _size(dtype), config.embed_dim
    if tiling is None:
        tile = (latent_frames, latent_height, latent_width)
    else:
        tiling.check(sf, tf)
        tile = (tiling.length // tf, tiling.height // sf, tiling.width // sf)
        tile = (min(tile[0], latent_frames), min(tile[1], latent_height), min(tile[2], latent_width))
    stride = tile if tiling is None else (max(int(tile[0] * (1 - tiling.temporal_overlap)), 1),
                                          max(int(tile[1] * (1 - tiling.spatial_overlap)), 1),
                                          max(int(tile[2] * (1 - tiling.spatial_overlap)), 1))
    rows = sum(min(tile[1], latent_height - i) for i in range(0, latent_height, stride[1]))
    cols = sum(min(tile[2], latent_width - j) for j in range(0, latent_width, stride[2]))
    frames = 1 if tile[0] == 1 else tile[0] * tf
    pixel = 3 * frames * sf * sf * 4
    row_of_tiles = rows * cols * pixel
    slab = latent_height * latent_width * pixel
    tokens = math.prod(tile) + 1
    tile_pixels = tile[1] * tile[2] * sf * sf * frames
    tile_work = tokens * e * (4 * b + 36) + 2 * tokens * e * b + tile_pixels * 3 * (b + 4)
    latent = config.z_chans * tile[0] * latent_height * latent_width * 4 * 2  # the latent stays in host memory
    return vae_weight_bytes(config, dtype) + latent + 2 * row_of_tiles + 2 * slab + tile_work


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one generation, in bytes (see ``memory_plan``).

    ``total_gpu`` is the peak: the DiT phase (weights on the GPU + KV on the GPU + policy state + the
    larger of the activation peak and the policy's transient while deciding) and the decode phase (the
    tiled VAE decode, after the KV caches are released and, with ``unload_dit``, the DiT unloaded,
    as ComfyUI's model manager does when the VAE needs the room) do not overlap: the larger counts.
    """

    weights: dict  # dtype name -> bytes of the whole DiT
    weights_on_gpu: int
    weights_host: int  # streamed layers in (pinned) host memory
    kv_caches: dict  # stream -> bytes
    kv_on_gpu: int  # the caches, or with kv_offload one layer's rows that the largest call copies over
    kv_host: int
    policy_state: int
    policy_transient: int
    activations: int
    vae_decode: int
    total_gpu: int
    tokens_per_chunk: int
    chunk_num: int
    request: Optional[VideoRequest] = field(default=None, repr=False, compare=False)
    options: dict = field(default=None, repr=False, compare=False)  # memory_plan's other arguments
    layout: Optional[VideoLayout] = field(default=None, repr=False, compare=False)

    @property
    def dit_phase(self):
        return self.weights_on_gpu + self.kv_on_gpu + self.policy_state + max(self.activations,
                                                                                self.policy_transient)

    def fits(self, available_bytes):
        return fits(self, available_bytes)

    def savings(self, available_bytes):
        return savings(self, available_bytes)

    @property
    def device(self):
        """Where the run computes (``memory_plan``'s ``device``), or None when not given."""
        return (self.options or {}).get("device")

    @property
    def frames_made(self):
        """The video frames the run returns: whole chunks, less a prefix video (a start image is the video's
        first frame), 4 per latent frame; the request's ``frames`` are rounded up to them (``FRAMES_RULE``)."""
        return (self.layout.latent_frames - self.layout.output_start) * TEMPORAL_DOWNSAMPLE

    def lines(self):
        """A short table, GB with two decimals, worded by the device: on the GPU "weights on GPU", on the CPU
        "weights in memory" (the numbers are the same)."""
        r, o, cpu = self.request, self.options, self.device is not None and self.device.type == "cpu"
        on, where = ("in", "memory") if cpu else ("on", "GPU")
        prefix = r.prefix_frames
        head = (f"MAGI-1 memory plan: {self.frames_made} frames {r.height}x{r.width}, {self.chunk_num} chunks of "
                f"{self.tokens_per_chunk} tokens, weights {o['weight_dtype']}, {o['passes']} pass(es), "
                f"cache {r.reuse}" + (", KV offloaded" if r.kv_offload else "")
                + (f", {o['resident_layers']} resident layers" if o["resident_layers"] is not None else "")
                + (f", token blocks of {r.token_block}" if r.token_block else "")
                + ("" if not prefix else ", from a start image" if prefix == 1 else
                   f", after a prefix video of {prefix} latent frames")
                + (", on the CPU" if cpu else ""))
        by_dtype = ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(self.weights.items()))
        rows = [(f"weights {on} {where}", self.weights_on_gpu,
                 f"all {sum(self.weights.values()) / GB:.2f}: {by_dtype}")]
        if self.weights_host:
            rows.append(("weights in host memory", self.weights_host, ""))
        rows += [(f"KV cache {name}", nbytes, "host" if r.kv_offload else "CPU memory" if cpu else "GPU")
                 for name, nbytes in self.kv_caches.items()]
        rows += [(f"KV {on} {where}", self.kv_on_gpu, "one layer's rows per call" if r.kv_offload else ""),
                 ("policy state", self.policy_state, f"+ {self.policy_transient / GB:.2f} while deciding"),
                 ("activations (peak call)", self.activations, ""),
                 ("DiT phase", self.dit_phase, ""),
                 ("VAE decode", self.vae_decode, "after the DiT phase" if o["decode"] else "not counted"),
                 (f"total {where} (peak)", self.total_gpu, "")]
        return [head] + [f"  {name:<26}{nbytes / GB:8.2f} GB  {note}".rstrip() for name, nbytes, note in rows]


def memory_plan(config, request: VideoRequest, *, weight_dtype="bfloat16", compute_dtype=torch.bfloat16, passes=1,
                resident_layers=None, vae_tiling=SEAMLESS, decode=True, unload_dit=True, extrapolation=True,
                vae_config: VAEConfig = VAEConfig(), vae_dtype=torch.bfloat16, device=None):
    """Predict the GPU memory of generating the video ``request`` describes (a ``VideoRequest``: its frames,
    size, prefix, ``kv_offload``, ``token_block`` and what its policy keeps, ``request.reuse``: "off",
    "chunk" for chunk-level modes such as flowcache/teacache, "token" for motion/motion_detail/hybrid).

    ``config``: a ``ModelConfig`` (or its dict); ``weight_dtype``: one of ``WEIGHT_DTYPES`` (the fp8
    kinds compute in ``compute_dtype``); ``passes``: 1 (distilled) or 3 (base), unless the request's
    guidance says; ``extrapolation``: count the presets' velocity extrapolation in the policy's state;
    ``resident_layers``: block swap (None = all layers resident); ``vae_tiling``: the decode's tiles
    (None: one piece); ``decode``: count the VAE decode. The KV caches are in ``compute_dtype``. The run
    makes whole chunks (``MemoryPlan.frames_made``). ``device`` (a ``torch.device`` or its name; None: a
    GPU) is where the run computes: it words ``MemoryPlan.lines`` (on the CPU the same bytes are host memory).
    """
    if not hasattr(request, "frames_to_generate"):  # duck-typed: a test may load a second copy of the package
        raise TypeError(f"memory_plan takes a magi1.VideoRequest, got {type(request).__name__}")
    passes = request.guidance.passes or passes
    options = dict(config=config, weight_dtype=weight_dtype, compute_dtype=compute_dtype, passes=passes,
                   resident_layers=resident_layers, vae_tiling=vae_tiling, decode=decode, unload_dit=unload_dit,
                   extrapolation=extrapolation, vae_config=vae_config, vae_dtype=vae_dtype,
                   device=None if device is None else torch.device(device))
    config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    check_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    check_choice("passes", passes, (1, 3))
    if resident_layers is not None:
        check_int("resident_layers", resident_layers, low=0, high=config.num_layers)
    layout = request.layout(config.patch_size)
    reuse, window_size, kv_offload = request.reuse, request.window_size, request.kv_offload
    weights = weight_bytes(config, weight_dtype, compute_dtype)
    on_gpu = streamed_weight_bytes(config, weight_dtype, compute_dtype, resident_layers)
    caches = kv_cache_bytes(config, layout, passes=passes, reuse=reuse, window_size=window_size,
                            compute_dtype=compute_dtype)
    calls = window_calls(layout, passes=passes, reuse=reuse, window_size=window_size)
    kv_total = sum(caches.values())
    row = 2 * config.num_query_groups * config.kv_channels * _size(compute_dtype)  # one layer, one token
    capacity = max(caches.values()) // (config.num_layers * row)
    kv_on_gpu = min(calls.read * layout.tokens_per_chunk, capacity) * row if kv_offload else kv_total
    held, transient = policy_state_bytes(config, layout, reuse=reuse, window_size=window_size,
                                         compute_dtype=compute_dtype, extrapolation=extrapolation)
    activations = dit_activation_bytes(config, layout, calls, compute_dtype=compute_dtype,
                                       fp8=weight_dtype.startswith("fp8"), token_block=request.token_block)
    vae = 0
    if decode:
        vae = vae_decode_bytes(layout.latent_frames, layout.latent_height, layout.latent_width, vae_tiling,
                               config=vae_config, dtype=vae_dtype) + (0 if unload_dit else on_gpu)
    dit_phase = on_gpu + kv_on_gpu + held + max(activations, transient)
    return MemoryPlan(weights, on_gpu, sum(weights.values()) - on_gpu, caches, kv_on_gpu,
                      kv_total if kv_offload else 0, held, transient, activations, vae, max(dit_phase, vae),
                      layout.tokens_per_chunk, layout.chunk_num, request, options, layout)


def fits(plan, available_bytes):
    """Whether ``plan``'s peak fits in ``available_bytes`` of GPU memory."""
    return plan.total_gpu <= available_bytes


def replan(plan, **changes):
    """The plan of the same request with some arguments changed: fields of its ``VideoRequest`` (e.g.
    ``kv_offload``, ``token_block``, ``frames``, ``policy``) or ``memory_plan``'s other arguments."""
    fields = {f.name for f in dataclasses.fields(VideoRequest)}
    request = plan.request.with_changes(**{k: v for k, v in changes.items() if k in fields})
    options = {**plan.options, **{k: v for k, v in changes.items() if k not in fields}}
    return memory_plan(options.pop("config"), request, **options)


class Saving(NamedTuple):
    """One change of the memory check's ladder: ``name`` (e.g. ``"kv_offload"``, ``"resident_layers 5"``), the
    ``saved`` bytes, and the ``changes`` to pass to ``replan`` (``memory_plan``'s or the request's)."""

    name: str
    saved: int
    changes: dict

    def __str__(self):
        return f"{self.name} saves {self.saved / GB:.2f} GB"


def savings(plan, available_bytes):
    """``[Saving, ...]``: changes that make ``plan`` fit ``available_bytes``, the ones that change the video
    least first, each applied on top of the ones before it (so each saving is the difference of two
    consecutive plans) until the plan fits; empty if it fits already. Order: KV offload (same video,
    slower), token blocks (the same video to float rounding, a little slower), fp8 weights (slightly
    different numbers), block swap with the most resident layers that fit (same video, slower), the cache
    off, smaller VAE tiles, fewer frames. The last entry may still not fit when nothing does (then every
    change is listed)."""
    out, current = [], plan
    for change in (_offload, _token_blocks, _fp8, _resident, _cache_off, _vae_tiles, _fewer_frames):
        if fits(current, available_bytes):
            break
        found = change(current, available_bytes)
        if found is None:
            continue
        name, changes, better = found
        saved = current.total_gpu - better.total_gpu
        if saved > 0:
            out.append(Saving(name, saved, changes))
            current = better
    return out


def _change(plan, name, **changes):
    return name, changes, replan(plan, **changes)


def _offload(plan, available):
    return None if plan.request.kv_offload else _change(plan, "kv_offload", kv_offload=True)


TOKEN_BLOCKS = (16384, 8192, 4096)  # the low-memory mode's block sizes the memory check suggests, largest first


def _token_blocks(plan, available):
    if plan.request.token_block:
        return None
    return _first_fitting(plan, available, "token_block", TOKEN_BLOCKS, lambda n: f"token_block {n}")


def _fp8(plan, available):
    return None if plan.options["weight_dtype"].startswith("fp8") else (  # the more accurate kind
        _change(plan, "weight_dtype fp8_e4m3fn_scaled", weight_dtype="fp8_e4m3fn_scaled"))


def _first_fitting(plan, available, name, values, describe):
    """The first value of ``values`` whose plan fits, else the last one's plan."""
    best = None
    for value in values:
        best = _change(plan, describe(value), **{name: value})
        if fits(best[2], available):
            break
    return best


def _resident(plan, available):
    layers = plan.options["config"]
    layers = (layers if isinstance(layers, ModelConfig) else ModelConfig.from_dict(layers)).num_layers
    top = plan.options["resident_layers"] or layers
    return _first_fitting(plan, available, "resident_layers", range(top - 1, -1, -1), lambda k: f"resident_layers {k}")


def _cache_off(plan, available):
    return None if plan.request.reuse == "off" else _change(plan, "cache off", policy=None)


def _vae_tiles(plan, available):
    tiling = plan.options["vae_tiling"]
    if not plan.options["decode"] or plan.vae_decode <= available:
        return None
    side = tiling.height if tiling is not None else 10 ** 9
    sizes = [s for s in (192, 128, 64) if s < side]
    return _first_fitting(plan, available, "vae_tiling",
                          [dataclasses.replace(tiling or VAETiling(), height=s, width=s) for s in sizes],
                          lambda t: f"VAE tiles {t.height}x{t.width}")


def _fewer_frames(plan, available):
    r = plan.request
    step = TEMPORAL_DOWNSAMPLE * r.chunk_width  # one chunk of new latent frames
    counts = [n * step for n in range((r.frames - 1) // step, 0, -1)]
    return _first_fitting(plan, available, "frames", counts, lambda n: f"fewer frames ({n})")
