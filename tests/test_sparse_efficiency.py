"""bench.speed.sparse_efficiency: the fixed protocol's report, and a short run on the tiny model."""

from types import SimpleNamespace

from bench.speed import sparse_efficiency
from magi1 import builtin


def test_the_report_divides_each_rounds_speed_up_by_the_flop_ratio():
    # (dense wall, sparse wall, dense inside the DiT, sparse inside the DiT) per round, seconds
    times = [(2.0, 1.25, 1.6, 0.85), (2.2, 1.2, 1.8, 0.8), (1.9, 1.3, 1.5, 0.9)]
    last = {"dense": SimpleNamespace(flops=2e12, computed_fraction=1.0),
            "sparse": SimpleNamespace(flops=1e12, computed_fraction=0.55)}
    lines = sparse_efficiency.summary(times, last, forward_steps=10)
    assert lines[0] == "tokens computed 55%, FLOP ratio 2.00x"
    assert lines[1] == "wall speed-up: median 1.60x (range 1.46-1.83)"  # 2.0/1.25, 2.2/1.2, 1.9/1.3
    assert lines[2] == "sparse efficiency (wall speed-up / FLOP ratio): median 0.80 (range 0.73-0.92)"
    assert lines[3] == "fastest rounds (noise only adds time): dense 1.900 s, sparse 1.200 s, speed-up 1.58x, efficiency 0.79"
    assert lines[4] == "inside the DiT: speed-up 1.88x (range 1.67-2.25)"  # 1.6/0.85, 1.8/0.8, 1.5/0.9
    # outside the DiT per step: dense (0.4, 0.4, 0.4) / 10, sparse (0.4, 0.4, 0.4) / 10
    assert lines[5] == "outside the DiT per forward step: dense 40.0 ms, sparse 40.0 ms (a dense DiT step takes 160.0 ms)"


def test_a_short_run_on_the_tiny_model(tmp_path):
    out = tmp_path / "sparse.txt"
    assert sparse_efficiency.main(["--model", "tiny", "--rounds", "1", "--frames", "24", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# python -m bench.speed.sparse_efficiency --model tiny --fraction 0.5 --rounds 1")
    computed = float(text.split("tokens computed ")[1].split("%")[0])
    assert 50 < computed < 100  # half of every step after each chunk's first, which is dense
    assert "sparse efficiency (wall speed-up / FLOP ratio): median" in text
    assert f"{builtin.TINY.size}x{builtin.TINY.size}" in text


def test_the_forced_fraction_keeps_fresh_velocities_exactly_on_its_chosen_tokens():
    import torch

    from bench.speed.forced_reuse import ForcedFraction

    torch.manual_seed(3)
    channels, frames, height, width, patch = 4, 3, 6, 10, (2, 2)
    state = ForcedFraction(0.4, seed=5).new_state(num_steps=4, chunk_shape=(channels, frames, height, width),
                                                 patch=patch)
    feature = torch.zeros(8, frames, height // 2, width // 2)
    first = state.decide([(0, 0, feature, 0.0)])[0]
    old = torch.randn(channels, frames, height, width)
    assert first.active is None and torch.equal(state.velocity(first, old, 0.1), old)
    decision = state.decide([(0, 1, feature, 0.25)])[0]
    n_tokens = frames * (height // 2) * (width // 2)
    assert decision.n_active == round(0.4 * n_tokens) and decision.active.numel() == decision.n_active
    fresh = torch.randn(channels, frames, height, width)
    merged = state.velocity(decision, fresh, 0.1)
    chosen = set(decision.active.tolist())
    for f in range(frames):
        for y in range(height):
            for x in range(width):
                token = (f * (height // 2) + y // 2) * (width // 2) + x // 2
                source = fresh if token in chosen else old
                assert torch.equal(merged[:, f, y, x], source[:, f, y, x])
