"""MAGI1SaveCaptionStates: a MAGI-1 CONDITIONING saved as a caption-states file (``magi1.prompts.caption_states``), so
that ``python -m magi1 --caption-states FILE`` generates from it headless, without a text encoder."""

import os

import folder_paths
from comfy_api.latest import io

from ..magi1.prompts.caption_states import save_caption_states
from .queue_checks import CheckedNode, output_prefix_problems
from .sampler import conditioning_schedule

SUFFIX = ".safetensors"


def schedule_of(conditioning, name):
    """``[(first_chunk, states, mask), ...]`` of a CONDITIONING, read exactly as MAGI-1 Sampler reads it (the
    width checked is the conditioning's own: the model is not known here)."""
    if not conditioning:
        raise ValueError(f"{name} is empty; connect MAGI-1 Text Encode")
    return conditioning_schedule(conditioning, name, conditioning[0][0].shape[-1])


class MAGI1SaveCaptionStates(CheckedNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MAGI1SaveCaptionStates",
            display_name="MAGI-1 Save Caption States",
            category="MAGI-1",
            description=("Saves an encoded prompt (and an optional negative one) to a .safetensors caption-states "
                         "file in ComfyUI's output folder, for headless generation without T5: "
                         "python -m magi1 --caption-states FILE (see the pack's README)."),
            inputs=[
                io.Conditioning.Input("positive", tooltip=(
                    "The prompt or prompt schedule, from MAGI-1 Text Encode (T5-XXL) or MAGI-1 Tiny Text Encode.")),
                io.String.Input("filename_prefix", default="magi1/caption_states", tooltip=(
                    "Where to save, inside ComfyUI's output folder: <prefix>_00001_.safetensors (the number "
                    "counts up). A folder in the prefix is made; paths outside the output folder are refused.")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "Optional negative prompt, for base models (as MAGI-1 Sampler's negative); unconnected: the "
                    "model's learned null caption.")),
            ],
            outputs=[io.String.Output(display_name="path", tooltip=(
                "The saved file's full path, for python -m magi1 --caption-states."))],
            is_output_node=True,
        )

    @classmethod
    def input_rules(cls, values):
        return output_prefix_problems(values, example="magi1/caption_states")

    @classmethod
    def execute(cls, positive, filename_prefix, negative=None) -> io.NodeOutput:
        schedule = schedule_of(positive, "positive")
        negative_schedule = None if negative is None else schedule_of(negative, "negative")
        if negative_schedule is not None and negative_schedule[0][1].shape[-1] != schedule[0][1].shape[-1]:
            raise ValueError(f"negative holds {negative_schedule[0][1].shape[-1]}-wide text states but positive "
                             f"{schedule[0][1].shape[-1]}-wide ones: encode both with the same text encoder")
        # ComfyUI's own rule for output files: numbered, and kept inside the output folder.
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix,
                                                                      folder_paths.get_output_directory())
        path = os.path.join(folder, f"{name}_{counter:05}_{SUFFIX}")
        save_caption_states(path, schedule, negative_schedule)
        return io.NodeOutput(path)
