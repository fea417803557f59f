"""Multi-process generations on CPU (gloo) for tests/test_parallel.py and bench/scaling/parallel_scaling.py.

``run_world(world, cases, cfg)`` starts ``world`` processes; each runs every case with its model shared
through ``magi1.weights.layer_sharding.distribute`` and rank 0 saves the latents. ``single(case)`` is the same
generation in this process. With a cache policy, ``Recording`` keeps what a single-process run's policy
state was given (change features before each step, latents after it), and ``Replayed`` feeds exactly
those to a fresh state in the parallel run: its decisions are then the single-process run's by
construction, while every velocity, computed or reused, comes from the parallel run.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cache_core import CachePolicy
from run_request import generate
from magi1.weights.layer_sharding import distribute
from magi1.distributed.parallel import Parallel
from magi1.distributed.workers import free_port
from pipeline_fixtures import load, request


def policy(mode="motion_detail", tau=0.05):
    return CachePolicy(mode=mode, tau=tau, warmup_steps=1, chunk_wise_steps=2, final_full_steps=1)


def _continuation(args):
    prefix = torch.randn(16, 8, *args["noise"].shape[2:], generator=torch.Generator().manual_seed(3))
    args = {k: v for k, v in args.items() if k != "noise"}
    return {**args, "prefix": prefix, "seed": 5}


def _negative(args):
    return {**args, "negative_caption": args["caption"].flip(-1), "negative_mask": args["caption_mask"]}


def _long_negative(args):
    """10 chunks instead of 5: the KV caches (5 chunks wide) slide over the video several times."""
    args = {k: v for k, v in _negative(args).items() if k != "noise"}
    return {**args, "frames": 2 * args["frames"], "seed": 11, "caption": args["caption"][:1],
            "caption_mask": args["caption_mask"][:1], "negative_caption": args["negative_caption"][:1],
            "negative_mask": args["negative_mask"][:1]}


# name -> (fixture config, change to the recorded request, cache policy or None)
CASES = {
    "distill24": ("distill24", None, None),
    "distill45_continuation": ("distill45", _continuation, None),
    "base": ("base", None, None),
    "base_i2v": ("base_i2v", None, None),
    "distill45_cache": ("distill45", None, policy("motion_detail", 0.05)),
    "base_cache": ("base", _negative, policy("motion_detail", 0.3)),
    "base_i2v_chunk_cache": ("base_i2v", None, policy("flowcache", 0.05)),
    "base_long_cache": ("base", _long_negative, policy("motion_detail", 0.3)),
}


def case_request(name):
    config, change, cache = CASES[name]
    description, tensors, model = load(config)
    args = request(description, tensors)
    return model, (change(args) if change else args), cache


def single(name, record=False):
    """``(latent, stats, Recording or None)`` of the case in this process."""
    model, args, cache = case_request(name)
    recording = Recording(cache) if (record and cache is not None) else None
    with torch.no_grad():
        result = generate(model, **args, policy=recording or cache, record_masks=cache is not None)
    return result.latent, result.stats, recording


# --- replayed decisions ------------------------------------------------------------------------------

@dataclass
class Recording:
    """A policy whose states record what they are given (in call order)."""

    inner: CachePolicy
    decides: list = field(default_factory=list)
    observes: list = field(default_factory=list)

    @property
    def mode(self):
        return self.inner.mode

    @property
    def enabled(self):
        return self.inner.enabled

    @property
    def uses_token_weights(self):
        return self.inner.uses_token_weights

    def new_state(self, **kw):
        return _RecordingState(self, self.inner.new_state(**kw))


class _RecordingState:
    def __init__(self, recording, inner):
        self.recording, self.inner = recording, inner

    def decide(self, chunk_steps):
        self.recording.decides.append([tuple(_clone(x) for x in cs) for cs in chunk_steps])
        return self.inner.decide(chunk_steps)

    def velocity(self, decision, velocity, dt):
        return self.inner.velocity(decision, velocity, dt)

    def observe(self, chunks, frame_before=None):
        self.recording.observes.append(([tuple(_clone(x) for x in c) for c in chunks], _clone(frame_before)))
        return self.inner.observe(chunks, frame_before)


@dataclass
class Replayed(Recording):
    """A policy whose states are given the recorded inputs instead of this run's."""

    def new_state(self, **kw):
        return _ReplayedState(self, self.inner.new_state(**kw))


