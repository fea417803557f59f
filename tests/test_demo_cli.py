"""demo.py's command line: every option documented, every user error one line naming the fix and refused
before anything is generated, and one short end-to-end run of the tiny demo."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import demo

ROOT = Path(__file__).resolve().parents[1]


class Generated(Exception):
    """Raised by the stand-in for demo.sample: the options passed and generation would have started."""


@pytest.fixture
def no_generation(monkeypatch):
    calls = []

    def sample(*args, **kwargs):
        calls.append((args, kwargs))
        raise Generated

    monkeypatch.setattr(demo, "sample", sample)
    return calls


def run_main(argv, capsys):
    """``(exit status, stderr lines)`` of ``demo.main(argv)`` that must stop with an error."""
    with pytest.raises(SystemExit) as stopped:
        demo.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return stopped.value.code, err


def test_help_documents_every_option():
    parser = demo.build_parser()
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{action.dest} has no help text"
    text = parser.format_help()
    for option in ("--model", "--out", "--frames", "--steps", "--seed", "--mode", "--preset", "--tau"):
        assert option in text


@pytest.mark.parametrize("argv, fix", [
    (["--frames", "2"], "frames must be in [4, 2400]"),
    (["--frames", "abc"], "frames must be a whole number"),
    (["--frames", "100000"], "frames must be in [4, 2400]"),
    (["--steps", "0"], "a multiple of 4"),
    (["--steps", "6"], "the nearest valid value is 8"),
    (["--steps", "x"], "steps must be a whole number"),
    (["--seed", "-1"], "seed must be in [0, 18446744073709551615]"),
    (["--seed", str(2**64)], "seed must be in [0, 18446744073709551615]"),
    (["--seed", "1.5"], "seed must be a whole number"),
    (["--tau", "-0.1"], "tau must be a number >= 0"),
    (["--tau", "nan"], "tau must be a number >= 0"),
    (["--mode", "off", "--tau", "0.1"], "drop --tau, or pick a cache mode"),
    (["--model", "huge"], "invalid choice"),
    (["--out", "demo.gif"], "try --out demo.mp4"),
    (["--unknown"], "unrecognized arguments"),
])
def test_user_errors_are_one_line_naming_the_fix(argv, fix, capsys, no_generation, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = run_main(argv, capsys)
    assert status == 2
    assert len(err) == 1 and err[0].startswith("demo.py: error: ") and fix in err[0], err
    assert not no_generation, "generation started before the options were checked"


def test_out_is_checked_before_generating(capsys, no_generation, tmp_path):
    missing = tmp_path / "no" / "such" / "folder" / "x.mp4"
    status, err = run_main(["--out", str(missing)], capsys)
    assert status == 2 and "does not exist" in err[0] and "mkdir -p" in err[0]
    status, err = run_main(["--out", str(tmp_path)], capsys)
    assert status == 2 and "is a folder" in err[0]
    (tmp_path / "video.mp4").mkdir()
    status, err = run_main(["--out", str(tmp_path / "video.mp4")], capsys)
    assert status == 2 and "is a folder" in err[0]
    assert not no_generation


def test_unwritable_out_is_refused(capsys, no_generation, tmp_path, monkeypatch):
    """A folder the user may not write to (os.access says no: also where the tests run as root)."""
    real_access = os.access
    monkeypatch.setattr(demo.os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    status, err = run_main(["--out", str(tmp_path / "x.mp4")], capsys)
    assert status == 2 and "cannot write" in err[0] and not no_generation


def test_good_options_reach_the_generation(no_generation, tmp_path):
    out = tmp_path / "clip.mp4"
    with pytest.raises(Generated):
        demo.main(["a blue ball moving up over a gray wall", "--out", str(out), "--frames", "24", "--steps", "8",
                   "--seed", str(2**64 - 1), "--mode", "motion", "--preset", "fast", "--tau", "0.2"])
    (prompt,), options = no_generation[0]
    assert prompt == "a blue ball moving up over a gray wall"
    assert options["frames"] == 24 and options["steps"] == 8 and options["seed"] == 2**64 - 1
    assert options["model"] is demo.MODELS["tiny"]
    policy = options["policy"]
    assert policy.mode == "motion" and policy.tau == 0.2
    assert policy == demo.CachePolicy.preset("fast", mode="motion", tau=0.2)


def test_defaults_are_the_documented_ones(no_generation, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Generated):
        demo.main([])
    (prompt,), options = no_generation[0]
    assert prompt is None and options["frames"] == 48 and options["steps"] == demo.TINY.steps == 16
    assert options["seed"] == 0 and options["policy"] == demo.CachePolicy.preset("slow", mode=demo.PRESET_MODE)


def test_library_refusals_are_one_line(capsys, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise ValueError("frames must be at least 4 (one latent frame), got 2")

    monkeypatch.setattr(demo, "sample", refuse)
    status, err = run_main(["--out", str(tmp_path / "x.mp4")], capsys)
    assert status == 1 and err == ["demo.py: error: frames must be at least 4 (one latent frame), got 2"]


def test_tiny_demo_end_to_end(tmp_path):
    """The real thing, short: one chunk of the tiny model, written and read back."""
    av = pytest.importorskip("av")
    out = tmp_path / "smoke.mp4"
    done = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--frames", "24", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 24 frames (24 asked), 64x64" in done.stdout
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 24
