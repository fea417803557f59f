"""One rule for frames everywhere (magi1.sampling.layout.FRAMES_RULE): whole chunks of 24 frames, a start image counted
among the frames asked, a prefix video's frames not. The front ends (demo.py, python -m magi1, MAGI-1 Sampler)
all call frames_to_generate; here it is checked against the rule written out, and through a real run."""

import math

import pytest

import demo
from magi1 import VideoLayout
from magi1.sampling.layout import FRAMES_RULE, frames_made, frames_to_generate


def made_by_the_rule(asked, prefix):
    """The frames a request makes, from the rule's words (not from the code under test)."""
    if prefix == 0:
        return math.ceil(asked / 24) * 24
    if prefix == 1:  # the start image is the first frame of whole chunks
        return max(24, math.ceil(asked / 24) * 24)
    latent_new = math.ceil(asked / 4)
    return (math.ceil((latent_new + prefix) / 6) * 6 - prefix) * 4  # the prefix and the new frames: whole chunks


@pytest.mark.parametrize("prefix", [0, 1, 2, 3, 7])
def test_frames_made_follow_the_rule(prefix):
    for asked in list(range(1, 100)) + [4095, 4096]:
        layout = VideoLayout.plan(frames_to_generate(asked, prefix), 64, 64, prefix_frames=prefix)
        returned = layout.latent_frames - layout.output_start
        assert frames_made(returned) == made_by_the_rule(asked, prefix), (asked, prefix)
        assert frames_made(returned) >= asked  # never fewer than asked


def test_the_rule_is_stated_and_the_demo_follows_it():
    assert "25 gives 48" in FRAMES_RULE and "start image" in FRAMES_RULE
    result, _ = demo.sample(frames=25, steps=4)  # the release floors 25 to 24 frames; the rule makes 48
    assert frames_made(result.latent.shape[1]) == 48
