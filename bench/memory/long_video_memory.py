"""Host memory of a long video: the peak resident memory of ``python -m magi1`` on the built-in tiny model
(64x64, 8 steps, cache slow), the video decoded and written to the mp4 as its chunks finish, at 96, 480
and 2400 frames (4 s, 20 s, 100 s). Each run is its own process; the peak is the kernel's (``ru_maxrss``
of the child). ``--decode after`` is measured too, and, with ``--against`` a checkout of an older version,
the same runs there. Each cell is the median of 3 runs.

    python -m bench.memory.long_video_memory                      # prints the table (bench/results/long_video_memory.txt)
    python -m bench.memory.long_video_memory --against /tmp/old   # and an older checkout's, side by side
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

FRAMES = (96, 480, 2400)


REPEATS = 3  # runs per cell: the peak moves by a few percent from run to run (start-up transients)


def measure(root, frames, extra=()):
    """``(peak MB, seconds)``: the medians over ``REPEATS`` runs."""
    runs = sorted(measure_once(root, frames, extra) for _ in range(REPEATS))
    return runs[len(runs) // 2][0], sorted(s for _, s in runs)[len(runs) // 2]


def measure_once(root, frames, extra=()):
    """Peak RSS in MB of one run: read from a wrapper that runs the CLI and reports its own children's peak."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "magi1", "--model", "tiny", "--steps", "8", "--cache", "slow",
                   "--frames", str(frames), "--out", os.path.join(folder, "video.mp4"), *extra]
        began = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, *command], cwd=root, check=True, capture_output=True,
                             text=True).stdout
    return int(out.split()[-1]) / 1024, time.perf_counter() - began


def version(root):
    """The pack's version at ``root`` (its pyproject.toml)."""
    for line in open(os.path.join(root, "pyproject.toml")):
        if line.startswith("version"):
            return "version " + line.split("=")[1].strip().strip('"')
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="an older checkout to measure beside this one")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [(version(here), here, ()), (f"{version(here)}, --decode after", here, ("--decode", "after"))]
    if args.against:
        runs.append((version(args.against), args.against, ()))
    print("| run | " + " | ".join(f"{f} frames" for f in FRAMES) + " |")
    print("|---|" + "---|" * len(FRAMES))
    for label, root, extra in runs:
        cells = [measure(root, frames, extra) for frames in FRAMES]
        print(f"| {label} | " + " | ".join(f"{mb:.0f} MB ({s:.0f} s)" for mb, s in cells) + " |", flush=True)
    print(f"\npeak resident memory of python -m magi1 --model tiny --steps 8 --cache slow (64x64), median of "
          f"{REPEATS} runs, {os.cpu_count()} cores, torch {__import__('torch').__version__}")


if __name__ == "__main__":
    main()
