"""The DiT network: its config, layers (operations), attention, key/value cache and FLOP count.

May import: ``magi1.checks``, no other wing (``tests/test_package.py`` checks it); never ComfyUI or
``cache_core``."""
