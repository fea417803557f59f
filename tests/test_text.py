"""Text conditioning against the official pipeline (tests/fixtures/text, recorded by
tests/fixtures/make_fixtures.py text): caption cleaning, the per-chunk layout of special tokens and T5
tokens, masks, the null caption; and the special-token table's loading and lookup."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from magi1.prompts import text
from magi1.prompts.text import (SpecialTokens, chunk_captions, clean_caption, find_special_tokens,
                                null_caption, pad_caption, prepare_prompt)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "text")
SHARED_TOKENS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "magi1_special_tokens.npz")
LAYOUT = json.load(open(os.path.join(FIXTURE, "chunk_captions.json")))


def test_cleaning_matches_official():
    with open(os.path.join(FIXTURE, "clean_caption.json"), encoding="utf-8") as f:
        captions = json.load(f)["captions"]
    for raw, official in captions:
        assert prepare_prompt(raw) == official, raw


def test_cleaning_examples():
    assert clean_caption("A CAT (masterpiece:1.2) at https://x.com/a") == "a cat masterpiece:1.2 at"
    assert prepare_prompt("猫 a cat") == "a cat"
    assert prepare_prompt("this-is_my-cute_cat") == "this is my cute cat"


@pytest.fixture
def table(tmp_path):
    """A random special-token table in the release's layout (float64, 100 x 4096)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "special_tokens.npz"
    other = rng.normal(0, 0.125, (100, 4096))
    np.savez(path, caption_token=rng.normal(size=(1, 4096)), logo_token=rng.normal(size=(1, 4096)),
             other_tokens=other)
    return SpecialTokens.load(path), other


@pytest.mark.parametrize("name", sorted(LAYOUT["cases"]))
def test_chunk_layout_matches_official(table, name):
    tokens, other = table
    case = LAYOUT["cases"][name]
    recorded = load_file(os.path.join(FIXTURE, "chunk_captions.safetensors"))
    codes, official_mask = recorded[f"codes.{name}"], recorded[f"mask.{name}"].bool()
    infer, clean, valid = case["infer_chunk_num"], case["clean_chunk_num"], case["valid_t5_tokens"]
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(800, 4096, generator=generator)  # T5 output rows for our side of the comparison
    mask = torch.arange(800) < valid

    embeddings, masks = chunk_captions(states, mask, infer - clean, tokens)
    assert embeddings.shape == (infer - clean, 800, 4096) and masks.dtype == torch.bool
    # clean (prefix) chunks: the official pipeline gives them the null caption; the sampler does that
    assert bool((codes[:clean] >= 2000).all()) and not bool(official_mask[:clean].any())
    assert torch.equal(masks, official_mask[clean:])
    sources = torch.cat([states, torch.from_numpy(other.astype(np.float16)).float()])
    for chunk in range(infer - clean):
        for row in torch.nonzero(masks[chunk]).flatten().tolist():
            code = int(codes[clean + chunk, row])
            expected = sources[code] if code < 1000 else sources[800 + code - 1000]
            assert torch.equal(embeddings[chunk, row], expected), (chunk, row, code)
    # null caption masks, for the unconditional passes: the first 50 rows
    null_mask = recorded[f"null_mask.{name}"].bool()
    _, ours = null_caption(torch.zeros(800, 8))
    assert torch.equal(null_mask, ours.expand_as(null_mask))


def test_duration_counts_the_chunks_that_follow(table):
    tokens, other = table
    fp16 = torch.from_numpy(other.astype(np.float16)).float()
    embeddings, masks = chunk_captions(torch.ones(5, 4096), torch.ones(5), 10, tokens)
    for chunk in range(10):
        after = 10 - chunk - 1
        assert torch.equal(embeddings[chunk, 0], fp16[7 + min(after, 7)])  # DURATION_1 .. DURATION_8
        assert torch.equal(embeddings[chunk, 1], fp16[1])  # HQ
        assert torch.equal(embeddings[chunk, 2:7], torch.ones(5, 4096))
        assert masks[chunk].sum() == 7 and bool(masks[chunk, :7].all())


