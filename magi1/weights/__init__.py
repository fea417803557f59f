"""The DiT's weights: reading official checkpoints (safetensors only), float8 kinds, streaming layers from host memory, and sharing layers between processes.

May import: ``magi1.checks``, ``magi1.network``, ``magi1.distributed``, ``magi1.builtin`` (the built-in models'
names, lazily: they load through this wing) (``tests/test_package.py`` checks it); never ComfyUI or
``cache_core``."""
