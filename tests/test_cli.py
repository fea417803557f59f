"""``python -m magi1``, the headless program: it writes a playable mp4 and the latent ``magi1.generate`` makes
from the same inputs; a caption-states file gives what ``--prompt`` gives; a checkpoint path runs a base
model with its negative prompt and guidance; every bad option is one line naming the fix, refused before
anything is loaded; ``--help`` documents every option. Single process (torchrun runs are the lead's
multi-process tests)."""

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cache_core import CachePolicy
from magi1 import Guidance, StepProgress, load_dit, parse_prompt_schedule, scheduled_captions
from run_request import generate
from magi1 import builtin
from programs import cli
from magi1.prompts.caption_states import save_caption_states
from magi1.sampling.layout import FRAMES_RULE
from run_request import estimate_run
from magi1.sampling.schedule import window_step

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--frames", "24", "--steps", "8"]
SCHEDULE = "0: a red ball moving right over a checkerboard\n1: a blue square moving up over a gray wall"
MULTI_PROCESS_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_cli(*args):
    """``python -m magi1 args`` from the repository root, as one process; the finished process."""
    env = {k: v for k, v in os.environ.items() if k not in MULTI_PROCESS_VARIABLES}
    done = subprocess.run([sys.executable, "-m", "magi1", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def saved_latent(path):
    """The latent of ``--latent-out``, in ComfyUI's latent file layout."""
    tensors = load_file(path)
    assert set(tensors) == {cli.LATENT_KEY, cli.LATENT_VERSION_KEY} and tensors[cli.LATENT_KEY].shape[0] == 1
    return tensors[cli.LATENT_KEY][0]


def encoded(text, model=builtin.TINY):
    """A prompt (or schedule) through a built-in's text encoder: ``[(first_chunk, states, mask), ...]``."""
    encoder = model.load_text_encoder()
    return [(first, *encoder.encode(prompt)) for first, prompt in parse_prompt_schedule(text)]


@pytest.fixture(scope="module")
def scheduled_process(tmp_path_factory):
    """Two chunks of the tiny model from a two-prompt schedule, video and latent written: ``(folder, process)``."""
    folder = tmp_path_factory.mktemp("cli")
    done = run_cli("--prompt", SCHEDULE, "--frames", "48", "--steps", "8", "--seed", "7", "--out",
                   folder / "video.mp4", "--latent-out", folder / "latent.safetensors")
    return folder, done


@pytest.fixture(scope="module")
def scheduled_run(scheduled_process):
    folder, done = scheduled_process
    return folder, done.stdout


def test_writes_a_playable_mp4_and_a_report(scheduled_run):
    av = pytest.importorskip("av")  # a requirement of the pack; CI has it
    folder, stdout = scheduled_run
    with av.open(str(folder / "video.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 48 and frames[0].shape == (64, 64, 3)
    assert "MAGI-1 cache hybrid: computed" in stdout
    assert "frames: 48 asked, 48 made (2 chunks of 24), 64x64, 8 steps, seed 7" in stdout
    assert f"wrote {folder / 'video.mp4'}: 48 frames, 64x64" in stdout


def test_latent_is_what_generate_makes_of_the_same_inputs(scheduled_run):
    folder, stdout = scheduled_run
    dit = builtin.TINY.load_dit()
    caption, mask = scheduled_captions(encoded(SCHEDULE), 2, builtin.TINY.special_tokens(),
                                       length=dit.config.caption_max_length)
    expected = generate(dit, caption, mask, frames=48, height=64, width=64, steps=8, seed=7,
                        policy=CachePolicy.preset("slow")).latent
    assert torch.equal(saved_latent(folder / "latent.safetensors"), expected)
    with safe_open(folder / "latent.safetensors", framework="pt") as f:
        assert f.metadata()["magi1_seed"] == "7" and f.metadata()["magi1_frames"] == "48"
    assert f"wrote {folder / 'latent.safetensors'}: latent [1, 16, 12, 8, 8]" in stdout


def test_the_estimate_and_a_line_per_chunk_on_stderr(scheduled_process):
    """Not a terminal (captured): the estimate before loading, then one line per finished chunk, no live line."""
    _, done = scheduled_process
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and len(lines) == 3, done.stderr
    assert re.fullmatch(r"estimated time: about \d+ (s|min) on (the CPU|cuda:0) for the DiT \(2 chunks in 10 steps, "
                        r"every token counted: the cache skips some of it; decoding adds some\)", lines[0]), lines[0]
    assert re.fullmatch(r"chunk 1/2 done, \d+:\d\d elapsed, ETA \d+:\d\d", lines[1]), lines[1]
    assert re.fullmatch(r"chunk 2/2 done, \d+:\d\d elapsed", lines[2]), lines[2]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def progress_output(stream, chunks=3, steps=8):
    """What ``Progress`` writes on ``stream`` over a run of ``chunks`` chunks of the tiny model, one second a
    step: ``(output, the windows of its steps)``."""
    estimate = estimate_run(builtin.TINY.load_dit().config, frames=24 * chunks, height=64, width=64, steps=steps,
                            passes=1, throughput=1e9)
    seconds = iter(range(100))
    progress = cli.Progress(estimate, stream, clock=lambda: float(next(seconds)))
    windows = []
    for step in range(estimate.forward_steps):
        windows.append(window_step(step, chunk_num=chunks, num_steps=steps, window_size=4))
        progress(StepProgress(step, estimate.forward_steps, (windows[-1].start, windows[-1].end), None))
    progress.close()
    return stream.getvalue(), windows


def test_on_a_terminal_a_live_line_and_a_line_per_chunk():
    text, windows = progress_output(Terminal())
    finished = [line for line in text.split("\n") if line]
    assert len(finished) == 3 and text.endswith("\n")  # each chunk's line ends one stretch of live lines
    updates = [part.rstrip() for line in finished for part in line.split("\r") if part]
    live = [u for u in updates if u.startswith("step ")]
    assert len(live) == len(windows) - 1  # after every step but the last
    assert live[0] == "step 1/12, denoising chunk 1 of 3, 0:01 elapsed, ETA " + live[0].split("ETA ")[1]
    assert live[5].startswith("step 6/12, denoising chunks 1-3 of 3, 0:06 elapsed, ETA ")
    done = [u for u in updates if u.startswith("chunk ")]
    assert [d.split(",")[0] for d in done] == ["chunk 1/3 done", "chunk 2/3 done", "chunk 3/3 done"]
    assert done[0].startswith("chunk 1/3 done, 0:08 elapsed, ETA ") and done[2] == "chunk 3/3 done, 0:12 elapsed"
    # a chunk's line follows the last step whose window holds it
    assert [i + 1 for i, w in enumerate(windows[1:]) if w.start > windows[i].start] == [8, 10]
    # the ETA comes from the pace measured so far: 8 of 12 steps in 8 s leave about 4 s, a little more as the
    # steps left hold a clean chunk to re-encode and more keys than the first ones
    assert 3 <= int(done[0].split("ETA 0:")[1]) <= 6


def test_off_a_terminal_only_the_chunk_lines():
    text, _ = progress_output(io.StringIO())
    assert text.splitlines() == ["chunk 1/3 done, 0:08 elapsed, ETA " + text.splitlines()[0].split("ETA ")[1],
                                 "chunk 2/3 done, 0:10 elapsed, ETA " + text.splitlines()[1].split("ETA ")[1],
                                 "chunk 3/3 done, 0:12 elapsed"]


def test_the_estimate_comes_before_loading(monkeypatch, capsys, tmp_path):
    def load(run, par):
        raise Loaded

    monkeypatch.setattr(cli, "load_models", load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in MULTI_PROCESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Loaded):
        cli.main(["--frames", "25", "--width", "256", "--height", "128", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert err.startswith("estimated time: about ") and "on the CPU for the DiT (2 chunks in 20 steps" in err


def test_caption_states_file_gives_the_prompts_latent(scheduled_run, tmp_path):
    folder, _ = scheduled_run
    states = tmp_path / "prompt.safetensors"
    save_caption_states(states, encoded(SCHEDULE))
    done = run_cli("--caption-states", states, "--frames", "48", "--steps", "8", "--seed", "7",
                   "--latent-out", tmp_path / "latent.safetensors")
    assert torch.equal(saved_latent(tmp_path / "latent.safetensors"), saved_latent(folder / "latent.safetensors"))
    assert "wrote" in done.stdout and ".mp4" not in done.stdout  # only the latent was asked for


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny DiT saved as a base checkpoint (its distill mark dropped) with its special tokens beside it, and
    a caption-states file with a negative prompt: ``(checkpoint, states file, positive, negative)``."""
    folder = tmp_path_factory.mktemp("base")
    checkpoint = folder / "dit.safetensors"
    with safe_open(builtin.TINY.dit_file, framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "magi1_distill"}
        save_file({k: f.get_tensor(k) for k in f.keys()}, checkpoint, metadata=metadata)
    shutil.copy(builtin.TINY.special_tokens_file, folder / "special_tokens.npz")
    positive, negative = encoded(builtin.TINY.example_prompt), encoded("a white square spinning over a blue sky")
    save_caption_states(folder / "states.safetensors", positive, negative)
    return checkpoint, folder / "states.safetensors", positive, negative


def base_latent(base, scale):
    """What ``magi1.generate`` makes of the base checkpoint's inputs (one chunk, 8 steps, no cache)."""
    checkpoint, _, positive, negative = base
    dit = load_dit(checkpoint)
    assert not dit.distill
    length = dit.config.caption_max_length
    caption, mask = scheduled_captions(positive, 1, builtin.TINY.special_tokens(), length=length)
    negative_caption, negative_mask = scheduled_captions(negative, 1, length=length)
    return generate(dit, caption, mask, frames=24, height=64, width=64, steps=8, seed=0,
                    negative_caption=negative_caption, negative_mask=negative_mask,
                    guidance=Guidance().with_text_scale(scale), policy=CachePolicy.preset("off")).latent


def test_a_base_checkpoint_with_negative_prompt_and_guidance(base, tmp_path):
    checkpoint, states, _, _ = base
    done = run_cli("--model", checkpoint, "--caption-states", states, *FAST, "--width", "64", "--height", "64",
                   "--guidance", "4", "--cache", "off", "--latent-out", tmp_path / "latent.safetensors")
    assert "MAGI-1 model: custom_base" in done.stdout
    assert torch.equal(saved_latent(tmp_path / "latent.safetensors"), base_latent(base, 4.0))


def test_torchrun_two_processes_in_two_guidance_groups(base, tmp_path):
    """``torchrun --nproc-per-node 2 -m magi1 --cfg-parallel 2`` on the CPU (gloo): rank 0 alone reports and
    writes, and the latent is the single process's (to float32 rounding: the sums run in another order)."""
    checkpoint, states, _, _ = base
    env = {k: v for k, v in os.environ.items() if k not in MULTI_PROCESS_VARIABLES}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "magi1", "--model", str(checkpoint), "--caption-states", str(states), *FAST,
                           "--width", "64", "--height", "64", "--guidance", "4", "--cache", "off",
                           "--cfg-parallel", "2",
                           "--latent-out", str(tmp_path / "latent.safetensors")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("MAGI-1 cache off") == 1 and done.stdout.count("wrote ") == 1, done.stdout
    latent, expected = saved_latent(tmp_path / "latent.safetensors"), base_latent(base, 4.0)
    assert ((latent - expected).norm() / expected.norm()).item() < 1e-5


def test_help_documents_every_option():
    parser = cli.build_parser()
    text = run_cli("--help").stdout
    options = [option for action in parser._actions for option in action.option_strings]
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{action.dest} has no help text"
    for option in ("--model", "--vae", "--special-tokens", "--prompt", "--caption-states", "--frames", "--width",
                   "--height", "--steps", "--seed", "--cache", "--guidance", "--cfg-parallel", "--replicate-weights",
                   "--out", "--latent-out", "--dtype", "--device"):
        assert option in options and option in text, option
    assert FRAMES_RULE in " ".join(parser._option_string_actions["--frames"].help.split())
    for preset in cli.CACHE_PRESETS:  # the names --help offers are cache_core's
        assert preset in parser._option_string_actions["--cache"].help
        CachePolicy.preset(preset)


# ------------------------------------------------------------------------------------------ bad options
class Loaded(Exception):
    """Raised by the stand-in for loading: the options passed the checks."""


@pytest.fixture
def no_loading(monkeypatch):
    calls = []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        raise Loaded

    monkeypatch.setattr(cli, "sample", load)
    monkeypatch.setattr(cli, "start_parallel", lambda run: None)
    for name in MULTI_PROCESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.fixture
def files(tmp_path):
    """A checkpoint-like file, a pickle, a caption-states file and a file that is not one."""
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    save_caption_states(tmp_path / "states.safetensors", encoded("a red ball"))
    return tmp_path


def refusal(argv, capsys):
    """``(exit status, stderr lines)`` of ``main(argv)``, which must stop."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([str(a) for a in argv])
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv, fix", [
    (["--frames", "2"], "frames must be in [4, 4096]"),
    (["--frames", "x"], "frames must be a whole number"),
    (["--steps", "6"], "--steps: steps must be a multiple of 4"),
    (["--width", "72"], "--width/--height: width must be a multiple of 16; the nearest valid value is 80"),
    (["--height", "10"], "height must be in [16, 4096]"),
    (["--seed", "-1"], "seed must be in [0, 18446744073709551615]"),
    (["--cache", "medium"], "--cache must be one of slow, fast, default, off, got 'medium'"),
    (["--guidance", "40"], "guidance must be a number in [0, 30]"),
    (["--guidance", "5"], "the built-in models are distilled (one pass): drop --guidance"),
    (["--cfg-parallel", "2"], "--cfg-parallel 2 needs a multiple of 2 processes, this run has 1: torchrun "
     "--nproc-per-node 2 -m magi1"),
    (["--cfg-parallel", "4"], "invalid choice"),
    (["--vae", "{tmp}/vae.safetensors"], "the built-in models carry their own: drop --vae"),
    (["--special-tokens", "x.npz"], "the built-in models carry their own: drop --special-tokens"),
    (["--model", "huge"], "'huge' is neither a built-in model (tiny, bench) nor an existing checkpoint"),
    (["--model", "{tmp}/model.pt"], "is a pickle-based file; only .safetensors checkpoints are loaded"),
    (["--model", "{tmp}/ckpt.safetensors", "--prompt", "a ball"], "encode the prompt in ComfyUI (MAGI-1 Text "
     "Encode -> MAGI-1 Save Caption States) and give --caption-states FILE"),
    (["--model", "{tmp}/ckpt.safetensors", "--caption-states", "{tmp}/states.safetensors"], "needs its VAE: add --vae"),
    (["--model", "{tmp}/ckpt.safetensors", "--caption-states", "{tmp}/states.safetensors", "--vae", "{tmp}/none"],
     "--vae: no file at"),
    (["--model", "{tmp}/ckpt.safetensors", "--caption-states", "{tmp}/states.safetensors", "--latent-out",
      "{tmp}/l.safetensors"], "download special_tokens.npz from https://github.com/SandAI-org"),
    (["--prompt", "a", "--caption-states", "{tmp}/states.safetensors"], "give --prompt or --caption-states, not both"),
    (["--prompt", "1: a red ball"], "--prompt: prompt schedule: line '1: a red ball' starts at chunk 1"),
    (["--caption-states", "{tmp}/none.safetensors"], "--caption-states: caption states: no file at"),
    (["--caption-states", "{tmp}/junk.safetensors"], "junk.safetensors is not a caption-states file"),
    (["--out", "{tmp}/video.gif"], "--out must end in .mp4, got"),
    (["--latent-out", "{tmp}/latent.pt"], "try --latent-out latent.safetensors"),
    (["--out", "{tmp}/no/such/video.mp4"], "does not exist: create it (mkdir -p"),
    (["--out", "{tmp}"], "is a folder: give a file name"),
    (["--device", "meta"], "this program runs on cpu or cuda"),
    (["--device", "nonsense"], "is not a device: give cpu, cuda or cuda:N"),
    (["--device", "cuda"], "this PyTorch sees no CUDA GPU: give --device cpu"),
    (["--dtype", "float16"], "invalid choice"),
    (["--unknown"], "unrecognized arguments"),
])
def test_bad_options_are_one_line_naming_the_fix(argv, fix, files, capsys, no_loading, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on any machine
    status, err = refusal([a.replace("{tmp}", str(files)) for a in argv], capsys)
    assert status == 2
    assert len(err) == 1 and err[0].startswith("python -m magi1: error: ") and fix in err[0], err
    assert not no_loading, "loading started before the options were checked"


def test_process_count_must_fit_cfg_parallel(files, capsys, no_loading, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    status, err = refusal(["--model", files / "ckpt.safetensors", "--cfg-parallel", "2"], capsys)
    assert status == 2 and err == ["python -m magi1: error: --cfg-parallel 2 needs a multiple of 2 processes, this "
                                   "run has 3: torchrun --nproc-per-node 2 -m magi1 ... (or drop --cfg-parallel)"]
    assert refusal(["--frames", "1"], capsys) == (2, ["python -m magi1: error: argument --frames: frames must be in "
                                                      "[4, 4096], got 1 (python -m magi1 --help lists the options)"])
    monkeypatch.setenv("RANK", "1")  # the other processes stop quietly: one line in all
    assert refusal(["--frames", "1"], capsys) == (2, [])
    assert refusal(["--steps", "6"], capsys) == (2, [])


def test_good_options_reach_loading_with_the_defaults(no_loading, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Loaded):
        cli.main([])
    (run, parallel), _ = no_loading[0]
    assert parallel is None and run.builtin is builtin.TINY and run.prompt is None and run.caption_states is None
    r = run.request
    assert (r.frames, r.width, r.height, r.steps, r.seed) == (48, 64, 64, builtin.TINY.steps, 0)
    assert r.policy == CachePolicy.preset("slow") and r.guidance == Guidance() and run.text_scale is None
    assert run.cfg == 1 and not r.kv_offload and r.token_block is None
    assert run.out == cli.DEFAULT_OUT and run.latent_out is None and run.device == torch.device("cpu")
    assert run.dtype is None


def test_options_are_passed_on(no_loading, files):
    latent = files / "l.safetensors"
    (files / "special_tokens.npz").write_bytes(b"")  # found beside the checkpoint (read only when loading)
    with pytest.raises(Loaded):
        cli.main(["--model", str(files / "ckpt.safetensors"), "--caption-states", str(files / "states.safetensors"),
                  "--frames", "25", "--width", "96", "--height", "48", "--cache", "fast", "--guidance", "6",
                  "--latent-out", str(latent), "--dtype", "bfloat16", "--device", "cpu", "--seed", str(2**64 - 1)])
    (run, _), _ = no_loading[0]
    assert run.checkpoint == str(files / "ckpt.safetensors") and run.special_tokens == str(files / "special_tokens.npz")
    r = run.request
    assert (r.frames, r.frames_to_generate) == (25, 28)  # whole latent frames, as MAGI-1 Sampler rounds
    assert (r.width, r.height, r.steps) == (96, 48, cli.CHECKPOINT_STEPS)
    assert r.policy == CachePolicy.preset("fast") and run.text_scale == 6.0 and r.seed == 2**64 - 1
    assert r.guidance == Guidance().with_text_scale(6.0)
    assert run.out is None and run.latent_out == str(latent) and run.dtype == torch.bfloat16
    assert [first for first, _, _ in run.caption_states.positive] == [0]


def test_a_library_refusal_is_one_line(monkeypatch, capsys, tmp_path):
    def refuse(run, parallel):
        raise ValueError("the caption states are 4096 wide but this model reads 64-wide ones")

    monkeypatch.setattr(cli, "sample", refuse)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status, err = refusal(["--out", tmp_path / "x.mp4"], capsys)
    assert (status, err) == (1, ["python -m magi1: error: the caption states are 4096 wide but this model reads "
                                 "64-wide ones"])


def test_caption_states_of_another_width_are_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    states = tmp_path / "t5.safetensors"
    save_caption_states(states, [(0, torch.zeros(3, 4096), torch.ones(3, dtype=torch.bool))])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status, err = refusal(["--caption-states", states, *FAST, "--out", tmp_path / "x.mp4"], capsys)
    assert status == 1 and len(err) == 1
    assert f"the caption states in {states} are 4096 wide but this model reads 64-wide ones" in err[0]
    assert not (tmp_path / "x.mp4").exists()


def test_the_program_is_not_part_of_the_imported_package():
    """ComfyUI imports the pack's magi1; the program (which imports cache_core) must not come with it."""
    script = ("import sys, magi1, magi1.builtin, magi1.prompts.caption_states, magi1.video.mp4\n"
              "assert not {'magi1.__main__', 'programs.cli', 'cache_core'} & set(sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
