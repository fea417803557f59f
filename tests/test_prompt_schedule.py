"""Per-chunk prompts: the schedule's grammar, and each chunk's caption rows being those of its own prompt."""

import re

import pytest
import torch

from magi1 import chunk_captions, parse_prompt_schedule, scheduled_captions

from magi1 import builtin


def test_a_plain_prompt_is_one_prompt_for_every_chunk():
    assert parse_prompt_schedule("a red ball: moving right") == [(0, "a red ball: moving right")]
    assert parse_prompt_schedule("a red ball\nover a wall") == [(0, "a red ball\nover a wall")]


@pytest.mark.parametrize("text", ["0:00, a countdown clock", "12:30 pm, a clock tower", "a cat\nwalks: slowly",
                                  "a cat at 12:30\nunder a clock"])
def test_text_that_is_not_a_schedule_stays_one_prompt(text):
    assert parse_prompt_schedule(text) == [(0, text)]


@pytest.mark.parametrize("text, message", [
    # a schedule line after a first line that is none: not silently one prompt
    ("Scene:\n1: a cat walks", "the line '1: a cat walks' starts a scheduled prompt, but the first line 'Scene:'"),
    ("a cat\n0: walks", "begin with '0: <prompt>'"),
    # a schedule line without its space, inside a schedule: not silently merged into the prompt above
    ("0: a red ball\n1:a blue square", "has no space after the colon: write '1: a blue square'"),
    ("0: a red ball\n1-2:a blue square", "write '1-2: a blue square'"),
    # a chunk number Python would refuse to read (over 4300 digits), and any beyond a video
    ("0: a\n" + "9" * 5000 + ": b", "names a chunk beyond any video"),
    ("0: a\n1-" + "9" * 7 + ": b", "names a chunk beyond any video"),
    ("0: a\n171: b", "names a chunk beyond any video"),  # 171 chunks (4096 frames) are 0..170
    ("0: a\n5-171: b", "names a chunk beyond any video"),
])
def test_lines_that_look_like_schedule_lines_are_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_prompt_schedule(text)


def test_schedule_lines():
    text = "0: a red ball\n2-3: a blue square\n   over a wall\n4: the camera pans left"
    assert parse_prompt_schedule(text) == [(0, "a red ball"), (2, "a blue square over a wall"),
                                           (4, "the camera pans left")]
    assert parse_prompt_schedule("0-1: a\n2: b") == [(0, "a"), (2, "b")]


@pytest.mark.parametrize("text, message", [
    ("1: a", "chunk 0 needs the first prompt"),
    ("0: a\n0: b", "must come after chunk 0"),
    ("0-1: a\n3: b", r"must follow on \(expected 2\)"),
    ("0-1: a\n2-1: b", "ends before it starts"),
])
def test_schedule_mistakes_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt_schedule(text)


def random_prompt(seed, width=64, length=20):
    g = torch.Generator().manual_seed(seed)
    valid = int(torch.randint(3, length, (1,), generator=g))
    return torch.randn(length, width, generator=g), torch.arange(length) < valid


def test_one_prompt_schedule_is_chunk_captions_bit_for_bit():
    tokens = builtin.TINY.special_tokens()
    states, mask = random_prompt(0)
    one = scheduled_captions([(0, states, mask)], 5, tokens, length=64)
    expected = chunk_captions(states, mask, 5, tokens, length=64)
    assert torch.equal(one[0], expected[0]) and torch.equal(one[1], expected[1])


@pytest.mark.parametrize("starts", [(0, 2), (0, 1, 3), (0, 4)])
def test_each_chunk_reads_its_own_prompt(starts):
    tokens, chunks = builtin.TINY.special_tokens(), 5
    prompts = [(first, *random_prompt(seed)) for seed, first in enumerate(starts)]
    caption, mask = scheduled_captions(prompts, chunks, tokens, length=64)
    for k in range(chunks):
        own = max(i for i, first in enumerate(starts) if first <= k)
        expected = chunk_captions(prompts[own][1], prompts[own][2], chunks, tokens, length=64)
        assert torch.equal(caption[k], expected[0][k]) and torch.equal(mask[k], expected[1][k])
        # row 0 is this chunk's DURATION token (chunks after it), row 1 HQ: MAGI-1's per-chunk tokens
        assert torch.equal(caption[k, 0], tokens.duration(chunks - k - 1))
    assert not torch.equal(caption[0], caption[starts[1]])


def test_a_schedule_needs_chunk_zero():
    with pytest.raises(ValueError, match="chunk 0"):
        scheduled_captions([(1, *random_prompt(0))], 3, builtin.TINY.special_tokens(), length=64)


@pytest.mark.parametrize("starts, chunks", [([0, 2, 5], 9), ([0, 1], 1), ([0, 3, 40, 90], 12), ([0], 4)])
def test_scheduled_captions_build_only_what_the_chunks_read(starts, chunks):
    """Against the slow reference: every prompt's captions for every chunk, then each chunk's pick."""
    from magi1.prompts.text import SpecialTokens
    g = torch.Generator().manual_seed(len(starts) * 100 + chunks)
    width = 8
    special = SpecialTokens(hq=torch.randn(width, generator=g), durations=torch.randn(8, width, generator=g))
    prompts = []
    for i, first in enumerate(starts):
        length = 3 + 2 * i
        mask = torch.arange(10) < (0 if i == 1 else length)  # the second prompt is empty: its masks are all false
        prompts.append((first, torch.randn(10, width, generator=g), mask))
    for tokens in (special, None):
        built = [chunk_captions(s, m, chunks, tokens, length=12) for _, s, m in prompts]
        pick = [max(i for i, (first, _, _) in enumerate(prompts) if first <= k) for k in range(chunks)]
        expected = (torch.stack([built[i][0][k] for k, i in enumerate(pick)]),
                    torch.stack([built[i][1][k] for k, i in enumerate(pick)]))
        got = scheduled_captions(prompts, chunks, tokens, length=12)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
