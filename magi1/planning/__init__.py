"""Before a run: the memory plan and the time estimate.

May import: ``magi1.checks``, ``magi1.network``, ``magi1.sampling``, ``magi1.video``, ``magi1.prompts`` (``tests/test_package.py`` checks it); never ComfyUI or
``cache_core``."""
