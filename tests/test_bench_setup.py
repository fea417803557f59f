"""bench.quality.policies on either built-in model, with its prompts, seeds, policies and τ values taken from the
command line or a setup file; the benchmark model's held-out set is its default."""

import argparse
import json

import pytest

from bench.quality import policies
from cache_core import CachePolicy
from train.benchmark_model import heldout_prompts


def test_policies_are_written_as_mode_combine_proxy():
    assert policies.family_policy("teacache", 0.1) == ("teacache", CachePolicy(mode="teacache", tau=0.1,
                                                                               **policies.COMMON), None)
    family, policy, _ = policies.family_policy("motion/denoised", 0.2)
    assert family == "motion / denoised" and (policy.mode, policy.proxy, policy.tau) == ("motion", "denoised", 0.2)
    family, policy, _ = policies.family_policy("motion_detail/product/latent", 0.05)
    assert family == "motion_detail product / latent" and policy.weight_combine_mode == "product"
    default = CachePolicy()
    family, policy, _ = policies.family_policy("motion_detail", 0.05)
    assert family == f"motion_detail {default.weight_combine_mode} / latent" and policy.proxy == "latent"
    family, policy, _ = policies.family_policy("hybrid/blend/denoised", 0.05)
    assert family == "hybrid blend / denoised" and (policy.mode, policy.weight_combine_mode) == ("hybrid", "blend")
    for bad in ("teacache/latent", "motion/sideways", "motion_detail/max/latent/extra", "chunky"):
        with pytest.raises(ValueError, match="unknown policy"):
            policies.family_policy(bad, 0.1)
    # every default family parses, and their names are the table's
    names = [policies.family_policy(spec, 0.1)[0] for spec in policies.POLICIES]
    assert len(set(names)) == len(names) == 10


def test_policy_options_and_the_released_motioncache():
    family, policy, steps = policies.family_policy("hybrid/max/denoised+velocity_extrapolation=1+chunk=2", 0.05)
    assert family == "hybrid max / denoised +velocity_extrapolation=1 +chunk=2x" and steps is None
    assert (policy.velocity_extrapolation, policy.chunk_tau, policy.tau) == (1, 0.1, 0.05)
    _, policy, _ = policies.family_policy("motion/latent+max_reuse=none+final_full_steps=0", 0.05)
    assert policy.max_reuse is None and policy.final_full_steps == 0
    for bad, match in (("flowcache+speed=2", "unknown policy option"), ("flowcache+tau=2", "unknown policy option"),
                       ("flowcache+max_reuse=lots", "is not a number"),
                       ("motion+velocity_extrapolation=3", "velocity_extrapolation must be")):
        with pytest.raises(ValueError, match=match):
            policies.family_policy(bad, 0.1)
    family, policy, steps = policies.family_policy("released", 0.01)
    assert steps == 64 and family == "motioncache as released (64 steps)"
    assert policy == CachePolicy(mode="motion", tau=0.01, proxy="latent", warmup_steps=5, chunk_wise_steps=20,
                                 final_full_steps=0, max_reuse=None, rescale_reused_velocity=False)
    rows = policies.configurations([0.1, 0.2], ["flowcache", {"policy": "released", "taus": [0.01]}])
    assert [(r.family, r.tau, r.steps) for r in rows] == [
        ("off", 0.0, None), ("flowcache", 0.1, None), ("flowcache", 0.2, None), ("off (64 steps)", 0.0, 64),
        ("motioncache as released (64 steps)", 0.01, 64)]


def _setup(argv):
    namespace = argparse.Namespace(model="tiny", setup=None, prompts=None, seeds=None, policies=None, taus=None,
                                   frames=None, steps=None)
    for key, value in argv.items():
        setattr(namespace, key, value)
    return policies.setup(namespace)


def test_setup_comes_from_the_command_line_over_the_file_over_the_defaults(tmp_path):
    assert _setup({}) == (list(policies.PROMPTS), [0, 1], list(policies.POLICIES), list(policies.TAUS), 48, 16)
    prompts, seeds, *_ = _setup({"model": "bench"})
    assert prompts == list(heldout_prompts()) and seeds == [0, 1]
    file = tmp_path / "setup.json"
    file.write_text(json.dumps({"prompts": ["a red ball standing still over a brick wall"], "seeds": [3],
                                "policies": ["flowcache"], "taus": [0.3], "frames": 24}))
    assert _setup({"model": "bench", "setup": str(file)}) == (
        ["a red ball standing still over a brick wall"], [3], ["flowcache"], [0.3], 24, 16)
    assert _setup({"setup": str(file), "seeds": "4,5", "taus": "0.1,0.2", "steps": 8})[1:] == (
        [4, 5], ["flowcache"], [0.1, 0.2], 24, 8)
    lines = tmp_path / "prompts.txt"
    lines.write_text("one prompt\n\nanother prompt\n")
    assert _setup({"model": "bench", "prompts": str(lines)})[:2] == (["one prompt", "another prompt"], [0, 1])
    file.write_text(json.dumps({"prompt": ["typo"]}))
    with pytest.raises(SystemExit, match="unknown keys"):
        _setup({"setup": str(file)})


