"""magi1.planning.memory_plan: weight bytes against real models, KV bytes against real generations, the released
sizes, the activation model against a measured peak, and the savings advice."""

import dataclasses
import json
import os
import re
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import magi1
from magi1.weights.fp8 import nbytes_by_dtype
from cache_core import CachePolicy
from magi1 import KVCache, ModelConfig, VAEConfig, VideoLayout, VideoRequest, build_dit
from run_request import generate, memory_plan
from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS
from magi1.planning.memory_plan import (FP8_LINEARS, OFFICIAL_FP8, OFFICIAL_SMOOTHED, fits,
                                        replan, vae_weight_bytes, weight_bytes, window_calls)
from pipeline_fixtures import FIXTURES, load, request

CONFIG_4_5B = ModelConfig(**OFFICIAL_MODEL_CONFIGS["4.5B"])
CONFIG_24B = ModelConfig(**OFFICIAL_MODEL_CONFIGS["24B"])


def tiny_configs():
    configs = {}
    for name in ("base", "base_i2v", "distill24", "distill45"):
        with open(os.path.join(FIXTURES, f"dit_tiny_{name}.json")) as f:
            configs[name] = ModelConfig.from_dict(json.load(f)["model_config"])
    base = configs["base"]
    configs["gated"] = dataclasses.replace(base, gated_linear_unit=True)
    configs["half_channel"] = dataclasses.replace(base, half_channel_vae=True, in_channels=8, out_channels=8)
    configs["ratios"] = dataclasses.replace(base, cond_gating_ratio=0.5, xattn_cond_hidden_ratio=0.5,
                                            cond_hidden_ratio=0.5)
    return configs


bytes_by_dtype = nbytes_by_dtype  # the real tensors' bytes (the DiT holds no buffers)


# ------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", sorted(tiny_configs()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_bytes_match_the_built_model(name, dtype):
    config = tiny_configs()[name]
    model = build_dit(config, device="meta", dtype=dtype)
    weight_dtype = str(dtype).replace("torch.", "")
    assert weight_bytes(config, weight_dtype, dtype) == bytes_by_dtype(model)
    plan = memory_plan(config, 16, 32, 32, weight_dtype=weight_dtype, compute_dtype=dtype, chunk_width=2)
    assert plan.weights == bytes_by_dtype(model) and plan.weights_on_gpu == sum(plan.weights.values())


def test_random_dit_has_the_planned_bytes():
    config = tiny_configs()["distill24"]
    assert weight_bytes(config, "bfloat16") == bytes_by_dtype(magi1.random_dit(config, dtype=torch.bfloat16))


def expected_fp8(model, kind):
    """The fp8 rules applied to the real bf16 model's parameter names (independent of memory_plan's own
    tensor list); ``test_fp8_weight_bytes_match_the_built_fp8_model`` checks the real fp8 models too."""
    layers = model.config.num_layers
    out = {}

    def add(dtype, nbytes):
        out[dtype] = out.get(dtype, 0) + nbytes

    for name, p in model.named_parameters():
        parts = name.split(".")
        linear = ".".join(parts[3:-1]) if parts[:2] == ["videodit_blocks", "layers"] else None
        index = int(parts[2]) if linear is not None else -1
        is_weight = parts[-1] == "weight"
        if kind == "fp8_official" and is_weight and 0 < index < layers - 1 and linear in OFFICIAL_FP8:
            add("float8_e4m3fn", p.numel())
            # weight_scale [1], input_scale [in] (or [1] beside smooth_scale [1, in])
            add("float32", 4 * (1 + p.shape[1] + (1 if linear in OFFICIAL_SMOOTHED else 0)))
        elif kind != "fp8_official" and is_weight and linear in FP8_LINEARS:
            add("float8_e4m3fn", p.numel())
            if kind == "fp8_e4m3fn_scaled":
                add("float32", 4)
        else:
            add(str(p.dtype).replace("torch.", ""), p.numel() * p.element_size())
    return out


@pytest.mark.parametrize("kind", ["fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official"])
@pytest.mark.parametrize("name", ["distill24", "gated", "distill45"])
def test_fp8_weight_bytes_follow_the_rules(kind, name):
    config = dataclasses.replace(tiny_configs()[name], num_layers=4)  # fp8_official: layers 1, 2 quantized
    model = build_dit(config, device="meta", dtype=torch.bfloat16)
    assert weight_bytes(config, kind, torch.bfloat16) == expected_fp8(model, kind)


