"""The autoregressive sampler: the schedule, the video layout, the loop, guidance, token reuse and its contract, and what a run records.

May import: ``magi1.checks``, ``magi1.network``, ``magi1.distributed``, ``magi1.prompts`` (``tests/test_package.py`` checks it); never ComfyUI or
``cache_core``."""
