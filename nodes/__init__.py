"""ComfyUI nodes of the pack: thin glue over ``cache_core`` and ``magi1``. Imported only inside ComfyUI."""

from .cache_policy import MAGI1MotionDetailCache
from .caption_states import MAGI1SaveCaptionStates
from .loaders import MAGI1DiTLoader, MAGI1VAELoader
from .multi_gpu import MAGI1MultiGPU
from .sampler import MAGI1Sampler
from .text_encode import MAGI1TextEncode, MAGI1TinyTextEncode
from .vae import MAGI1Decode, MAGI1EncodePrefix

NODES = [MAGI1DiTLoader, MAGI1VAELoader, MAGI1TextEncode, MAGI1TinyTextEncode, MAGI1MotionDetailCache,
         MAGI1EncodePrefix, MAGI1Sampler, MAGI1Decode, MAGI1SaveCaptionStates, MAGI1MultiGPU]