@pytest.mark.parametrize("kind", ["fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_official"])
@pytest.mark.parametrize("name", ["distill24", "gated", "distill45"])
def test_fp8_weight_bytes_match_the_built_fp8_model(kind, name):
    config = dataclasses.replace(tiny_configs()[name], num_layers=4)
    model = build_dit(config, device="meta", dtype=torch.bfloat16, weights=kind)
    assert weight_bytes(config, kind, torch.bfloat16) == bytes_by_dtype(model)


def test_official_sizes():
    weights = weight_bytes(CONFIG_4_5B, "bfloat16")
    assert 8.8e9 < sum(weights.values()) < 9.0e9  # 4.44 B bf16 parameters + float32 embedders
    layers = build_dit(CONFIG_4_5B, device="meta", dtype=torch.bfloat16).videodit_blocks.layers
    assert weights["bfloat16"] == 2 * sum(p.numel() for p in layers.parameters() if p.dtype == torch.bfloat16)
    plan = memory_plan(CONFIG_24B, 96, 720, 1280)
    assert plan.kv_caches["main"] == 4 * 21600 * 48 * 2 * 8 * 128 * 2  # 17.0 GB: 4 chunks of 21600 tokens
    assert 21.0e9 < memory_plan(CONFIG_24B, 96, 720, 1280, reuse="chunk").kv_caches["main"] < 21.5e9  # + 1 block
    fp8 = weight_bytes(CONFIG_24B, "fp8_e4m3fn")
    assert 23.5e9 < sum(fp8.values()) < 24.5e9
    assert vae_weight_bytes(VAEConfig(), torch.bfloat16) == sum(
        p.numel() * 2 for p in magi1.build_vae(VAEConfig(), device="meta", dtype=torch.bfloat16).parameters())


def test_streaming_keeps_k_plus_two_layers():
    plan = memory_plan(CONFIG_24B, 96, 720, 1280, weight_dtype="fp8_e4m3fn", resident_layers=4)
    total = sum(plan.weights.values())
    layer = (total - plan.weights["float32"] + 0.0) / 48  # fp8 layers hold no float32 except their norms
    assert plan.weights_on_gpu + plan.weights_host == total
    assert abs(plan.weights_on_gpu - 6 * layer) < 0.2e9  # 4 resident, one running, one prefetched
    assert memory_plan(CONFIG_24B, 96, 720, 1280, resident_layers=48).weights_host == 0


# ------------------------------------------------------------------------------------------- KV caches
@pytest.fixture(scope="module")
def fixture_runs():
    return {name: load(name) for name in ("base", "base_i2v", "distill24", "distill45")}


def policy(mode):
    return CachePolicy(mode=mode, tau=0.05, warmup_steps=1, chunk_wise_steps=2, final_full_steps=1)


def recorded_run(monkeypatch, model, args, mode, kv_offload):
    """Generate and record every KV cache's bytes (in creation order) and the most rows one read copied."""
    made, reads = [], [0]
    init, read = KVCache.__init__, KVCache.read

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    def recording_read(self, layer, start, end):
        reads[0] = max(reads[0], end - start)
        return read(self, layer, start, end)

    monkeypatch.setattr(KVCache, "__init__", recording_init)
    monkeypatch.setattr(KVCache, "read", recording_read)
    generate(model, **args, policy=None if mode == "off" else policy(mode), kv_offload=kv_offload)
    monkeypatch.undo()
    return [c.nbytes for c in made], reads[0]


