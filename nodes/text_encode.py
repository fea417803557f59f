"""MAGI1TextEncode: a prompt through the stock T5-XXL CLIP into CONDITIONING the MAGI-1 sampler reads.
MAGI1TinyTextEncode: the same for a built-in model (tiny demo or benchmark), through its own small text encoder."""

import logging

from comfy_api.latest import io

from ..magi1 import parse_prompt_schedule

from ..magi1 import builtin
from ..magi1.builtin.text_encoder import unknown_note
from .queue_checks import CheckedNode
from .t5 import T5_KEY, t5_states

UNKNOWN_WORDS_KEY = "magi1_unknown_words"  # in a CONDITIONING's options: words the tiny encoder read as <unk>
FIRST_CHUNK_KEY = "magi1_first_chunk"  # in a CONDITIONING's options: where a scheduled prompt starts
ENCODER_KEY = "magi1_text_encoder"  # in a CONDITIONING's options: "t5xxl", or the built-in model encoded for
SCHEDULE_HELP = ("One prompt for the whole video, or a prompt schedule: lines 'N: prompt' (from chunk N, counted "
                 "from 0, until the next line's chunk) or 'N-M: prompt'; a chunk is 24 frames (1 s). Each chunk "
                 "gets its own caption with MAGI-1's per-chunk tokens.")


def schedule_conditioning(text, encode, encoder):
    """The CONDITIONING of a prompt or prompt schedule (``magi1.parse_prompt_schedule``): one entry per
    scheduled prompt, carrying its first chunk; a plain prompt gives a single entry. Every entry names the
    ``encoder`` that made it, so that the sampler can refuse a prompt encoded for another model."""
    schedule = parse_prompt_schedule(text)
    entries = []
    for first, prompt in schedule:
        states, mask, extra = encode(prompt)
        options = {"attention_mask": mask[None], ENCODER_KEY: encoder, **extra}
        if len(schedule) > 1:
            options[FIRST_CHUNK_KEY] = first
        entries.append([states[None], options])
    return entries


def schedule_problems(values):
    """The queue-time check of a prompt (a malformed prompt schedule), as ``{"prompt": message}``."""
    if values.get("prompt") is None:
        return {}
    try:
        parse_prompt_schedule(values["prompt"])
    except ValueError as error:
        return {"prompt": str(error)}
    return {}


class MAGI1TextEncode(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1TextEncode",
            display_name="MAGI-1 Text Encode",
            category="MAGI-1",
            description=("Encodes a prompt as MAGI-1 does: cleaned, then T5-XXL v1.1 with its attention mask. "
                         "Load t5xxl_fp16.safetensors with CLIPLoader, type 'mochi'."),
            inputs=[
                io.Clip.Input("clip", tooltip="T5-XXL v1.1 from CLIPLoader, type 'mochi'."),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "What the video shows. It is lower-cased and cleaned as MAGI-1 was trained "
                    "(no web addresses, HTML or CJK; (word:1.2) weights do not apply). " + SCHEDULE_HELP)),
            ],
            outputs=[io.Conditioning.Output(tooltip=(
                "The T5 states and their attention mask; the sampler adds MAGI-1's per-chunk tokens."))],
        )

    @classmethod
    def input_rules(cls, values):
        return schedule_problems(values)

    @classmethod
    def execute(cls, clip, prompt) -> io.NodeOutput:
        return io.NodeOutput(schedule_conditioning(prompt, lambda text: (*t5_states(clip, text), {}), T5_KEY))


class MAGI1TinyTextEncode(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1TinyTextEncode",
            display_name="MAGI-1 Tiny Text Encode (demo)",
            category="MAGI-1",
            description=("Encodes a prompt for a built-in model with its own small text encoder (no T5 needed). "
                         "It knows the words of the model's training captions, e.g. 'a red ball moving left over a "
                         "checkerboard' (tiny) or 'a red ball moving right slowly and a blue square standing still "
                         "over a brick wall, the camera pans left' (bench). Real checkpoints use MAGI-1 Text Encode."),
            inputs=[
                io.String.Input("prompt", multiline=True, default=builtin.TINY.example_prompt, tooltip=(
                    "tiny: colours (red, green, blue, yellow, white, purple, orange, black), shapes (ball, square, "
                    "triangle), motions (moving left/right/up/down, bouncing, spinning, growing, shrinking, "
                    "standing still), backgrounds (checkerboard, striped wall, grassy field, gray wall, blue sky), "
                    "'the camera pans left/right'. bench: one to three objects joined by 'and' (colour, shape, "
                    "'moving left slowly', 'moving up quickly then stopping', 'standing still then moving right "
                    "slowly', 'entering from the top slowly', 'standing still'), then 'over a' brick wall / tiled "
                    "floor / checkerboard / striped wall / grassy field or 'in a cloudy sky', then optionally "
                    "', the camera pans left/right'. Other words are read as an unknown token, which changes the "
                    "video; digits and other characters than letters and punctuation are skipped: the node's text output "
                    "and the sampler's report name both. " + SCHEDULE_HELP)),
                io.Combo.Input("model", options=list(builtin.MODELS), default=builtin.TINY.name, tooltip=(
                    "The built-in model the DiT Loader loads: tiny (the demo) or bench (the benchmark model).")),
            ],
            outputs=[io.Conditioning.Output(tooltip="The built-in model's caption states and their mask."),
                     io.String.Output(display_name="unknown_words", tooltip=(
                         "The prompt's words the encoder does not know (empty when it knows them all)."))],
        )

    @classmethod
    def input_rules(cls, values):
        return schedule_problems(values)

    @classmethod
    def execute(cls, prompt, model=builtin.TINY.name) -> io.NodeOutput:
        encoder = builtin.MODELS[model].load_text_encoder()

        def encode(text):
            unknown = encoder.unknown_words(text)
            return (*encoder.encode(text), {UNKNOWN_WORDS_KEY: unknown} if unknown else {})  # the report names them

        conditioning = schedule_conditioning(prompt, encode, model)
        unknown = sorted({w for entry in conditioning for w in entry[1].get(UNKNOWN_WORDS_KEY, [])})
        if unknown:
            logging.warning("MAGI-1 Tiny Text Encode: %s", unknown_note(unknown))
        return io.NodeOutput(conditioning, ", ".join(unknown))
