"""ComfyUI nodes of the pack: thin glue over ``cache_core`` and ``magi1``. Imported only inside ComfyUI."""

from .cache_policy import MAGI1MotionDetailCache
from .caption_states import MAGI1SaveCaptionStates
from .loaders import MAGI1DiTLoader, MAGI1VAELoader
from .multi_gpu import MAGI1MultiGPU
from .sampler import MAGI1Sampler
from .save_video import MAGI1SaveVideo
from .text_encode import MAGI1TextEncode, MAGI1TinyTextEncode
from .vae import MAGI1Decode, MAGI1EncodePrefix

NODES = [MAGI1DiTLoader, MAGI1VAELoader, MAGI1TextEncode, MAGI1TinyTextEncode, MAGI1MotionDetailCache,
         MAGI1EncodePrefix, MAGI1Sampler, MAGI1Decode, MAGI1SaveVideo, MAGI1SaveCaptionStates, MAGI1MultiGPU]


def report_problems_per_input():
    """Have ComfyUI report each queue-time problem of these nodes on the one input it concerns
    (``queue_checks.attribute_to_inputs``)."""
    import logging

    from .queue_checks import attribute_to_inputs

    try:
        import execution  # ComfyUI's module (the pack never imports it elsewhere)

        return attribute_to_inputs(execution, NODES)
    except Exception:  # the checks still refuse, with every message on every input they read
        logging.warning("MAGI-1: ComfyUI's validation could not be wrapped; queue-time errors are not narrowed to "
                        "their inputs", exc_info=True)
        return False