@pytest.mark.parametrize("name", ["base", "base_i2v", "distill24", "distill45"])
@pytest.mark.parametrize("mode,cache", [("off", "off"), ("flowcache", "chunk"), ("motion_detail", "token")])
def test_kv_bytes_match_a_real_generation(monkeypatch, fixture_runs, name, mode, cache):
    description, tensors, model = fixture_runs[name]
    args = {**request(description, tensors), "steps": 4}  # fewer steps, the same caches and calls
    offload = cache == "chunk"  # one offloaded run per fixture: the rows one layer copies to the GPU
    made, rows_read = recorded_run(monkeypatch, model, args, mode, offload)
    prefix = args["prefix"]
    plan = memory_plan(model.config, args["frames"], args["height"], args["width"], compute_dtype=torch.float32,
                       weight_dtype="float32", passes=1 if model.distill else 3, chunk_width=args["chunk_width"],
                       window_size=args["window_size"], prefix_frames=0 if prefix is None else prefix.shape[1],
                       reuse=cache, kv_offload=offload)
    if model.distill:
        assert made == [plan.kv_caches["main"]]
    else:
        expected = [plan.kv_caches["cond_pre"]] + ([plan.kv_caches["cond"]] if "cond" in plan.kv_caches else [])
        uncond = plan.kv_caches.get("uncond", 0)
        assert made[:len(expected)] == expected and sum(made[len(expected):]) == uncond
        assert len(made) == len(expected) + (args["window_size"] if uncond else 0)
    assert sum(plan.kv_caches.values()) == sum(made)
    row = 2 * model.config.num_query_groups * model.config.kv_channels * 4
    if offload:
        assert plan.kv_host == sum(made) and plan.kv_on_gpu == rows_read * row
    else:
        assert plan.kv_host == 0 and plan.kv_on_gpu == sum(made)


# ----------------------------------------------------------------------------------------- activations
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that tensors made by torch ops keep alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.now, self.peak = {}, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                self._track(t)
        return out

    def _track(self, t):
        key = t.untyped_storage().data_ptr()
        if key == 0:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.sizes.pop(key)
            del self.refs[key]


@pytest.mark.parametrize("name,mode,cache,dtype", [("distill45", "off", "off", torch.float32),
                                                   ("base", "off", "off", torch.float32),
                                                   ("distill24", "motion_detail", "token", torch.float32),
                                                   ("distill45", "hybrid", "token", torch.bfloat16)])
def test_measured_peak_stays_under_the_plan(fixture_runs, name, mode, cache, dtype):
    """Everything a real generation allocates (KV caches, policy state, activations, latents, captions)
    peaks below the plan's DiT phase without the weights, and not far below."""
    description, tensors, model = fixture_runs[name]
    if dtype != torch.float32:
        model = magi1.random_dit(model.config, dtype=dtype)
        model.distill = fixture_runs[name][2].distill
    args = request(description, tensors)
    args.update(frames=4 * 2 * 5, height=64, width=96, noise=None, prefix=None, steps=4)  # 5 chunks of 96 tokens
    args.update(caption=args["caption"][:1], caption_mask=args["caption_mask"][:1])
    plan = memory_plan(model.config, args["frames"], args["height"], args["width"], compute_dtype=dtype,
                       weight_dtype=str(dtype)[6:], passes=1 if model.distill else 3, chunk_width=args["chunk_width"],
                       window_size=args["window_size"], reuse=cache, decode=False)
    with LiveBytes() as live:
        generate(model, **args, policy=None if mode == "off" else policy(mode))
    planned = plan.dit_phase - plan.weights_on_gpu
    print(f"{name} {mode} {cache} {dtype}: measured {live.peak} of planned {planned} ({live.peak / planned:.2f})")
    assert 0.6 * planned < live.peak <= planned, (live.peak, planned)


def test_window_calls_follow_the_schedule():
    layout = VideoLayout.plan(96, 720, 720)
    assert window_calls(layout, passes=1) == window_calls(layout, passes=1, window_size=4)
    calls = window_calls(layout, passes=1, reuse="chunk")
    assert calls.query == 4 + 1  # the most chunks one call holds: 4 (refresh + 3, or 4 noisy) + the copy
    long = VideoLayout.plan(240, 720, 720)
    assert window_calls(long, passes=1).query == 4 + 1 + 1 and window_calls(long, passes=3).query == 5


# ---------------------------------------------------------------------------------------------- advice
def test_savings_name_offload_and_fp8_with_their_bytes():
    plan = memory_plan(CONFIG_24B, 96, 720, 1280, reuse="chunk")
    budget = 48e9
    assert not fits(plan, budget) and not plan.fits(budget)
    advice = plan.savings(budget)
    assert [s.name for s in advice] == ["kv_offload", "token_block 4096", "weight_dtype fp8_e4m3fn_scaled"]
    assert [s.changes for s in advice] == [{"kv_offload": True}, {"token_block": 4096},
                                           {"weight_dtype": "fp8_e4m3fn_scaled"}]
    assert str(advice[0]) == f"kv_offload saves {advice[0].saved / 1e9:.2f} GB"
    offloaded = replan(plan, kv_offload=True)
    assert advice[0][1] == plan.total_gpu - offloaded.total_gpu > 15e9
    blocked = replan(offloaded, token_block=4096)  # no block size fits alone: the smallest is kept
    assert advice[1][1] == offloaded.total_gpu - blocked.total_gpu > 10e9 and not fits(blocked, budget)
    both = replan(blocked, weight_dtype="fp8_e4m3fn_scaled")
    assert advice[2][1] == blocked.total_gpu - both.total_gpu > 20e9
    assert fits(both, budget) and both.savings(budget) == []


