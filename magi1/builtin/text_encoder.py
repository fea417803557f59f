"""The tiny model's own text encoder: word tokens -> a small transformer -> caption states.

The real MAGI-1 reads T5-XXL v1.1 states (4096 wide), which cannot ship in a repository. The tiny demo
model was trained with this encoder instead: the words of its caption grammar (others map to
``<unk>``), a learned position table, two pre-norm transformer layers, 64-wide states. It is a demo
component only; real checkpoints always use T5 (``nodes/t5.py``). The vocabulary is read from the weight
file; the training program (``train/tiny.py``, outside the pack) builds it and writes the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

CONFIG_METADATA_KEY = "magi1_tiny_text_config"
SPECIALS = ("<pad>", "<unk>", "<end>")  # the first entries of every vocabulary
_WORD = re.compile(r"[a-z]+")
# What separates words without being read: spaces and everyday punctuation. Anything else (digits, accented
# letters, CJK, emoji) is dropped too, but named as unknown, since the prompt then says less than was meant.
_UNREAD = re.compile(r"[^a-z\s,.;:!?'\"()\-]+")


def unknown_note(unknown):
    """The report's words for what ``TinyTextEncoder.unknown_words`` found."""
    return (f"the tiny text encoder does not know {unknown}: unknown words are read as <unk>, other characters "
            "(digits, accents, CJK, emoji) are skipped")


def words(text):
    """The words of a text as the tokenizer reads them: runs of letters, lowercased (the rest separates)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class TextEncoderConfig:
    vocabulary: tuple
    width: int = 64
    layers: int = 2
    heads: int = 4
    max_tokens: int = 32


class TinyTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.index = {word: i for i, word in enumerate(config.vocabulary)}
        self.token_embedding = nn.Embedding(len(config.vocabulary), config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_tokens, config.width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(config.width, config.heads, 2 * config.width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)

    def tokenize(self, prompt):
        """Token ids ``(max_tokens,)`` and the mask of the valid ones (the words, then ``<end>``)."""
        unknown = self.index["<unk>"]
        ids = [self.index.get(word, unknown) for word in words(prompt)[: self.config.max_tokens - 1]]
        ids.append(self.index["<end>"])
        mask = torch.zeros(self.config.max_tokens, dtype=torch.bool)
        mask[: len(ids)] = True
        ids = ids + [self.index["<pad>"]] * (self.config.max_tokens - len(ids))
        return torch.tensor(ids), mask

    def forward(self, ids, mask):
        """``(B, max_tokens)`` ids and masks -> states ``(B, max_tokens, width)`` (padding rows are zero)."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)
        return self.norm(x) * mask[..., None]

    def unknown_words(self, prompt):
        """What of the prompt this encoder cannot read: the words it does not know (each read as ``<unk>``,
        which changes the video), then the runs of other characters it skips (digits, accents, CJK, emoji)."""
        return (sorted({word for word in words(prompt) if word not in self.index})
                + sorted(set(_UNREAD.findall(prompt.lower()))))

    @torch.no_grad()
    def encode(self, prompt):
        """One prompt -> states ``(max_tokens, width)`` float32 and the bool mask of the valid rows."""
        ids, mask = self.tokenize(prompt)
        device = self.position_embedding.device
        return self(ids[None].to(device), mask[None].to(device))[0].float().cpu(), mask


def load_text_encoder(path, device="cpu"):
    """The tiny text encoder from its safetensors file (config and vocabulary in the metadata), float32."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if CONFIG_METADATA_KEY not in metadata:
            raise ValueError(f"{path} is not a tiny MAGI-1 text encoder (no {CONFIG_METADATA_KEY} metadata)")
        values = json.loads(metadata[CONFIG_METADATA_KEY])
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    encoder = TinyTextEncoder(TextEncoderConfig(**dict(values, vocabulary=tuple(values["vocabulary"]))))
    encoder.load_state_dict(tensors, strict=True)
    return encoder.to(device).eval().requires_grad_(False)
