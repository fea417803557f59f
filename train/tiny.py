"""Train the tiny MAGI-1 demo model from scratch on procedural videos (``train/scenes.py``).

    python -m train.tiny --out <folder>      # from the repository root; --out defaults to magi1/builtin/weights
    python -m train.tiny --vae magi1/builtin/weights/vae.safetensors --out <folder>   # only the DiT stage

Reproducible from ``--seed`` (scenes, noise and initial weights all come from it; CPU, float32). Three
stages: the VAE as an autoencoder of 12-frame clips (the release's temporal tile), its latents rescaled
so that ``LATENT_SCALE`` makes them unit-variance; then ``--scenes`` 3-chunk scenes encoded once; then
the DiT, the text encoder and the special tokens together, with flow matching on clips of 1-3 chunks
(prefixes of those scenes) laid out as the sampler calls the model: clean chunks at ``CLEAN_T`` with the
null caption seeing only themselves, then noisy chunks whose times are staggered by a quarter of the
schedule, with the key ranges of their stage (the time warp and the key ranges come from ``magi1.sampling.schedule``).
Weights are written in float16 with their configs in the safetensors metadata, so the ordinary loaders read
them. About 53 minutes on 2 CPU cores; with ``--vae`` (a trained VAE, re-saved unchanged to ``--out``) only the
encoding and the DiT run, about 40 minutes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from magi1.network.config import ModelConfig
from magi1.weights.loader import CONFIG_METADATA_KEY, DISTILL_METADATA_KEY, random_dit
from magi1.sampling.schedule import CLEAN_T, NOISE2CLEAN_KVRANGE, chunk_kv_range, shifted_time, unshifted_position
from magi1.prompts.text import DURATION_TOKENS, HQ_TOKEN, NULL_CAPTION_TOKENS, SpecialTokens, chunk_captions
from magi1.builtin import SIZE, WEIGHTS
from magi1.builtin.text_encoder import CONFIG_METADATA_KEY as TEXT_CONFIG_METADATA_KEY
from magi1.builtin.text_encoder import TextEncoderConfig, TinyTextEncoder
from magi1.video.vae import CONFIG_METADATA_KEY as VAE_CONFIG_METADATA_KEY
from magi1.video.vae import LATENT_SCALE, VAEConfig, load_vae, random_vae

from . import checkpoint as train_checkpoint
from .scenes import grammar_vocabulary, scene_batch

CHUNK_FRAMES = 24  # video frames per chunk (6 latent frames)
DIT_CONFIG = ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4,
                         num_query_groups=2, kv_channels=64, apply_layernorm_1p=True, params_dtype=torch.float16,
                         in_channels=16, out_channels=16, caption_channels=64)
# The decoder unfolds each token into embed_dim / (8 * 8 * 4) pixel channels before its last 3x3x3 convolution:
# 768 gives 3 (the release's 1024 gives 4); fewer cannot carry colour. One block a side keeps it small.
VAE_CONFIG = VAEConfig(embed_dim=768, depth=1, num_heads=12, mlp_ratio=1.0, video_size=SIZE, video_length=12)
RESUME_FOLDER = os.path.join("train", "checkpoints", "tiny")  # git-ignored
SPRITE_WEIGHT = 3.0  # loss weight of latent patches a sprite covers
DISTILL_DTS = (4.0, 8.0)  # distill_dt of 8 and 16 steps (and of the 12-step shortcut's sub-steps)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one model's training is made of; the loops below are shared (``train/benchmark_model.py`` has another)."""

    size: int  # frame height and width in pixels
    dit_config: ModelConfig
    vae_config: VAEConfig
    scene_batch: Callable  # (seed, count, frames, size, with_coverage=False) -> videos, captions[, coverage]
    vocabulary: Callable  # () -> the text encoder's vocabulary
    text_tokens: int = 32  # longest caption, in words, plus the end token
    sprite_weight: float = SPRITE_WEIGHT


TINY = Recipe(SIZE, DIT_CONFIG, VAE_CONFIG, scene_batch, grammar_vocabulary)


