"""The built-in tiny demo model: its files load through the ordinary loaders, it generates end to end on
the CPU (with and without the cache), its text encoder and scene grammar agree, and its training program
(``train/tiny.py``, outside the pack) runs and is reproducible."""

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

import magi1
import run_request
import cache_core
from cache_core import CachePolicy
from magi1 import builtin
from train import scenes
from train import tiny as trainer
from train.scenes import grammar_vocabulary

ROOT = Path(__file__).resolve().parents[1]
FILES = (builtin.DIT_FILE, builtin.VAE_FILE, builtin.TEXT_ENCODER_FILE, builtin.SPECIAL_TOKENS_FILE)


def test_shipped_files_are_small_safetensors_and_npz():
    assert sum(os.path.getsize(f) for f in FILES) <= 25 * 2**20
    assert all(f.endswith((".safetensors", ".npz")) for f in FILES)


def test_loads_with_the_official_loaders():
    dit = builtin.load_tiny_dit()
    assert dit.distill and dit.config == trainer.DIT_CONFIG
    assert magi1.load_dit(builtin.DIT_FILE).distill  # the checkpoint says so itself
    vae = builtin.load_tiny_vae()
    assert vae.config == trainer.VAE_CONFIG and (vae.spatial_factor, vae.temporal_factor) == (8, 4)
    tokens = builtin.tiny_special_tokens()
    assert tokens.hq.shape == (dit.config.caption_channels,)


@pytest.mark.parametrize("model", [builtin.TINY, builtin.BENCHMARK_MODEL], ids=lambda m: m.name)
def test_built_in_models_are_named_as_the_loaders_list_them(model, tmp_path):
    """Loaded by their own method, by file through magi1.load_dit (as MAGI-1 DiT Loader does, distill chosen
    or not) or through a link, a built-in model reports its title, not "custom_distill (as chosen)"."""
    from magi1.weights.loader import model_description

    link = tmp_path / "linked.safetensors"
    link.symlink_to(model.dit_file)
    for dit in (model.load_dit(), magi1.load_dit(model.dit_file, distill=True), magi1.load_dit(model.dit_file),
                magi1.load_dit(link), magi1.load_dit(model.dit_file, weights="fp8_e4m3fn")):
        assert (dit.variant, dit.variant_reason, dit.builtin) == (model.title, "distilled", model.name)
        assert model_description(dit) == f"{model.title}, distilled"
    as_base = magi1.load_dit(model.dit_file, distill=False)
    assert not as_base.distill and model_description(as_base) == f"{model.title}, run as a base model (as chosen)"
    assert builtin.builtin_at(model.dit_file) is model and builtin.builtin_at(link) is model
    assert builtin.builtin_at(model.text_encoder_file) is None and builtin.builtin_at(tmp_path / "absent") is None


def test_a_copy_of_a_built_in_file_is_a_checkpoint_like_any_other(tmp_path):
    """Recognised by the file, not by its contents: a copy elsewhere is reported as the checkpoint it is."""
    from magi1.weights.loader import model_description

    copy = tmp_path / "my_model.safetensors"
    copy.write_bytes(Path(builtin.DIT_FILE).read_bytes())
    dit = magi1.load_dit(copy)
    assert dit.builtin is None and dit.variant == "custom_distill"
    assert model_description(dit) == "custom_distill (its metadata says magi1_distill)"
    assert model_description(magi1.load_dit(copy, distill=True)) == "custom_distill (as chosen)"
    assert builtin.builtin_at(copy) is None


def test_text_encoder_reads_the_caption_grammar():
    encoder = builtin.load_tiny_text_encoder()
    ids, mask = encoder.tokenize("A red ball, moving LEFT over a checkerboard!")
    words = [encoder.config.vocabulary[i] for i in ids[mask]]
    assert words == ["a", "red", "ball", "moving", "left", "over", "a", "checkerboard", "<end>"]
    unknown, _ = encoder.tokenize("a zebra")
    assert encoder.config.vocabulary[int(unknown[1])] == "<unk>"
    states, mask = encoder.encode("a red ball")
    again, _ = encoder.encode("a red ball")
    assert torch.equal(states, again) and states.shape == (encoder.config.max_tokens, 64) and int(mask.sum()) == 4
    assert not torch.equal(states, encoder.encode("a blue ball")[0])


def test_scene_captions_use_only_known_words_and_render_deterministically():
    # the shipped encoder reads the vocabulary the trainer builds from the grammar
    assert builtin.load_tiny_text_encoder().config.vocabulary == tuple(grammar_vocabulary())
    vocabulary = set(grammar_vocabulary())
    videos, captions = scenes.scene_batch(5, 24, 8, 32)
    assert videos.shape == (24, 3, 8, 32, 32) and videos.min() >= -1 and videos.max() <= 1
    for caption in captions:
        assert set(re.findall("[a-z]+", caption)) <= vocabulary, caption
    again, same = scenes.scene_batch(5, 24, 8, 32)
    assert torch.equal(videos, again) and captions == same
    moving = scenes.Scene("ball", "red", "moving right", "gray wall", None, 0.2, 0.5, 0.1, 0.3, 0)
    video = scenes.render(moving, 24, 32)
    redness = (video[0] - video[1]).clamp(min=0).sum(dim=1)  # (frames, width): where the red ball is
    columns = torch.arange(32, dtype=torch.float32)
    centre = (redness * columns).sum(-1) / redness.sum(-1)
    assert centre[-1] > centre[0] + 5  # it moves right