class _ReplayedState(_RecordingState):
    def __init__(self, recording, inner):
        super().__init__(recording, inner)
        self.decided = self.observed = 0

    def decide(self, chunk_steps):
        recorded = self.recording.decides[self.decided]
        self.decided += 1
        assert [cs[:2] for cs in chunk_steps] == [cs[:2] for cs in recorded], "the replay lost its place"
        return self.inner.decide(recorded)

    def observe(self, chunks, frame_before=None):
        recorded, before = self.recording.observes[self.observed]
        self.observed += 1
        return self.inner.observe(recorded, before)


def _clone(x):
    return x.clone() if torch.is_tensor(x) else x


# --- processes ---------------------------------------------------------------------------------------

def tiny_request():
    """The built-in tiny model's demo generation (24 frames, no cache): ``generate`` arguments."""
    from magi1 import chunk_captions
    from magi1.builtin import TINY
    states, mask = TINY.load_text_encoder().encode(TINY.example_prompt)
    caption, caption_mask = chunk_captions(states, mask, 1, TINY.special_tokens(), length=800)
    return dict(caption=caption, caption_mask=caption_mask, frames=24, height=TINY.size, width=TINY.size, steps=8,
                seed=1)


def parameter_bytes(model):
    """Bytes of the model's parameters held in memory (meta placeholders hold none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def _tiny_job(par):
    """The built-in tiny model loaded with ``parallel=``: its latent, and each rank's weight bytes."""
    from magi1.builtin import TINY
    model = TINY.load_dit(parallel=par)
    held = torch.tensor([float(parameter_bytes(model))])
    every = [torch.zeros(1) for _ in range(par.world)]
    torch.distributed.all_gather(every, held)
    with torch.inference_mode():  # as ComfyUI runs nodes
        latent = generate(model, **tiny_request(), parallel=par).latent
    return {"tiny": latent, "tiny.bytes": torch.cat(every)}


def uneven_request(generator_seed=0):
    """A sparse DiT call whose computed token count (per chunk: 7, all, 5) splits unevenly."""
    description, tensors, model = load("distill45")
    g = torch.Generator().manual_seed(generator_seed)
    ct = 2 * 2 * 2  # tokens per chunk of the (16, 6, 4, 4) input below: 2 latent frames of 2x2 patches
    x = torch.randn(1, 16, 6, 4, 4, generator=g)
    active = [torch.randperm(ct, generator=g)[:7].sort().values, None, torch.randperm(ct, generator=g)[:5].sort().values]
    caption = torch.randn(1, 3, 800, model.config.caption_channels, generator=g)
    mask = torch.zeros(1, 3, 800, dtype=torch.bool)
    mask[..., :9] = True
    return model, dict(x=x, t=torch.tensor([[0.2, 0.5, 0.7]]), caption=caption, caption_mask=mask,
                       kv_range=[(0, 8), (0, 16), (0, 24)], active=active, kv_write_chunks=3)


def uneven_forward(model, request):
    """The sparse call, on a fresh KV cache holding a random (seeded) earlier state, for ``model``."""
    from magi1 import KVCache
    cache = KVCache.for_model(model, 24)
    g = torch.Generator().manual_seed(9)
    full = model.config.num_query_groups
    cp = model.context_parallel
    heads = slice(*cp.kv_heads[cp.rank]) if cp is not None else slice(0, full)
    for buffers in (cache.keys, cache.values):
        for b in buffers:  # every rank draws every head, and keeps its own
            b.copy_(torch.randn(24, full, b.shape[-1], generator=g)[:, heads])
    with torch.no_grad():
        return model(**{k: v for k, v in request.items() if k != "x"}, x=request["x"], kv_cache=cache)


