"""MAGI-1's text conditioning: prompt cleaning, and the per-chunk caption tokens the DiT reads.

A prompt is cleaned (``prepare_prompt``: the release's caption cleaning, applied twice), encoded by the
t5-v1_1-xxl encoder with its attention mask (last hidden state, 4096 wide), and padded to 800 tokens.
Each chunk to generate then reads ``[DURATION, HQ, T5 tokens...]`` cut to 800, with the mask
``[1, 1, T5 mask...]``: HQ is ``other_tokens[1]`` of the release's ``special_tokens.npz`` and DURATION is
``other_tokens[7 + r]`` where ``r`` is how many chunks still follow this one, at most 7 (the release's
``PAD_HQ=1 PAD_DURATION=1``). Unconditional passes, negative prompts by default, and clean or prefix
chunks read the null caption: the model's learned ``null_caption_embedding`` with its first 50 rows valid.

The special-token table is part of the official repository (``example/assets/special_tokens.npz``), not
of the model weights; ``find_special_tokens`` looks for it where the user put it.
"""

from __future__ import annotations

import html
import os
import re
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

CAPTION_LENGTH = 800  # T5 tokens per caption, as released (model_config.caption_max_length)
NULL_CAPTION_TOKENS = 50  # the null caption attends to the first 50 rows of the learned null embedding
HQ_TOKEN = 1  # row of other_tokens
DURATION_TOKENS = range(7, 15)  # rows of other_tokens: 1..8 chunks ahead (the last chunk gets the first)
SPECIAL_TOKENS_FILENAMES = ("magi1_special_tokens.npz", "special_tokens.npz")
SPECIAL_TOKENS_SOURCE = "https://github.com/SandAI-org/MAGI-1/blob/main/example/assets/special_tokens.npz"


