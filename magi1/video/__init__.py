"""Pixels: the MAGI-1 VAE (tiled and streamed encode/decode), mp4 writing, and the latent-to-RGB preview.

May import: ``magi1.checks``, ``magi1.network``, ``magi1.weights`` (``tests/test_package.py`` checks it); never ComfyUI or
``cache_core``."""
