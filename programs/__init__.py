"""The pack's programs, outside the library: ``cli`` is ``python -m magi1`` (headless generation, also under
torchrun) and ``worker`` the process MAGI-1 Multi-GPU starts per GPU (``python -m programs.worker JOB_DIR``).
They compose ``magi1`` with ``cache_core`` as ``demo.py`` does, import both absolutely and run from the pack's
folder; neither ComfyUI nor ``import magi1`` ever imports them."""