# ------------------------------------------------------------------------------------- prompt cleaning
def _rules(*pairs):
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_FILE_EXTENSIONS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_DASHES = ("\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           "\uFE31\uFE32\uFE58\uFE63\uFF0D")

# The release's cleaning (DeepFloyd IF / PixArt lineage), in its order. Before the HTML pass:
_BEFORE_HTML = _rules(
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", ""),  # web addresses
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", ""),
)
# After the HTML pass, before the underscore/hyphen check:
_AFTER_HTML = _rules(
    (r"@[\w\d]+\b", ""),  # @handles
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes, kana extensions, enclosed/compatibility CJK, ideographs
    (r"[" + _DASHES + r"]+", "-"),  # every kind of dash
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:" + _FILE_EXTENSIONS + r")", ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),  # stray punctuation (also drops (prompt:weights))
    (r"\s+\.\s+", " "),
)
_WORD_JOINERS = re.compile(r"(?:\-|\_)")  # more than 3 of them: words joined-like_this get spaces
# After ftfy and HTML unescaping:
_AFTER_FIX = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes like jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:" + _FILE_EXTENSIONS + r")(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes like 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # one pair of surrounding quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


def _apply(rules, text):
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def clean_caption(text):
    """One pass of the release's caption cleaning (lower case; web addresses, HTML, @handles, CJK, file
    names, shop spam and stray punctuation removed; dashes and quotes unified). Needs ``ftfy`` and
    ``beautifulsoup4``, as the release does."""
    try:
        import ftfy
        from bs4 import BeautifulSoup
    except ImportError as error:
        raise ImportError("MAGI-1's caption cleaning needs ftfy and beautifulsoup4: pip install ftfy beautifulsoup4 "
                          "(they are in the pack's requirements.txt)") from error
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = BeautifulSoup(text, features="html.parser").text
    text = _apply(_AFTER_HTML, text)
    if len(_WORD_JOINERS.findall(text)) > 3:
        text = _WORD_JOINERS.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _apply(_AFTER_FIX, text).strip()


def prepare_prompt(text):
    """The prompt as the release hands it to the T5 tokenizer: cleaned twice."""
    return clean_caption(clean_caption(text))


# -------------------------------------------------------------------------------------- special tokens
@dataclass(frozen=True)
class SpecialTokens:
    """The rows of ``special_tokens.npz`` that the released pipeline prepends, rounded to float16 as it
    does (then float32)."""

    hq: torch.Tensor  # (D,)
    durations: torch.Tensor  # (8, D): row r for a chunk followed by r more (row 0: the last chunk)

    @classmethod
    def load(cls, path):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MAGI-1 special tokens: no file at {path}; download special_tokens.npz from "
                                    f"{SPECIAL_TOKENS_SOURCE}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                other = np.asarray(npz["other_tokens"]) if "other_tokens" in npz.files else None
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:  # truncated, say
            raise ValueError(f"{path} is not a readable .npz file ({error}); download special_tokens.npz from "
                             f"{SPECIAL_TOKENS_SOURCE}") from error
        if other is None or other.ndim != 2 or other.shape[0] <= DURATION_TOKENS[-1]:
            raise ValueError(f"{path} is not MAGI-1's special_tokens.npz (it needs an 'other_tokens' table of at least "
                             f"{DURATION_TOKENS[-1] + 1} rows); download it from {SPECIAL_TOKENS_SOURCE}")
        table = torch.from_numpy(other.astype(np.float16)).float()
        return cls(hq=table[HQ_TOKEN], durations=table[DURATION_TOKENS.start:DURATION_TOKENS.stop])

    def duration(self, chunks_after):
        """The DURATION token of a chunk followed by ``chunks_after`` more (saturates at 7)."""
        return self.durations[min(chunks_after, len(self.durations) - 1)]


def find_special_tokens(folders):
    """The path of ``magi1_special_tokens.npz`` or ``special_tokens.npz`` in the first of ``folders`` that
    holds one; a ``FileNotFoundError`` saying where to get it and where to put it otherwise."""
    folders = [os.fspath(f) for f in folders if f]
    for folder in folders:
        for name in SPECIAL_TOKENS_FILENAMES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    where = "\n".join(f"  {f}" for f in folders) or "  (no folders given)"
    raise FileNotFoundError(
        "MAGI-1 needs its special-token table, which is not part of the model weights. Download "
        f"special_tokens.npz from {SPECIAL_TOKENS_SOURCE} and put it (as special_tokens.npz or "
        f"magi1_special_tokens.npz) in one of:\n{where}")


# ------------------------------------------------------------------------------------- caption layout
def pad_caption(states, mask, length=CAPTION_LENGTH):
    """T5 states ``(L, D)`` and their mask ``(L,)`` (valid tokens first) -> ``(length, D)`` float32 and a
    bool mask, cut or padded with zeros (padding rows are never read: the mask hides them)."""
    states = torch.as_tensor(states)
    mask = torch.as_tensor(mask).bool().flatten()
    if states.dim() != 2 or states.shape[0] != mask.shape[0]:
        raise ValueError(f"T5 states must be (tokens, width) with a (tokens,) mask, got {list(states.shape)} and "
                         f"{list(mask.shape)}")
    valid = int(mask.sum())
    if not bool(mask[:valid].all()):
        raise ValueError("the T5 mask must mark the valid tokens first (a tokenizer's padding comes last)")
    out = states.new_zeros(length, states.shape[1], dtype=torch.float32)
    kept = min(valid, length)
    out[:kept] = states[:kept].float()
    return out, torch.arange(length) < kept


def chunk_captions(states, mask, chunks, special_tokens=None, *, length=CAPTION_LENGTH):
    """The caption tokens ``(chunks, length, D)`` and masks ``(chunks, length)`` of the chunks to generate,
    as the released pipeline builds them from one prompt's T5 states ``(L, D)`` and mask ``(L,)``: with
    ``special_tokens``, ``[DURATION, HQ, T5...]`` cut to ``length``; without, the T5 tokens alone (what
    a negative prompt reads). A prompt without any valid token gives all-zero masks: the sampler then
    uses the null caption, as the release does."""
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    caption, caption_mask = _padded(states, mask, special_tokens, length)
    if special_tokens is None:
        return caption.expand(chunks, -1, -1).clone(), caption_mask.expand(chunks, -1).clone()
    rows = [_chunk_row(caption, caption_mask, special_tokens, chunks - chunk - 1, length) for chunk in range(chunks)]
    return torch.stack([r for r, _ in rows]), torch.stack([m for _, m in rows])


def _padded(states, mask, special_tokens, length):
    caption, caption_mask = pad_caption(states, mask, length)
    if special_tokens is not None and special_tokens.hq.shape[0] != caption.shape[1]:
        raise ValueError(f"the special tokens are {special_tokens.hq.shape[0]} wide but the T5 states "
                         f"{caption.shape[1]}; MAGI-1 uses t5-v1_1-xxl (4096)")
    return caption, caption_mask


def _chunk_row(caption, caption_mask, special_tokens, chunks_after, length):
    """One chunk's ``[DURATION, HQ, T5...]`` cut to ``length``, and its mask (all false for an empty prompt)."""
    prefix = torch.stack([special_tokens.duration(chunks_after), special_tokens.hq])
    empty = not bool(caption_mask.any())
    row_mask = torch.cat([torch.ones(len(prefix), dtype=torch.bool), caption_mask])[:length] & (not empty)
    return torch.cat([prefix, caption])[:length], row_mask


SCHEDULE_LINE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?:(?:\s+(.*))?$")  # "2: ...", not "12:30 ..."
LOOSE_SCHEDULE_LINE = re.compile(r"^\s*\d+\s*(?:-\s*\d+\s*)?:\S")  # "2:a ..." inside a schedule: a typo
MAX_CHUNK_DIGITS = 6  # chunk numbers longer than this are refused (Python refuses ints of over 4300 digits)
LAST_CHUNK = 170  # MAGI-1 Sampler makes at most 4096 frames: 171 chunks of 24 (a later start is never read)


def parse_prompt_schedule(text):
    """``[(first_chunk, prompt), ...]`` of a prompt schedule: lines ``N: prompt`` (from chunk ``N`` until the
    next line's chunk) or ``N-M: prompt`` (chunks ``N`` to ``M``; the next line must start at ``M + 1``),
    chunks counted from 0, the first chunk the sampler generates; the last prompt runs to the end (a range
    on the last line does not stop it). A line without a range continues the previous prompt. Text whose
    first line is not such a line (a colon must be followed by a space: "12:30 pm" is no range) is one
    prompt for every chunk: ``[(0, text)]``."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not SCHEDULE_LINE.match(lines[0]):
        later = next((line for line in lines[1:] if SCHEDULE_LINE.match(line)), None)
        if later is not None:  # a schedule whose first line was mistyped: not silently one prompt
            raise ValueError(f"prompt schedule: the line {later.strip()!r} starts a scheduled prompt, but the first "
                             f"line {lines[0].strip()[:60]!r} does not: begin with '0: <prompt>' (a number, a "
                             "colon and a space), or remove the schedule lines for one prompt")
        return [(0, text)]
    schedule, expected = [], 0
    for line in lines:
        match = SCHEDULE_LINE.match(line)
        if match is None:  # (never the first line)
            if LOOSE_SCHEDULE_LINE.match(line):
                number, rest = line.strip().split(":", 1)
                raise ValueError(f"prompt schedule: the line {line.strip()[:60]!r} looks like a scheduled prompt but "
                                 f"has no space after the colon: write '{number.strip()}: {rest.strip()[:40]}' (or "
                                 "join it to the line above if it continues that prompt)")
            schedule[-1] = (schedule[-1][0], schedule[-1][1] + " " + line.strip())
            continue
        if any(len(number) > MAX_CHUNK_DIGITS or int(number) > LAST_CHUNK for number in match.groups()[:2] if number):
            raise ValueError(f"prompt schedule: the line {line.strip()[:60]!r} names a chunk beyond any video "
                             f"(a chunk is 24 frames; MAGI-1 Sampler makes at most 4096 frames, 171 chunks)")
        first, last, prompt = int(match.group(1)), match.group(2), (match.group(3) or "").strip()
        if (expected is not None and first != expected) or (expected is None and schedule and first <= schedule[-1][0]):
            raise ValueError(f"prompt schedule: line {line.strip()!r} starts at chunk {first}, but "
                             + ("chunk 0 needs the first prompt" if not schedule else
                                f"the chunks must follow on (expected {expected})" if expected is not None else
                                f"it must come after chunk {schedule[-1][0]}"))
        if last is not None and int(last) < first:
            raise ValueError(f"prompt schedule: {line.strip()!r} ends before it starts")
        schedule.append((first, prompt))
        expected = int(last) + 1 if last is not None else None
    return schedule


@dataclass(frozen=True)
class ChunkCaptions:
    """Per-chunk captions as distinct rows: chunk ``k`` reads ``table[rows[k]]`` with mask ``masks[rows[k]]``.
    A prompt's chunks differ only by their DURATION token, the same for every chunk 7 or more before the end,
    so this holds at most 8 rows a prompt, whatever the video's length (``magi1.generate`` takes it as
    ``caption``, with no ``caption_mask``)."""

    table: torch.Tensor  # (rows, length, D) float32
    masks: torch.Tensor  # (rows, length) bool
    rows: Tuple[int, ...]  # per chunk to generate

    def __len__(self):
        return len(self.rows)

    def dense(self):
        """``(caption, caption_mask)``: one row per chunk, ``(chunks, length, D)`` and ``(chunks, length)``."""
        index = list(self.rows)
        return self.table[index], self.masks[index]


def scheduled_caption_rows(prompts, chunks, special_tokens=None, *, length=CAPTION_LENGTH):
    """The captions of the chunks to generate from a schedule ``[(first_chunk, states, mask), ...]`` (sorted,
    the first at chunk 0), as ``ChunkCaptions``: chunk ``k`` reads the last prompt starting at or before
    ``k``, with its own per-chunk special tokens, exactly as ``chunk_captions`` builds that prompt's row
    ``k``. Only the rows the chunks read are built (prompts past the video's end are not even padded)."""
    if not prompts or prompts[0][0] != 0:
        raise ValueError("a prompt schedule needs a prompt for chunk 0")
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    used = [p for p in prompts if p[0] < chunks]
    built, masks, rows = [], [], []
    for i, (first, states, mask) in enumerate(used):
        end = used[i + 1][0] if i + 1 < len(used) else chunks
        caption, caption_mask = _padded(states, mask, special_tokens, length)
        made = {}  # DURATION row -> table row, for this prompt
        for k in range(first, end):
            duration = None if special_tokens is None else min(chunks - k - 1, len(special_tokens.durations) - 1)
            if duration not in made:
                made[duration] = len(built)
                row = (caption, caption_mask) if special_tokens is None else \
                    _chunk_row(caption, caption_mask, special_tokens, duration, length)
                built.append(row[0])
                masks.append(row[1])
            rows.append(made[duration])
    return ChunkCaptions(torch.stack(built), torch.stack(masks), tuple(rows))


def scheduled_captions(prompts, chunks, special_tokens=None, *, length=CAPTION_LENGTH):
    """``scheduled_caption_rows`` as dense tensors ``(chunks, length, D)`` and ``(chunks, length)``: one row per
    chunk (one prompt gives ``chunk_captions`` itself)."""
    return scheduled_caption_rows(prompts, chunks, special_tokens, length=length).dense()


def null_caption(null_caption_embedding):
    """The null caption ``(L, D)`` float32 and its mask (first 50 rows) from the model's learned table."""
    table = null_caption_embedding.detach().float()
    return table, torch.arange(table.shape[0], device=table.device) < NULL_CAPTION_TOKENS
