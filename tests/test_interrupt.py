"""Interrupting within a step: the DiT polls a stop check between layers and between blocks of queries,
so a long step stops promptly; a check that never fires changes nothing, and an interrupted run leaves
nothing behind (the next run is the same as an uninterrupted one)."""

import pytest
import torch

import magi1
from magi1 import chunk_captions
from run_request import generate
from magi1 import builtin
import magi1.network.dit as dit_module

MODEL = builtin.TINY


class Stop(Exception):
    pass


class Countdown:
    """A stop check that raises on its ``at``-th poll (never with ``at=None``) and counts polls."""

    def __init__(self, at=None):
        self.at, self.polls = at, 0

    def __call__(self):
        self.polls += 1
        if self.at is not None and self.polls >= self.at:
            raise Stop(f"stopped at poll {self.polls}")


@pytest.fixture(scope="module")
def setup():
    dit = MODEL.load_dit()
    states, mask = MODEL.load_text_encoder().encode(MODEL.example_prompt)
    caption, caption_mask = chunk_captions(states, mask, 1, MODEL.special_tokens(),
                                           length=dit.config.caption_max_length)
    return dit, caption, caption_mask


def run(setup, size, stop=None, steps=4):
    dit, caption, mask = setup
    return generate(dit, caption, mask, frames=24, height=size, width=size, steps=steps, seed=5, stop=stop).latent


def test_a_stop_check_that_never_fires_changes_nothing(setup):
    size = builtin.SIZE  # blocks of queries: test_dit_polls_between_query_blocks
    check = Countdown()
    assert torch.equal(run(setup, size, stop=check), run(setup, size))
    layers = setup[0].config.num_layers
    assert check.polls > 4 * layers  # polled inside every DiT call, not only between steps


def test_interrupt_inside_a_call_stops_and_leaves_nothing_behind(setup):
    size = builtin.SIZE
    reference = run(setup, size)
    layers = setup[0].config.num_layers
    check = Countdown(at=layers + 2)  # inside the first DiT call: after its first layers
    with pytest.raises(Stop):
        run(setup, size, stop=check)
    assert check.polls == layers + 2
    assert torch.equal(run(setup, size), reference)


def test_dit_polls_between_query_blocks(monkeypatch):
    """A layer whose chunk's attention is long is interrupted inside it, between blocks of queries, and the
    blocks give the values of one call."""
    config = dict(num_layers=1, hidden_size=32, ffn_hidden_size=32, num_attention_heads=2, num_query_groups=1,
                  kv_channels=16, caption_channels=8, caption_max_length=4, in_channels=4, out_channels=4)
    dit = magi1.random_dit(config, seed=0)
    side, block = 100, 1024  # one chunk of one frame: 2500 tokens, blocks of 1024 queries
    tokens = (side // 2) ** 2
    monkeypatch.setitem(dit_module.BLOCK_FLOPS, "cpu", block * 4 * tokens * 32)  # 32 = heads x head dim
    x = torch.randn(1, 4, 1, side, side)
    args = (x, torch.tensor([[0.5]]), torch.randn(1, 1, 4, 8), torch.ones(1, 1, 4, dtype=torch.bool),
            [[0, tokens]])
    check = Countdown()
    with torch.no_grad():
        assert torch.equal(dit(*args, stop=check), dit(*args))
    assert check.polls == 1 + (tokens - 1) // block  # before the layer, then between blocks
