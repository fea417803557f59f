"""Offline training programs, kept out of the pack's runtime: ComfyUI, ``magi1``, ``cache_core`` and ``nodes``
never import this folder, and nothing here is installed. Run from the repository root:

    python -m train.tiny --out <folder>      # the tiny demo model of magi1/builtin/weights (train/tiny.py)

Its modules import the pack absolutely (``from magi1... import``), never the reverse.
"""