def _lr(step, total, peak, warmup=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------ VAE
def train_vae(seed, steps, batch=8, log=functools.partial(print, flush=True), recipe=TINY):
    vae = random_vae(recipe.vae_config, seed=seed).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    began = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, 1e-3)
        videos, _ = recipe.scene_batch(seed * 1_000_003 + step, batch, 48, recipe.size)
        start = int(torch.randint(0, 48 - 12 + 1, (), generator=generator))
        video = videos[:, :, start:start + 12]
        mean = vae.encoder(video)[:, : vae.config.z_chans]
        # a little latent noise so that the decoder tolerates the DiT's imperfect latents
        z = mean + 0.05 * mean.detach().std() * torch.randn(mean.shape, generator=generator)
        recon = vae.decoder(z)
        loss = F.mse_loss(recon, video) + 0.2 * F.l1_loss(recon, video) + 1e-4 * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4 / F.mse_loss(recon.detach().clamp(-1, 1), video).item())
            log(f"vae {step:5d}/{steps} loss {loss.item():.4f} psnr {psnr:.1f} dB ({time.time() - began:.0f} s)")
    vae.eval().requires_grad_(False)
    _unit_latents(vae, seed, recipe)
    return vae


@torch.no_grad()
def _unit_latents(vae, seed, recipe):
    """Rescale the latent space so that ``mean * LATENT_SCALE`` has unit variance (the DiT's scale): the
    encoder's mean rows by ``k``, the decoder's input by ``1 / k``; reconstructions are unchanged."""
    videos, _ = recipe.scene_batch(seed + 7, 32, 12, recipe.size)
    std = vae.encoder(videos)[:, : vae.config.z_chans].std().item()
    k = 1.0 / (LATENT_SCALE * std)
    z = vae.config.z_chans
    vae.encoder.last_layer.weight[:z] *= k
    vae.encoder.last_layer.bias[:z] *= k
    vae.decoder.proj_in.weight /= k


# ------------------------------------------------------------------------------------------------ DiT
class Captions(torch.nn.Module):
    """The text side trained with the DiT: the text encoder and the special-token table (HQ, durations)."""

    def __init__(self, seed, recipe=TINY):
        super().__init__()
        torch.manual_seed(seed + 2)
        width = recipe.dit_config.caption_channels
        self.encoder = TinyTextEncoder(TextEncoderConfig(tuple(recipe.vocabulary()), width=width,
                                                         max_tokens=recipe.text_tokens))
        torch.nn.init.normal_(self.encoder.position_embedding, std=0.02)
        self.other_tokens = torch.nn.Parameter(torch.randn(DURATION_TOKENS.stop, width))


def _batch_captions(captions, model, prompts, chunks, clean):
    """Caption tokens ``(B, chunks, 50, D)`` and masks as the sampler reads them: a noisy chunk gets its
    ``chunk_captions`` row (``[DURATION, HQ, text...]``), a clean one the null caption (50 rows)."""
    tokens = [captions.encoder.tokenize(p) for p in prompts]
    ids, masks = torch.stack([t[0] for t in tokens]), torch.stack([t[1] for t in tokens])
    states = captions.encoder(ids, masks)  # (B, 32, D)
    special = SpecialTokens(hq=captions.other_tokens[HQ_TOKEN],
                            durations=captions.other_tokens[DURATION_TOKENS.start:DURATION_TOKENS.stop])
    null = model.y_embedder.null_caption_embedding[:NULL_CAPTION_TOKENS]
    rows, row_masks = [], []
    for sample_states, sample_mask in zip(states, masks):
        caption, mask = chunk_captions(sample_states, sample_mask, chunks, special, length=NULL_CAPTION_TOKENS)
        rows.append(torch.cat([null.expand(clean, -1, -1), caption[clean:]]))
        row_masks.append(torch.cat([torch.ones(clean, NULL_CAPTION_TOKENS, dtype=torch.bool), mask[clean:]]))
    return torch.stack(rows), torch.stack(row_masks)


