"""MAGI-1 caption states from ComfyUI's stock T5-XXL v1.1 text encoder.

Load ``t5xxl_fp16.safetensors`` (or ``t5xxl_fp8_e4m3fn*.safetensors``, the same T5 v1.1 XXL encoder
that Flux, SD3, Mochi and LTX-Video use) from ``models/text_encoders`` with the stock **CLIPLoader**,
type **mochi**: that encoder runs with its attention mask, as MAGI-1's release does. The prompt is
cleaned the release's way before ComfyUI tokenizes it, so its ``(word:1.2)`` weighting never applies.
"""

from __future__ import annotations

import logging

import torch

from ..magi1.prompts.text import CAPTION_LENGTH, prepare_prompt

T5_KEY = "t5xxl"  # the tokenizer/encoder name ComfyUI gives T5-XXL v1.1
PAD_TOKEN = 0
END_TOKEN = 1
WRONG_ENCODER = ("MAGI-1 needs the T5-XXL v1.1 encoder alone, run with its attention mask: load "
                 "t5xxl_fp16.safetensors (models/text_encoders) with CLIPLoader, type 'mochi'")


def t5_states(clip, prompt):
    """The release's T5 encoding of ``prompt`` through a ComfyUI ``CLIP``: the last hidden states
    ``(tokens, 4096)`` float32 on the CPU and the bool mask of the valid tokens (prompt and end token)."""
    tokens = clip.tokenize(prepare_prompt(prompt))
    if set(tokens) != {T5_KEY}:
        raise ValueError(f"{WRONG_ENCODER} (this CLIP holds {sorted(tokens)})")
    tokens = {T5_KEY: [_truncated(batch) for batch in tokens[T5_KEY]]}
    encoded = clip.encode_from_tokens(tokens, return_dict=True)
    states = encoded["cond"][0].float().cpu()
    mask = encoded.get("attention_mask")
    if mask is not None:
        mask = mask[0].bool().cpu()
    else:
        # Without a mask every token attends to every other: equivalent only when nothing is padding.
        ids = [int(token[0]) for batch in tokens[T5_KEY] for token in batch]
        end = ids.index(END_TOKEN) if END_TOKEN in ids else len(ids)
        if any(token == PAD_TOKEN for token in ids[end:]):
            raise ValueError(f"{WRONG_ENCODER}: this loader type pads the prompt without a mask, which changes "
                             "every token's embedding")
        mask = torch.ones(states.shape[0], dtype=torch.bool)
    if mask.shape[0] != states.shape[0]:
        raise ValueError(f"{WRONG_ENCODER} (mask of {mask.shape[0]} tokens for {states.shape[0]} states)")
    return states, mask


def _truncated(batch):
    """As the release tokenizes (800 at most, end token kept): a longer prompt keeps its first 799 tokens
    and the end token, and is encoded that way."""
    ids = [int(token[0]) for token in batch]
    end = ids.index(END_TOKEN) if END_TOKEN in ids else len(ids) - 1
    if end < CAPTION_LENGTH:
        return batch
    logging.warning("MAGI-1: the prompt is %d T5 tokens; as released, only the first %d are used", end + 1,
                    CAPTION_LENGTH)
    return batch[:CAPTION_LENGTH - 1] + [batch[end]]