def test_savings_reach_block_swap_and_fewer_frames():
    plan = memory_plan(CONFIG_24B, 96, 720, 1280)
    advice = plan.savings(24e9)
    names = [s.name for s in advice]
    assert names[:3] == ["kv_offload", "token_block 4096", "weight_dtype fp8_e4m3fn_scaled"]
    assert names[3].startswith("resident_layers")
    k = int(names[3].split()[1])
    fitted = replan(plan, kv_offload=True, token_block=4096, weight_dtype="fp8_e4m3fn_scaled", resident_layers=k)
    assert fits(fitted, 24e9) and not fits(replan(fitted, resident_layers=k + 1), 24e9)
    assert sum(s.saved for s in advice) == plan.total_gpu - fitted.total_gpu
    small = memory_plan(CONFIG_4_5B, 480, 720, 720, weight_dtype="fp8_e4m3fn", kv_offload=True, resident_layers=0,
                        token_block=4096)
    tight = small.savings(small.total_gpu - 1)
    assert tight and "fewer frames" in tight[-1].name


def test_lines_and_bad_arguments():
    text = "\n".join(memory_plan(CONFIG_4_5B, 96, 720, 720, reuse="token", kv_offload=True).lines())
    assert "KV cache main" in text and "total GPU" in text and " GB" in text
    with pytest.raises(ValueError, match="weight_dtype"):
        memory_plan(CONFIG_4_5B, 96, 720, 720, weight_dtype="int4")
    with pytest.raises(ValueError, match="multiple of 16"):
        memory_plan(CONFIG_4_5B, 96, 720, 721)
    with pytest.raises(ValueError, match="resident_layers"):
        memory_plan(CONFIG_4_5B, 96, 720, 720, resident_layers=-1)