@torch.no_grad()
def _encode(vae, videos):
    """DiT latents of videos ``(B, 3, F, H, W)``, encoded in the release's 12-frame temporal tiles."""
    b, c, f, h, w = videos.shape
    tiles = videos.view(b, c, f // 12, 12, h, w).transpose(1, 2).reshape(-1, c, 12, h, w)
    mean = vae.encoder(tiles)[:, : vae.config.z_chans] * LATENT_SCALE
    return mean.view(b, f // 12, *mean.shape[1:]).transpose(1, 2).flatten(2, 3)


@torch.no_grad()
def latent_dataset(vae, seed, count, chunks=3, batch=8, log=functools.partial(print, flush=True), recipe=TINY):
    """``count`` scenes of ``chunks`` chunks, encoded once: DiT latents ``(count, 16, 6 * chunks, 8, 8)``, the
    loss weight of each latent patch ``(count, 6 * chunks, 8, 8)`` and the captions. Encoding is half the
    cost of a training step, and a shorter clip is a prefix of these (the VAE encodes 12-frame tiles alone)."""
    latents, weights, captions = [], [], []
    began = time.time()
    for first in range(0, count, batch):
        videos, prompts, coverage = recipe.scene_batch(seed * 1_000_003 + 500_000 + first, min(batch, count - first),
                                                       chunks * CHUNK_FRAMES, recipe.size, with_coverage=True)
        latents.append(_encode(vae, videos))
        # sprites cover a few patches: those weigh sprite_weight times more, so they are learnt with the backgrounds
        weights.append(1 + (recipe.sprite_weight - 1) * F.max_pool3d(coverage[:, None], (4, 8, 8))[:, 0])
        captions += prompts
    log(f"encoded {count} scenes ({time.time() - began:.0f} s)")
    return torch.cat(latents), torch.cat(weights), captions


def _stored_dataset(folder, vae, seed, count, log, recipe):
    """``latent_dataset``, read from ``folder/dataset.safetensors`` when an earlier start of the same run
    wrote it (the same values: it is deterministic), else made and written there."""
    path = os.path.join(folder, "dataset.safetensors")
    key = json.dumps(dict(seed=seed, count=count, size=recipe.size))
    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        if metadata.get("dataset") == key:
            stored = load_file(path)
            log(f"dataset: {count} encoded scenes read from {path}")
            return stored["latents"], stored["weights"], json.loads(metadata["prompts"])
    latents, weights, prompts = latent_dataset(vae, seed, count, log=log, recipe=recipe)
    os.makedirs(folder, exist_ok=True)
    save_file({"latents": latents.contiguous(), "weights": weights.contiguous()}, path + ".partial",
              metadata={"dataset": key, "prompts": json.dumps(prompts)})
    os.replace(path + ".partial", path)
    return latents, weights, prompts


def train_dit(vae, seed, steps, batch=8, scenes=3000, log=functools.partial(print, flush=True), checkpoint=None,
              resume=None, resume_every=900.0, until=None, recipe=TINY):
    """The DiT and caption side, trained for ``steps`` steps; returns their EMA copies.

    ``resume``: a folder for resume checkpoints, written every ``resume_every`` seconds and at the end;
    a run started with a checkpoint there continues from it, to the same weights as an uninterrupted
    run. ``until``: stop after that step (as a session that ends mid-run), returning None.
    """
    model = random_dit(recipe.dit_config, seed=seed, dtype=torch.float32).train().requires_grad_(True)
    with torch.no_grad():
        model.final_linear.linear.weight.mul_(0.1)
    captions = Captions(seed, recipe)
    params = list(model.parameters()) + list(captions.parameters())
    optimizer = torch.optim.AdamW(params, lr=4e-4, betas=(0.9, 0.99), weight_decay=0.01)
    ema_model, ema_captions = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(captions).requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 3)
    if resume is None:
        all_latents, all_weights, all_prompts = latent_dataset(vae, seed, scenes, log=log, recipe=recipe)
    else:  # encoded once per run, kept beside the resume checkpoint (encoding 128x128 scenes takes half an hour)
        all_latents, all_weights, all_prompts = _stored_dataset(resume, vae, seed, scenes, log, recipe)
    cw = CHUNK_FRAMES // 4
    ct = cw * (recipe.size // 8 // recipe.dit_config.patch_size) ** 2
    # A clip is a window of a schedule of one step per key-range stage: u in [0, 1) is the oldest noisy
    # chunk's position, its stage is its step, and a chunk `lag` places newer is `lag` stages behind.
    stages = len(NOISE2CLEAN_KVRANGE)
    stage_bounds = shifted_time(torch.arange(stages + 1) / stages)  # each stage's range of t
    modules = dict(model=model, captions=captions, ema_model=ema_model, ema_captions=ema_captions)
    first, running = 0, 0.0
    restored = None if resume is None else train_checkpoint.load(resume, modules=modules, optimizer=optimizer,
                                                                  generator=generator)
    run = dict(seed=seed, steps=steps, batch=batch, scenes=scenes)
    if restored is not None:
        if restored[1]["run"] != run:
            raise ValueError(f"the checkpoint in {resume} belongs to another run ({restored[1]['run']}, not {run}): "
                             "remove it, or pass another --resume folder")
        first, running = restored[0], restored[1]["running"]
        log(f"dit: resumed at step {first} from {resume}")
    began = last_save = time.time()
    for step in range(first, steps if until is None else min(steps, until)):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, 4e-4)
        chunks = 1 + int(torch.multinomial(torch.tensor([0.25, 0.5, 0.25]), 1, generator=generator))
        clean = int(torch.randint(0, chunks, (), generator=generator))
        pick = torch.randint(0, scenes, (batch,), generator=generator)
        z, weight = all_latents[pick, :, :chunks * cw], all_weights[pick, None, :chunks * cw]
        prompts = [all_prompts[i] for i in pick.tolist()]
        noise = torch.randn(z.shape, generator=generator)
        # Staggered times: the oldest noisy chunk at u, each newer one a quarter of the schedule behind. The
        # sampler's grid puts half its steps at t < 0.1; half the batches draw t uniformly instead, so that
        # the middle times, where a sprite takes shape, are learnt as well.
        if float(torch.rand((), generator=generator)) < 0.5:
            stage = int(torch.randint(0, stages, (), generator=generator))
            u = (stage + torch.rand(batch, generator=generator)) / stages
        else:
            oldest = torch.rand((), generator=generator)
            stage = min(stages - 1, int(torch.searchsorted(stage_bounds, oldest, right=True)) - 1)
            low, high = stage_bounds[stage], stage_bounds[stage + 1]
            u = unshifted_position(low + (high - low) * torch.rand(batch, generator=generator))
        t = torch.full((batch, chunks), CLEAN_T)
        ranges = []
        for j in range(chunks):
            if j < clean:
                own_step = stages  # clean
            else:
                lag = j - clean
                t[:, j] = shifted_time((u - lag / stages).clamp(min=0))
                own_step = max(0, stage - lag)
            first, end = chunk_kv_range(j, own_step, stages)
            ranges.append((first * ct, end * ct))
        if clean < chunks and float(torch.rand((), generator=generator)) < 0.25:
            ranges[clean] = (clean * ct, (clean + 1) * ct)  # the distilled sampler's nearly-clean copy sees itself
        tt = t.repeat_interleave(cw, dim=1)[:, None, :, None, None]
        x = torch.where(tt >= CLEAN_T, z, tt * z + (1 - tt) * noise)
        caption, caption_mask = _batch_captions(captions, model, prompts, chunks, clean)
        dt = DISTILL_DTS[int(torch.randint(0, len(DISTILL_DTS), (), generator=generator))]
        v = model(x, t, caption, caption_mask, ranges, distill_dt=dt)
        noisy = slice(clean * cw, chunks * cw)
        error = (v[:, :, noisy] - (z - noise)[:, :, noisy]).pow(2)
        loss = (error * weight[:, :, noisy]).mean() / weight[:, :, noisy].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_model, model), (ema_captions, captions)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"dit {step:5d}/{steps} loss {running:.4f} ({time.time() - began:.0f} s)")
        if checkpoint is not None and step and step % 500 == 0:
            checkpoint(ema_model, ema_captions)
        if resume is not None and (time.time() - last_save >= resume_every or step + 1 in (steps, until)):
            train_checkpoint.save(resume, step=step + 1, modules=modules, optimizer=optimizer, generator=generator,
                                  extra={"running": running, "run": run})
            last_save = time.time()
    if until is not None and until < steps:
        return None
    return ema_model.eval(), ema_captions.eval()