def test_the_benchmark_model_runs_the_policy_benchmark(tmp_path):
    rows = policies.main(["--model", "bench", "--quick", "--frames", "24", "--steps", "8", "--policies",
                          "flowcache,motion_detail/max/latent", "--out", str(tmp_path)])
    assert [r.family for r in rows] == ["off"] + ["flowcache"] * 2 + ["motion_detail max / latent"] * 2
    assert all(0.0 < r.computed <= 1.0 and r.flop_ratio >= 1.0 and list(r.psnr_by_seed) == [0] for r in rows)
    written = (tmp_path / "policies_bench_heldout.md").read_text()
    assert written.startswith("# Cache policies on the bench model") and "128x128" in written
    assert "| off | 0 | 100% | 1.00x | 1.00x | 1.00 | 99.0 | 0.0 |" in written
    with pytest.raises(SystemExit, match="unknown policy"):
        policies.main(["--quick", "--policies", "tea", "--out", str(tmp_path)])


def test_the_seed_spread_is_the_range_of_per_seed_means():
    assert policies.Row("x", 0.1, None, psnr_by_seed={0: 30.0, 1: 32.5, 2: 31.0}).psnr_spread == 2.5
    assert policies.Row("x", 0.1, None, psnr_by_seed={0: 30.0}).psnr_spread == 0.0
    assert policies.Row("x", 0.1, None, temporal_by_seed={0: 20.0, 1: 21.5}).temporal_spread == 1.5


def test_equal_cost_interpolates_per_seed_along_flops_or_wall_time():
    def row(tau, ratio, speedup, by_seed):
        return policies.Row("p", tau, CachePolicy(), flop_ratio=ratio, speedup=speedup,
                            psnr=sum(by_seed.values()) / len(by_seed), psnr_by_seed=by_seed)

    rows = [row(0.1, 1.2, 1.0, {0: 40.0, 1: 38.0}), row(0.2, 1.8, 1.6, {0: 34.0, 1: 30.0})]
    assert policies.psnr_at(rows, "p", 1.5) == pytest.approx(35.5)  # halfway: (39 + 32) / 2
    assert policies.spread_at(rows, "p", 1.5) == pytest.approx(3.0)  # 37 against 34
    assert policies.psnr_at(rows, "p", 1.3, axis="speedup") == pytest.approx(35.5)
    assert policies.psnr_at(rows, "p", 2.0) is None
    assert "| p | 38.4 (2.2) | 35.5 (3.0) | – |" in policies.equal_cost(rows)


def test_the_benchmark_model_loads_with_the_ordinary_loaders():
    """The built-in benchmark model: the MAGI-1 architecture through load_dit / load_vae, 64 tokens a
    frame at its size, its own text encoder for the benchmark captions, small files."""
    import os

    import magi1
    from magi1 import builtin
    from train import benchmark_model as trainer
    from train import bench_scenes

    model = builtin.BENCHMARK_MODEL
    dit = magi1.load_dit(model.dit_file)
    assert dit.distill and dit.config == trainer.BENCHMARK_MODEL.dit_config
    vae = magi1.load_vae(model.vae_file)
    layout = magi1.VideoLayout.plan(24, model.size, model.size, patch_size=dit.config.patch_size)
    tokens_per_frame = (model.size // vae.spatial_factor // dit.config.patch_size) ** 2
    assert tokens_per_frame >= 64 and layout.chunk_num == 1
    encoder = model.load_text_encoder()
    assert encoder.config.vocabulary == tuple(trainer.vocabulary())
    assert encoder.config.max_tokens == trainer.BENCHMARK_MODEL.text_tokens
    for caption in heldout_prompts():  # every held-out word is known, and the longest caption fits
        ids, mask = encoder.tokenize(caption)
        assert "<unk>" not in [encoder.config.vocabulary[i] for i in ids[mask]], caption
        assert int(mask.sum()) == len(caption.replace(",", " ").split()) + 1, caption
    assert model.special_tokens().hq.shape == (dit.config.caption_channels,)
    new_files = (model.dit_file, model.text_encoder_file, model.special_tokens_file)
    assert sum(os.path.getsize(f) for f in new_files) <= 12 * 2**20
    assert set(bench_scenes.caption_vocabulary()) <= set(encoder.config.vocabulary)


def test_the_calibration_set_never_touches_the_held_out_set():
    import os

    with open(os.path.join(policies.HERE, "setups", "calibration.json")) as f:
        calibration = json.load(f)
    with open(policies.HELDOUT_FILE) as f:
        heldout = json.load(f)
    assert len(calibration["prompts"]) >= 8 and len(set(calibration["prompts"])) == len(calibration["prompts"])
    assert not set(calibration["prompts"]) & set(heldout["prompts"])
    assert not set(calibration["seeds"]) & set(heldout["seeds"])
    prompts, seeds, *_ = _setup({"model": "bench", "setup": os.path.join(policies.HERE,
                                                                          "setups", "calibration.json")})
    assert (prompts, seeds) == (calibration["prompts"], calibration["seeds"])
