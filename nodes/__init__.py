"""ComfyUI nodes of the pack: thin glue over ``cache_core`` and ``magi1``. Imported only inside ComfyUI."""

from .cache_policy import MAGI1MotionDetailCache

NODES = [MAGI1MotionDetailCache]