# ------------------------------------------------------------------------------------------------ files
def _half(module):
    return {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}


def _write_safetensors(tensors, path, metadata):
    """``safetensors.torch.save_file``, reproducibly: safetensors writes the metadata entries in a random order
    (a hash map), so the header's ``__metadata__`` is rewritten with its keys sorted (same length, same JSON
    otherwise): the same weights always give the same bytes."""
    data = bytearray(save(tensors, metadata=metadata))
    length = int.from_bytes(data[:8], "little")
    header = bytes(data[8:8 + length]).rstrip(b" ")  # safetensors pads the header with spaces

    def dump(value):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    parsed = json.loads(header)
    if dump(parsed) != header or next(iter(parsed)) != "__metadata__":
        raise RuntimeError("unexpected safetensors header layout; cannot sort its metadata")
    parsed["__metadata__"] = dict(sorted(parsed["__metadata__"].items()))
    data[8:8 + len(header)] = dump(parsed)
    with open(path, "wb") as f:
        f.write(data)


def save_vae(out, vae):
    os.makedirs(out, exist_ok=True)
    _write_safetensors(_half(vae), os.path.join(out, "vae.safetensors"),
                       metadata={VAE_CONFIG_METADATA_KEY: json.dumps(vae.config.to_dict())})


def save_text_encoder(encoder, path):
    """The text encoder as ``magi1.builtin.text_encoder.load_text_encoder`` reads it (config and vocabulary in
    the metadata)."""
    config = dict(dataclasses.asdict(encoder.config), vocabulary=list(encoder.config.vocabulary))
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in encoder.state_dict().items()}
    _write_safetensors(tensors, str(path), metadata={TEXT_CONFIG_METADATA_KEY: json.dumps(config)})


