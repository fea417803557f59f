"""bench.sparse_efficiency: the fixed protocol's report, and a short run on the tiny model."""

from types import SimpleNamespace

from bench import sparse_efficiency
from magi1 import tiny


def test_the_report_divides_each_rounds_speed_up_by_the_flop_ratio():
    # (dense wall, sparse wall, dense inside the DiT, sparse inside the DiT) per round, seconds
    times = [(2.0, 1.25, 1.6, 0.85), (2.2, 1.2, 1.8, 0.8), (1.9, 1.3, 1.5, 0.9)]
    last = {"dense": SimpleNamespace(flops=2e12, computed_fraction=1.0),
            "sparse": SimpleNamespace(flops=1e12, computed_fraction=0.55)}
    lines = sparse_efficiency.summary(times, last, forward_steps=10)
    assert lines[0] == "tokens computed 55%, FLOP ratio 2.00x"
    assert lines[1] == "wall speed-up: median 1.60x (range 1.46-1.83)"  # 2.0/1.25, 2.2/1.2, 1.9/1.3
    assert lines[2] == "sparse efficiency (wall speed-up / FLOP ratio): median 0.80 (range 0.73-0.92)"
    assert lines[3] == "inside the DiT: speed-up 1.88x (range 1.67-2.25)"  # 1.6/0.85, 1.8/0.8, 1.5/0.9
    # outside the DiT per step: dense (0.4, 0.4, 0.4) / 10, sparse (0.4, 0.4, 0.4) / 10
    assert lines[4] == "outside the DiT per forward step: dense 40.0 ms, sparse 40.0 ms (a dense DiT step takes 160.0 ms)"


def test_a_short_run_on_the_tiny_model(tmp_path):
    out = tmp_path / "sparse.txt"
    assert sparse_efficiency.main(["--model", "tiny", "--rounds", "1", "--frames", "24", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# python -m bench.sparse_efficiency --model tiny --fraction 0.5 --rounds 1")
    computed = float(text.split("tokens computed ")[1].split("%")[0])
    assert 50 < computed < 100  # half of every step after each chunk's first, which is dense
    assert "sparse efficiency (wall speed-up / FLOP ratio): median" in text
    assert f"{tiny.TINY.size}x{tiny.TINY.size}" in text
