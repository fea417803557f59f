"""Whole official generations recorded on tiny random weights (tests/fixtures/pipeline, made by
tests/fixtures/make_fixtures.py): the model, and our request's fields for the same run (``run_request``)."""

import json
import os

import torch
from safetensors.torch import load_file

from magi1 import build_dit
from magi1 import VideoLayout
from magi1.sampling.layout import TEMPORAL_DOWNSAMPLE

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CONFIGS = ["base", "base_i2v", "distill24", "distill45"]
def load(config):
    with open(os.path.join(FIXTURES, "pipeline", f"{config}.json")) as f:
        description = json.load(f)
    tensors = load_file(os.path.join(FIXTURES, "pipeline", f"{config}.safetensors"))
    model = build_dit(description["model_config"], dtype=torch.float32)
    model.load_state_dict({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}, strict=True)
    model.distill = description["engine_config"]["distill"]
    return description, tensors, model.eval()


def request(description, tensors):
    """Our request's fields (and the noise) for the recorded run: its per-chunk captions, noise and prefix, for
    ``run_request.generate``."""
    rc = description["runtime_config"]
    prefix = tensors.get("in.prefix")
    layout = VideoLayout.plan(rc["num_frames"], rc["video_size_h"], rc["video_size_w"],
                              prefix_frames=0 if prefix is None else prefix.shape[1], chunk_width=rc["chunk_width"])
    y, masks = tensors["in.y"], tensors["in.emb_masks"]
    # The official num_frames counts the frames after a start image; a request's frames count the image among
    # them (FRAMES_RULE): one latent frame (4 video frames) more.
    image = TEMPORAL_DOWNSAMPLE if prefix is not None and prefix.shape[1] == 1 else 0
    return dict(caption=y[0, layout.chunk_offset:], caption_mask=masks[0, layout.chunk_offset:],
                frames=rc["num_frames"] + image, height=rc["video_size_h"], width=rc["video_size_w"], steps=rc["num_steps"],
                window_size=rc["window_size"], chunk_width=rc["chunk_width"], noise=tensors["in.noise"], prefix=prefix)


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())