def save_dit(out, model, captions):
    """The DiT, the text encoder and the special-token table."""
    os.makedirs(out, exist_ok=True)
    config = dataclasses.asdict(model.config)
    config["params_dtype"] = "torch.float16"
    _write_safetensors(_half(model), os.path.join(out, "dit.safetensors"),
                       metadata={CONFIG_METADATA_KEY: json.dumps(config), DISTILL_METADATA_KEY: "true"})
    save_text_encoder(captions.encoder, os.path.join(out, "text_encoder.safetensors"))
    np.savez(os.path.join(out, "special_tokens.npz"),
             other_tokens=captions.other_tokens.detach().numpy().astype(np.float16))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=WEIGHTS, help="folder of the four weight files (default: magi1/builtin/weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--dit-steps", type=int, default=6000)
    parser.add_argument("--scenes", type=int, default=3000, help="training scenes, encoded once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--vae", help="reuse a trained vae.safetensors (e.g. magi1/builtin/weights/vae.safetensors) "
                                      "instead of training one: only the DiT stage runs")
    parser.add_argument("--resume", default=RESUME_FOLDER, help="folder of the DiT stage's resume checkpoint "
                        "(written every 15 minutes; the same command continues from it). Default: %(default)s")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.time()
    resuming = os.path.isfile(os.path.join(args.resume, train_checkpoint.FILENAME))
    if resuming and not args.vae:  # the interrupted run finished its VAE stage and saved the VAE in --out
        args.vae = os.path.join(args.out, "vae.safetensors")
    vae = load_vae(args.vae, dtype=torch.float32) if args.vae else train_vae(args.seed, args.vae_steps)
    save_vae(args.out, vae)
    # the DiT learns the latents of the VAE as shipped (float16), whether it was just trained or reused
    vae = load_vae(os.path.join(args.out, "vae.safetensors"), dtype=torch.float32)
    model, captions = train_dit(vae, args.seed, args.dit_steps, scenes=args.scenes, resume=args.resume,
                                checkpoint=lambda m, c: save_dit(args.out, m, c))
    save_dit(args.out, model, captions)
    print(f"trained in {(time.time() - began) / 60:.1f} min; weights in {args.out}")


if __name__ == "__main__":
    main()
