"""Speed-ups at equal quality, read from a results table that ``bench.quality.policies`` wrote: for each policy,
the largest FLOP ratio and wall speed-up at which its PSNR against ``off`` stays at or above a bar,
interpolated linearly along its τ sweep (``off`` itself, 1x at any bar, starts every sweep).

    python -m bench.quality.equal_quality bench/results/policies_bench_heldout.md --bars 35,30
"""

from __future__ import annotations

import argparse

OFF_PSNR = 99.0  # what bench.quality.policies writes for identical videos


def read_rows(text):
    """``(policy, FLOP ratio, wall speed-up, PSNR)`` of every row of the first results table in ``text``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or not cells[3].endswith("x") or cells[0] in ("policy", "off") or cells[0].startswith("off "):
            continue
        try:
            rows.append((cells[0], float(cells[3][:-1]), float(cells[4][:-1]), float(cells[6])))
        except ValueError:
            continue
    return rows


def ratio_at_quality(points, bar):
    """The largest ratio along ``points`` (``(ratio, psnr)`` of one sweep) whose interpolated PSNR is at or
    above ``bar``, the sweep starting from (1, ``OFF_PSNR``)."""
    points = [(1.0, OFF_PSNR)] + sorted(points)
    best = 1.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= bar:
            best = max(best, x1)
        elif y0 >= bar:  # crosses the bar inside this segment
            best = max(best, x0 + (x1 - x0) * (y0 - bar) / (y0 - y1))
    return best


def report(rows, bars):
    families = list(dict.fromkeys(r[0] for r in rows))
    lines = ["| policy | " + " | ".join(f"at >= {b:g} dB: FLOPs / wall" for b in bars) + " |",
             "|---|" + "---|" * len(bars)]
    for family in families:
        own = [r for r in rows if r[0] == family]
        cells = [f"{ratio_at_quality([(r[1], r[3]) for r in own], b):.2f}x / "
                 f"{ratio_at_quality([(r[2], r[3]) for r in own], b):.2f}x" for b in bars]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a results .md written by bench.quality.policies")
    parser.add_argument("--bars", default="35,30", help="comma-separated PSNR bars in dB (default 35,30)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        rows = read_rows(f.read())
    if not rows:
        raise SystemExit(f"{args.results}: no results table found (write one with python -m bench.quality.policies)")
    print(report(rows, [float(b) for b in args.bars.split(",") if b.strip()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