def _uneven_job(par):
    model, request = uneven_request()
    distribute(model, par)
    out = {"uneven": uneven_forward(model, request)}
    model, request = lonely_request()
    distribute(model, par)
    out["lonely"] = uneven_forward(model, request)
    return out


def lonely_request():
    """A sparse call of one chunk computing a single token: every rank but one holds no query."""
    model, request = uneven_request()
    one = torch.tensor([5])
    return model, dict(request, x=request["x"][:, :, :2], t=request["t"][:, :1], caption=request["caption"][:, :1],
                       caption_mask=request["caption_mask"][:, :1], kv_range=[(0, 8)], active=[one],
                       kv_write_chunks=1)


class _Failing(Recording):
    """A policy whose state raises at its third decision (on rank 0, the only one that runs it)."""

    def new_state(self, **kw):
        state = _RecordingState(self, self.inner.new_state(**kw))
        decide, calls = state.decide, []

        def failing(chunk_steps):
            calls.append(1)
            if len(calls) == 3:
                raise ValueError("the policy failed on purpose")
            return decide(chunk_steps)
        state.decide = failing
        return state


def _failing_job(par):
    """Rank 0's policy raises midway: every rank must raise (none waits for decisions that never come)."""
    model, args, cache = case_request("distill45_cache")
    distribute(model, par)
    raised = 0.0
    try:
        with torch.no_grad():
            generate(model, **args, policy=_Failing(cache), parallel=par)
    except (ValueError, RuntimeError):
        raised = 1.0
    every = [torch.zeros(1) for _ in range(par.world)]
    torch.distributed.all_gather(every, torch.tensor([raised]))
    return {"failing.raised": torch.cat(every)}


EXTRA_JOBS = {"tiny": _tiny_job, "uneven": _uneven_job, "failing": _failing_job}


def _worker(rank, world, port, cfg, jobs, out_dir, shard_weights):
    torch.set_num_threads(1)
    par = Parallel.start(rank, world, f"tcp://127.0.0.1:{port}", cfg=cfg, backend="gloo", shard_weights=shard_weights)
    try:
        latents, seconds = {}, {}
        for key, (name, replay) in jobs.items():
            if name in EXTRA_JOBS:
                latents.update(EXTRA_JOBS[name](par))
                continue
            model, args, cache = case_request(name)
            distribute(model, par)
            cache = replay if replay is not None else cache
            start = time.perf_counter()
            with torch.inference_mode():  # as ComfyUI runs nodes (gloo on torch 2.4 is particular about it)
                result = generate(model, **args, policy=cache, parallel=par, record_masks=cache is not None)
            seconds[key] = time.perf_counter() - start
            latents[key] = result.latent
            latents[key + ".counts"] = torch.tensor([result.stats.flops, float(result.stats.model_calls)],
                                                    dtype=torch.float64)
            if result.stats.masks is not None and rank == 0:
                latents[key + ".masks"] = result.stats.masks.frames().float()
        if rank == 0:
            save_file(latents, os.path.join(out_dir, "latents.safetensors"),
                      metadata={k: repr(v) for k, v in seconds.items()})
    finally:
        par.close()


def run_world(world, jobs, cfg=1, shard_weights=True):
    """``jobs``: key -> (case name, replayed policy or None). Returns key -> rank 0's latent (and
    ``key.masks``), and key -> seconds."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, free_port(), cfg, jobs, out_dir, shard_weights), nprocs=world, join=True)
        path = os.path.join(out_dir, "latents.safetensors")
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            seconds = {k: float(v) for k, v in f.metadata().items()}
        return load_file(path), seconds
