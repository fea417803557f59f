"""``python -m magi1`` (also under torchrun): the headless program, ``programs/cli.py``, which lives outside
the library because it composes ``magi1`` with ``cache_core``. Run from the pack's folder, where ``programs``
is importable."""

from programs.cli import main

if __name__ == "__main__":
    main()
