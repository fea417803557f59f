"""Text conditioning: prompt cleaning, special tokens, per-chunk caption rows, prompt schedules and caption-states files.

May import: ``magi1.checks``, no other wing (``tests/test_package.py`` checks it); never ComfyUI or
``cache_core``."""
