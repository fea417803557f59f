"""MAGI1TextEncode: a prompt through the stock T5-XXL CLIP into CONDITIONING the MAGI-1 sampler reads."""

from comfy_api.latest import io

from .t5 import t5_states


class MAGI1TextEncode(io.ComfyNode):
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
                    "(no web addresses, HTML or CJK; (word:1.2) weights do not apply).")),
            ],
            outputs=[io.Conditioning.Output(tooltip=(
                "The T5 states and their attention mask; the sampler adds MAGI-1's per-chunk tokens."))],
        )

    @classmethod
    def execute(cls, clip, prompt) -> io.NodeOutput:
        states, mask = t5_states(clip, prompt)
        return io.NodeOutput([[states[None], {"attention_mask": mask[None]}]])
