"""Several processes: process groups and the context/guidance-parallel exchanges, and MAGI-1 Multi-GPU's worker processes.

May import: ``magi1.checks``, no other wing (``tests/test_package.py`` checks it); never ComfyUI or
``cache_core``."""