def test_without_special_tokens_and_empty_prompt(table):
    tokens, _ = table
    states = torch.randn(6, 4096)
    plain, plain_mask = chunk_captions(states, torch.tensor([1, 1, 1, 0, 0, 0]), 3)
    assert torch.equal(plain[1, :3], states[:3]) and not plain[1, 3:].any()
    assert plain_mask.sum(dim=1).tolist() == [3, 3, 3]
    _, empty_mask = chunk_captions(states, torch.zeros(6), 3, tokens)
    assert not empty_mask.any()  # the sampler then uses the null caption, as the release does


def test_pad_caption():
    states = torch.arange(12.0).view(4, 3)
    padded, mask = pad_caption(states, torch.tensor([1, 1, 0, 0]), length=6)
    assert padded.shape == (6, 3) and mask.tolist() == [True, True, False, False, False, False]
    assert torch.equal(padded[:2], states[:2]) and not padded[2:].any()
    cut, cut_mask = pad_caption(torch.randn(900, 3), torch.ones(900), length=800)
    assert cut.shape == (800, 3) and bool(cut_mask.all())
    with pytest.raises(ValueError, match="valid tokens first"):
        pad_caption(states, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="tokens, width"):
        pad_caption(states, torch.ones(3))


def test_wrong_width_and_chunks(table):
    tokens, _ = table
    with pytest.raises(ValueError, match="t5-v1_1-xxl"):
        chunk_captions(torch.randn(4, 32), torch.ones(4), 2, tokens)
    with pytest.raises(ValueError, match="at least 1"):
        chunk_captions(torch.randn(4, 4096), torch.ones(4), 0, tokens)


def test_null_caption():
    table = torch.randn(800, 16)
    embedding, mask = null_caption(table)
    assert torch.equal(embedding, table) and mask.sum() == 50 and bool(mask[:50].all())


# ------------------------------------------------------------------------------------ special tokens
@pytest.mark.skipif(not os.path.exists(SHARED_TOKENS), reason="needs ../shared/data/magi1_special_tokens.npz "
                                                               "(the official table, kept beside the checkout)")
def test_official_table_loads_rounded_to_float16():
    with open(SHARED_TOKENS, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == LAYOUT["special_tokens_sha256"]  # the fixture's table
    tokens = SpecialTokens.load(SHARED_TOKENS)
    with np.load(SHARED_TOKENS) as npz:
        other = npz["other_tokens"]
    assert other.dtype == np.float64 and other.shape == (100, 4096)
    assert torch.equal(tokens.hq, torch.tensor(other[1].astype(np.float16), dtype=torch.float32))
    assert torch.equal(tokens.durations[3], torch.tensor(other[10].astype(np.float16), dtype=torch.float32))
    assert not torch.equal(tokens.hq.double(), torch.from_numpy(other[1]))  # the rounding is real


def test_find_special_tokens(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "special_tokens.npz").write_bytes(b"")
    assert find_special_tokens([first, second]) == str(second / "special_tokens.npz")
    (first / "magi1_special_tokens.npz").write_bytes(b"")
    assert find_special_tokens([first, second]) == str(first / "magi1_special_tokens.npz")
    with pytest.raises(FileNotFoundError) as error:
        find_special_tokens([tmp_path / "nowhere"])
    assert text.SPECIAL_TOKENS_SOURCE in str(error.value) and "nowhere" in str(error.value)


def test_bad_special_token_files(tmp_path):
    np.savez(tmp_path / "wrong.npz", other_tokens=np.zeros((5, 4096)))
    with pytest.raises(ValueError, match="at least 15 rows"):
        SpecialTokens.load(tmp_path / "wrong.npz")
    np.savez(tmp_path / "pickled.npz", other_tokens=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="download"):
        SpecialTokens.load(tmp_path / "pickled.npz")  # object arrays would need unpickling: refused
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable"):
        SpecialTokens.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="SandAI-org"):
        SpecialTokens.load(tmp_path / "absent.npz")