def generate(prompt, policy=None, frames=24, steps=builtin.STEPS):
    dit, encoder = builtin.load_tiny_dit(), builtin.load_tiny_text_encoder()
    states, mask = encoder.encode(prompt)
    chunks = magi1.VideoLayout.plan(frames, builtin.SIZE, builtin.SIZE).chunk_num
    caption, caption_mask = magi1.chunk_captions(states, mask, chunks, builtin.tiny_special_tokens())
    return run_request.generate(dit, caption, caption_mask, frames=frames, height=builtin.SIZE, width=builtin.SIZE, steps=steps,
                          seed=0, policy=policy)


def test_generates_and_decodes_a_video_end_to_end():
    result = generate("a yellow square bouncing over a striped wall", frames=48)
    assert result.latent.shape == (16, 12, 8, 8) and torch.isfinite(result.latent).all()
    video = builtin.load_tiny_vae().decode(result.latent)
    assert video.shape == (3, 48, 64, 64) and torch.isfinite(video).all()
    cached = generate("a yellow square bouncing over a striped wall", CachePolicy(tau=0.1, warmup_steps=2, chunk_wise_steps=2, final_full_steps=1,
                                                                             max_reuse=4),
                      frames=48)
    assert cached.stats.computed_fraction < 1.0 and cached.latent.shape == result.latent.shape


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    """A run cut short after 2 of 5 steps and started again from its resume checkpoint ends with the
    weights, EMA and loss of a run that never stopped; a checkpoint of another run is refused."""
    small = magi1.VAEConfig(**{**trainer.VAE_CONFIG.__dict__, "video_size": 32})
    vae = magi1.random_vae(small, seed=0)
    recipe = dataclasses.replace(trainer.TINY, size=32, vae_config=small)
    logs = []
    common = dict(seed=1, steps=5, batch=2, scenes=3, resume_every=3600.0, recipe=recipe)
    straight, straight_captions = trainer.train_dit(vae, resume=str(tmp_path / "straight"), log=lambda line: None,
                                                    **common)
    assert trainer.train_dit(vae, resume=str(tmp_path / "cut"), until=2, log=lambda line: None, **common) is None
    resumed, resumed_captions = trainer.train_dit(vae, resume=str(tmp_path / "cut"), log=logs.append, **common)
    with pytest.raises(ValueError, match="belongs to another run"):
        trainer.train_dit(vae, resume=str(tmp_path / "cut"), log=lambda line: None, **{**common, "seed": 2})
    assert any("resumed at step 2" in line for line in logs)
    assert any("encoded scenes read from" in line for line in logs)  # the dataset is not encoded again
    for a, b in ((straight, resumed), (straight_captions, resumed_captions)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_script_runs_a_few_steps(tmp_path):
    small = magi1.VAEConfig(**{**trainer.VAE_CONFIG.__dict__, "video_size": 32})
    vae = magi1.random_vae(small, seed=0)
    recipe = dataclasses.replace(trainer.TINY, size=32, vae_config=small)
    common = dict(steps=4, batch=2, scenes=3, log=lambda line: None, recipe=recipe)
    model, captions = trainer.train_dit(vae, seed=1, **common)
    again, _ = trainer.train_dit(vae, seed=1, **common)
    other, _ = trainer.train_dit(vae, seed=2, **common)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # reproducible from the seed, and the seed matters
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.final_linear.linear.weight, other.final_linear.linear.weight)
    trainer.save_dit(tmp_path, model, captions)
    assert magi1.load_dit(tmp_path / "dit.safetensors").distill
    # the same weights always give the same bytes (safetensors alone orders the metadata at random)
    for attempt in range(3):
        trainer.save_dit(tmp_path / f"again{attempt}", model, captions)
        for name in ("dit.safetensors", "text_encoder.safetensors", "special_tokens.npz"):
            assert (tmp_path / f"again{attempt}" / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_demo_writes_an_mp4_and_prints_the_cache_report(tmp_path, capsys):
    import importlib.util

    import av

    spec = importlib.util.spec_from_file_location("magi1_demo", ROOT / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo.mp4"
    demo.main(["a purple ball moving left over a checkerboard", "--out", str(out), "--frames", "24"])
    printed = capsys.readouterr().out
    assert "MAGI-1 cache hybrid: computed" in printed and "wrote" in printed  # the presets' mode
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (frames, stream.width, stream.height) == (24, builtin.SIZE, builtin.SIZE)


def test_policy_benchmark_quick_run_writes_table_and_plot(tmp_path, capsys):
    from bench.quality import policies

    rows = policies.main(["--quick", "--frames", "24", "--steps", "8", "--out", str(tmp_path)])
    families = {r.family for r in rows}
    assert {"off", "teacache", "flowcache", "motion / latent", "motion / denoised"} <= families
    assert {f"motion_detail {c} / {p}" for c in ("max", "product", "blend") for p in ("latent", "denoised")} <= families
    off = rows[0]
    assert off.family == "off" and off.computed == 1.0 and off.flop_ratio == 1.0 and off.psnr == 99.0
    assert all(0.0 < r.computed <= 1.0 and r.flop_ratio >= 1.0 and r.speedup > 0 for r in rows)
    # more reuse never computes more: the larger tau of each family computes at most what the smaller does
    for family in families - {"off"}:
        sweep = sorted((r.tau, r.computed) for r in rows if r.family == family)
        assert all(b[1] <= a[1] for a, b in zip(sweep, sweep[1:])), (family, sweep)
    written = (tmp_path / "policies_tiny.md").read_text()
    assert written.count("\n| ") >= len(rows) and "| motion_detail max / latent |" in written
    assert "Best MotionDetailCache variant at equal FLOPs: **motion_detail " in written and "--calibrate" in written
    assert (tmp_path / "policies_tiny.png").stat().st_size > 1000
    assert "| off | 0 | 100% | 1.00x | 1.00x |" in capsys.readouterr().out


def test_preset_suggestion_rule():
    from bench.quality.policies import Row, suggest_presets

    def row(family, tau, ratio, psnr, speedup):
        return Row(family, tau, None, computed=1 / ratio, flop_ratio=ratio, speedup=speedup, psnr=psnr)

    rows = [row("off", 0, 1.0, 99.0, 1.0), row("flowcache", 0.1, 1.3, 40.0, 1.25),
            row("md", 0.05, 1.1, 45.0, 1.08), row("md", 0.1, 1.4, 36.5, 1.35), row("md", 0.2, 1.8, 34.0, 1.9),
            row("md", 0.4, 3.0, 30.0, 2.6), row("md", 0.8, 4.0, 25.0, 3.2)]
    slow, fast = suggest_presets(rows, "md", quality_db=35.0)
    # at >= 35 dB the largest FLOP saving is tau 0.1 (1.4x), even though tau 0.2 has the larger wall speed-up
    assert slow.tau == 0.1
    # slow saves 1 - 1/1.4 = 29% of FLOPs; twice that is 57%: tau 0.2 saves 44%, tau 0.4 67%, tau 0.8 75%
    assert fast.tau == 0.4
    assert suggest_presets(rows, "md", quality_db=50.0) == (None, None)
    assert suggest_presets(rows, "missing") == (None, None)


def test_calibration_sweep_runs_the_default_policy_over_the_fine_grid(tmp_path):
    from bench.quality import policies

    rows = policies.main(["--calibrate", "--quick", "--frames", "24", "--steps", "8", "--out", str(tmp_path)])
    assert [r.tau for r in rows[1:]] == list(policies.CALIBRATION_TAUS)
    assert all(r.policy == CachePolicy.preset_family(r.tau) for r in rows[1:])
    written = (tmp_path / "calibration_tiny.md").read_text()
    assert "- slow:" in written and "- fast:" in written and not (tmp_path / "policies_tiny.md").exists()


def test_presets_are_the_committed_calibration():
    """The presets are what bench/results/calibration_bench.md (the benchmark model's calibration set, python -m
    bench.quality.policies --model bench --prompts bench/setups/calibration.json --calibrate) suggests, for the
    policy that run swept; the bench spec of that policy is the presets' policy at every τ."""
    from bench.quality import policies

    text = (ROOT / "bench" / "results" / "calibration_bench.md").read_text()
    suggested = {name: float(tau) for name, tau in re.findall(r"^- (slow|fast): τ ([0-9.]+) ", text, re.M)}
    assert suggested == {"slow": CachePolicy.slow().tau, "fast": CachePolicy.fast().tau}
    assert policies.COMMON == cache_core.PRESET_SCHEDULE
    family = policies.family_policy(policies.PRESET_SPEC, 0.1)[0]
    assert f"**{family}**" in text and "x 2 seeds (100, 101)" in text  # the calibration set's seeds
    for tau in (0.03, 0.1, 0.25):
        assert policies.family_policy(policies.PRESET_SPEC, tau)[1] == CachePolicy.preset_family(tau)
    for preset in (CachePolicy.slow(), CachePolicy.fast()):
        assert preset == CachePolicy.preset_family(preset.tau)
        assert preset.mode == cache_core.policy.PRESET_MODE and preset.chunk_tau == pytest.approx(1.5 * preset.tau)