"""Train the benchmark model: the tiny model's architecture on 128x128 scenes shaped like the videos
people make (``train/bench_scenes.py``), where token-level reuse has room to work (64 tokens a frame).

    python -m train.benchmark_model                      # from the repository root; writes magi1/builtin/benchmark_model

It shares the tiny model's loops (``train/tiny.py``) through its own ``Recipe`` and reuses the tiny
model's VAE (``magi1/builtin/weights/vae.safetensors``, 21 dB on these scenes at 128x128; a VAE of its own
would not fit the repository's size budget). The DiT stage writes a resume checkpoint every 15 minutes
to ``train/checkpoints/bench`` (git-ignored): the same command continues from it. The held-out prompts
(``train/bench_heldout.json``) are never drawn for training.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch

from magi1.builtin import BENCHMARK_MODEL as BENCH_MODEL
from magi1.builtin import VAE_FILE
from magi1.builtin.text_encoder import SPECIALS
from magi1.video.vae import load_vae

from . import bench_scenes
from . import tiny as shared

SIZE = 128
HELDOUT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_heldout.json")
RESUME_FOLDER = os.path.join("train", "checkpoints", "bench")  # git-ignored


def heldout_prompts():
    with open(HELDOUT_FILE) as f:
        return tuple(json.load(f)["prompts"])


def vocabulary():
    return list(SPECIALS) + bench_scenes.caption_vocabulary()


BENCHMARK_MODEL = shared.Recipe(SIZE, shared.DIT_CONFIG, shared.VAE_CONFIG,
                      functools.partial(bench_scenes.scene_batch, avoid=frozenset(heldout_prompts())), vocabulary,
                      text_tokens=40)  # the longest caption has 36 words


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.benchmark_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=BENCH_MODEL.folder,
                        help="folder for dit.safetensors, text_encoder.safetensors and special_tokens.npz "
                             "(default: magi1/builtin/benchmark_model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dit-steps", type=int, default=6000)
    parser.add_argument("--scenes", type=int, default=3000, help="training scenes, encoded once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--resume", default=RESUME_FOLDER, help="folder of the resume checkpoint (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.time()
    vae = load_vae(VAE_FILE, dtype=torch.float32)
    model, captions = shared.train_dit(vae, args.seed, args.dit_steps, scenes=args.scenes, resume=args.resume,
                                       recipe=BENCHMARK_MODEL, checkpoint=lambda m, c: shared.save_dit(args.out, m, c))
    shared.save_dit(args.out, model, captions)
    print(f"trained in {(time.time() - began) / 60:.1f} min; weights in {args.out}")


if __name__ == "__main__":
    main()