def test_the_text_to_video_workflow_note_quotes_the_plan():
    """The numbers the shipped workflow's note gives are the plan's (they go stale otherwise)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "workflows" / "build_workflows.py").read_text()
    plan = memory_plan(CONFIG_4_5B, 96, 720, 720, reuse="token")
    fp8 = replan(plan, weight_dtype="fp8_e4m3fn_scaled")
    offload = replan(plan, kv_offload=True)
    assert re.search(r"plans (\d+\.\d) GB", text).group(1) == f"{plan.total_gpu / 1e9:.1f}"
    assert re.search(r"float8: saves (\d+\.\d) GB", text).group(1) == f"{(plan.total_gpu - fp8.total_gpu) / 1e9:.1f}"
    assert re.search(r"saves (\d+\.\d) GB, a little slower", text).group(1) == \
        f"{(plan.total_gpu - offload.total_gpu) / 1e9:.1f}"


# ----------------------------------------------------------------------------------------------- lines
def numbers(lines):
    return [re.findall(r"\d+\.\d\d", line) for line in lines]


def test_lines_word_the_memory_by_the_device_and_keep_the_numbers():
    """On the CPU the plan's lines speak of memory, never of a GPU; on a GPU (or none named, as before)
    of the GPU; the bytes are the same, and a replanned request keeps its device."""
    gpu = memory_plan(CONFIG_4_5B, 96, 720, 720, reuse="token", resident_layers=4)
    cuda = memory_plan(CONFIG_4_5B, 96, 720, 720, reuse="token", resident_layers=4, device=torch.device("cuda", 0))
    cpu = memory_plan(CONFIG_4_5B, 96, 720, 720, reuse="token", resident_layers=4, device="cpu")
    assert gpu == cuda == cpu and gpu.device is None and cpu.device == torch.device("cpu")
    assert numbers(gpu.lines()) == numbers(cuda.lines()) == numbers(cpu.lines())
    for plan in (gpu, cuda):
        text = "\n".join(plan.lines())
        assert "weights on GPU" in text and "KV on GPU" in text and "total GPU (peak)" in text
        assert "CPU" not in text and "in memory" not in text
    text = "\n".join(cpu.lines())
    assert "GPU" not in text, text
    assert cpu.lines()[0].endswith(", on the CPU")
    assert "weights in memory" in text and "KV in memory" in text and "total memory (peak)" in text
    assert re.search(r"KV cache main +\d+\.\d\d GB  CPU memory", text)
    assert "weights in host memory" in text  # the streamed layers, as on a GPU
    again = replan(cpu, kv_offload=True)
    assert again.device == torch.device("cpu") and "GPU" not in "\n".join(again.lines())
    assert replan(gpu, kv_offload=True).lines()[-1].lstrip().startswith("total GPU (peak)")


@pytest.mark.parametrize("frames, prefix_frames, made, chunks", [
    (28, 0, 48, 2),  # 7 latent frames: two whole chunks are made
    (48, 0, 48, 2),
    (4, 0, 24, 1),
    (44, 1, 48, 2),  # a start image: the video's first frame, then 10 latent frames
    (48, 1, 48, 2),  # 48 asked with a start image: 48 made (FRAMES_RULE)
    (52, 1, 72, 3),  # 1 + 12 latent frames: three chunks
    (48, 4, 56, 3),  # after a 4-latent-frame prefix video: what follows it, to the end of the third chunk
    (24, 6, 24, 2),  # a whole chunk of prefix, one chunk made
])
def test_lines_state_the_frames_the_run_makes(frames, prefix_frames, made, chunks):
    """The plan names the frames the run returns (whole chunks, after a prefix video), not the ``frames``
    argument it was given; ``test_frames_made_are_the_frames_generate_returns`` holds it to generate."""
    plan = memory_plan(tiny_configs()["distill24"], frames, 64, 64, chunk_width=6, prefix_frames=prefix_frames)
    assert plan.frames_made == made and plan.chunk_num == chunks
    head = plan.lines()[0]
    assert head.startswith(f"MAGI-1 memory plan: {made} frames 64x64, {chunks} chunks of "), head
    assert ("from a start image" in head) == (prefix_frames == 1)
    assert (f"after a prefix video of {prefix_frames} latent frames" in head) == (prefix_frames > 1)
    assert replan(plan, frames=frames + 24).frames_made == made + 24


@pytest.mark.parametrize("frames, prefix_frames", [(28, 0), (44, 1), (48, 1), (52, 1), (48, 4), (24, 6)])
def test_frames_made_are_the_frames_generate_returns(frames, prefix_frames):
    from magi1 import builtin

    dit = builtin.load_tiny_dit()
    chunks = VideoRequest(frames=frames, height=64, width=64, prefix_frames=prefix_frames).chunks
    caption = torch.randn(chunks, dit.config.caption_max_length, dit.config.caption_channels)
    mask = torch.ones(chunks, dit.config.caption_max_length, dtype=torch.bool)
    prefix = torch.randn(dit.config.latent_channels, prefix_frames, 8, 8) if prefix_frames else None
    result = generate(dit, caption, mask, frames=frames, height=64, width=64, steps=4, seed=0, prefix=prefix)
    plan = memory_plan(dit.config, frames, 64, 64, compute_dtype=torch.float32, weight_dtype="float32",
                       prefix_frames=prefix_frames)
    assert result.latent.shape[1] * 4 == plan.frames_made


@pytest.mark.parametrize("config, passes, size, options", [
    (CONFIG_4_5B, 1, (720, 720), dict(reuse="token")),
    (CONFIG_4_5B, 3, (720, 720), dict(reuse="token")),
    (CONFIG_24B, 1, (720, 1280), dict(weight_dtype="fp8_e4m3fn_scaled", kv_offload=True, resident_layers=2)),
    (CONFIG_24B, 3, (720, 1280), dict(reuse="chunk", kv_offload=True)),
])
def test_the_plan_is_flat_in_the_videos_length(config, passes, size, options):
    """Since 0.9 nothing on the GPU grows with the video: 100 s plan within 5% of 20 s, and no KV cache wider
    than the window's span (5 chunks, and the nearly-clean copy's block)."""
    plans = {frames: memory_plan(config, frames, *size, passes=passes, **options) for frames in (96, 480, 2400)}
    assert abs(plans[2400].total_gpu - plans[480].total_gpu) <= 0.05 * plans[480].total_gpu
    assert plans[2400].kv_caches == plans[480].kv_caches
    assert plans[2400].total_gpu <= 1.2 * plans[96].total_gpu
