"""The nodes' own logic without ComfyUI (through the stand-ins of comfy_stubs), on the built-in tiny
model: MAGI-1 Encode Prefix (one of its two inputs, the frames it keeps, the size), the sampler's checks
of the prefix latent, and the special-token table that only MAGI-1 DiT Loader finds. tests/test_comfyui.py
runs the same nodes inside a real ComfyUI."""

import dataclasses
import logging
import re
import sys
import types

import numpy as np
import pytest
from run_request import memory_plan
import torch

from comfy_stubs import pack_namespace
from magi1 import Guidance, VAETiling, VideoRequest
from magi1 import builtin

TINY = "MAGI-1 tiny demo (built-in)"


@pytest.fixture(scope="module")
def pack():
    """The pack's node classes by id, and their modules by file name (``pack.modules["sampler"]``)."""
    with pack_namespace() as pack:
        yield pack


@pytest.fixture(scope="module")
def vae():
    return builtin.load_tiny_vae()


@pytest.fixture(scope="module")
def model(pack):
    return pack.MAGI1DiTLoader.execute(checkpoint=TINY, variant="auto", weight_dtype="auto", attention="auto").result[0]


def frames(n, height=64, width=64, seed=0):
    return torch.rand(n, height, width, 3, generator=torch.Generator().manual_seed(seed))


def encode(pack, vae, width=64, height=64, **images):
    return pack.MAGI1EncodePrefix.execute(vae=vae, width=width, height=height, **images).result[0]["samples"]


# ------------------------------------------------------------------------------------ MAGI-1 Encode Prefix
def test_encode_prefix_takes_exactly_one_of_its_two_inputs(pack, vae):
    node = pack.MAGI1EncodePrefix
    with pytest.raises(ValueError, match="connect start_image .* or prefix_video"):
        encode(pack, vae)
    with pytest.raises(ValueError, match="not both"):
        encode(pack, vae, start_image=frames(1), prefix_video=frames(4))
    # At queue time ComfyUI passes None for a connected input and leaves an unconnected one out.
    assert "connect start_image" in node.validate_inputs(vae=None)
    assert "not both" in node.validate_inputs(vae=None, start_image=None, prefix_video=None)
    assert node.validate_inputs(vae=None, start_image=None) is node.validate_inputs(prefix_video=None) is True


def test_encode_prefix_keeps_the_last_frames_the_vae_encodes(pack, vae, caplog):
    kept = {}
    for n in range(1, 18):
        video = frames(n, seed=n)
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            latent = encode(pack, vae, prefix_video=video)
        kept[n] = next(k for k in range(n, 0, -1) if vae.encodable_frames(k))
        expected = vae.encode(video[n - kept[n]:].movedim(-1, 0) * 2 - 1, VAETiling())
        assert latent.shape == (1, 16, expected.shape[1], 8, 8) and torch.equal(latent[0], expected), n
        warned = [r.getMessage() for r in caplog.records if "MAGI-1 Encode Prefix" in r.getMessage()]
        assert warned == ([f"MAGI-1 Encode Prefix: the prefix video has {n} frames; continuing from its last "
                           f"{kept[n]} (the VAE encodes 1, 4, 8, 12, 13, 16, ... frames)"] if kept[n] < n else []), n
    assert sorted(set(kept.values())) == [1, 4, 8, 12, 13, 16]  # the release's 12-frame tiles


def test_encode_prefix_start_image_is_one_frame_at_the_video_size(pack, vae):
    batch = frames(3)
    assert torch.equal(encode(pack, vae, start_image=batch), encode(pack, vae, prefix_video=batch[:1]))
    assert encode(pack, vae, start_image=frames(1, height=40, width=56)).shape == (1, 16, 1, 8, 8)  # stretched
    assert encode(pack, vae, width=96, height=32, start_image=batch).shape == (1, 16, 1, 4, 12)


def test_encode_prefix_refuses_a_wrong_vae_or_size(pack, vae):
    from magi1 import VAEConfig, random_vae

    other = random_vae(VAEConfig(embed_dim=64, depth=1, num_heads=4, patch_size=4, video_size=16), seed=1)
    with pytest.raises(ValueError, match="does not match the MAGI-1 DiT"):
        encode(pack, other, start_image=frames(1))
    with pytest.raises(ValueError, match="nearest valid value is 48"):
        encode(pack, vae, width=40, start_image=frames(1))


# ------------------------------------------------------------------------------------------ MAGI-1 Sampler
def sample(pack, model, **changes):
    positive = [[torch.randn(1, 5, 64), {"attention_mask": torch.ones(1, 5, dtype=torch.bool)}]]
    request = dict(model=model, positive=positive, width=64, height=64, frames=48, steps=4, seed=0, guidance=5.0)
    return pack.MAGI1Sampler.execute(**{**request, **changes})


def test_sampler_refuses_a_prefix_of_another_size_naming_both(pack, model):
    prefix = {"samples": torch.zeros(1, 16, 1, 4, 6)}  # encoded at 48 wide, 32 high
    with pytest.raises(ValueError) as error:
        sample(pack, model, prefix_latent=prefix)
    assert str(error.value).startswith("the prefix latent was encoded at 48x32 but the sampler makes 64x64: set "
                                       "MAGI-1 Encode Prefix's width/height to 64x64")
    with pytest.raises(ValueError, match=r"one MAGI-1 latent \[1, 16, frames, h, w\], got \[1, 4, 1, 8, 8\]"):
        sample(pack, model, prefix_latent={"samples": torch.zeros(1, 4, 1, 8, 8)})


def test_sampler_refuses_the_inputs_it_no_longer_takes_at_queue_time(pack):
    assert pack.MAGI1Sampler.validate_inputs() is True
    problems = pack.modules["queue_checks"].input_problems(pack.MAGI1Sampler, dict(vae=None, start_image=None))
    assert sorted(problems) == ["start_image", "vae"]
    assert problems["vae"].startswith("MAGI-1 Sampler no longer takes vae (pack 0.2.0): connect it "
                                      "to MAGI-1 Encode Prefix")


@pytest.fixture
def captured(pack, monkeypatch):
    """What the sampler hands to ``generate`` (stubbed: these tests are about the node, not the sampler)."""
    calls = []

    def generate(model, request, **hooks):
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
        rows = request.caption  # the node passes a ChunkCaptions (a prompt's distinct rows); the tests read it per chunk
        fields["caption"], fields["caption_mask"] = rows.dense()
        calls.append(dict(fields, rows=rows, request=request, frames_to_generate=request.frames_to_generate, **hooks))
        stats = types.SimpleNamespace(summary=lambda: "computed 100%")
        return types.SimpleNamespace(latent=torch.zeros(16, 12, 8, 8), stats=stats)

    monkeypatch.setattr(pack.modules["sampler"], "generate", generate)
    return calls


def test_sampler_reads_the_special_tokens_and_prefix_from_the_model_and_latent(pack, model, vae, captured):
    table = model.model.special_tokens
    assert torch.equal(table.hq, builtin.tiny_special_tokens().hq)  # attached by the loader
    prefix = pack.MAGI1EncodePrefix.execute(vae=vae, width=64, height=64, start_image=frames(1)).result[0]
    own = type(table)(hq=table.hq * 2, durations=table.durations + 1)  # another table: the one read must be this
    clone = model.clone()
    clone.model = types.SimpleNamespace(diffusion_model=model.model.diffusion_model, special_tokens=own)
    latent, report, _ = sample(pack, clone, prefix_latent=prefix).result
    call = captured[-1]
    # 48 frames from a start image (FRAMES_RULE: the image is the first of them): 1 + 11 latent frames, 2 chunks
    # of 6 to generate, each captioned [DURATION (chunks after it), HQ, T5 ...] from the MODEL's table
    assert (call["frames"], call["frames_to_generate"]) == (48, 44) and "48 asked, 48 made (2 chunks of 24, the start image the first frame)" in report
    assert call["caption"].shape[0] == 2 and torch.equal(call["caption"][:, 1], own.hq.expand(2, -1))
    assert [torch.equal(call["caption"][c, 0], own.duration(1 - c)) for c in range(2)] == [True] * 2
    assert torch.equal(call["prefix"], prefix["samples"][0])
    # the release's guidance table at the widget's scale (the pack's own copy of magi1: compared by value)
    assert repr(call["guidance"]) == repr(Guidance().with_text_scale(5.0))
    assert call["guidance"].text_scales == (5.0, 5.0, 5.0, 0.0, 0.0)
    assert latent["samples"].shape == (1, 16, 12, 8, 8) and report.startswith("computed 100%\n")
    assert "MAGI-1 memory plan: 48 frames 64x64" in report  # the plan, before the run allocated anything


def test_sampler_without_a_special_token_table_names_the_fix(pack, model, captured):
    clone = model.clone()
    clone.model = types.SimpleNamespace(diffusion_model=model.model.diffusion_model, special_tokens=None)
    with pytest.raises(ValueError) as error:
        sample(pack, clone)
    message = str(error.value)
    assert "no MAGI-1 special-token table" in message and "MAGI-1 DiT Loader" in message
    assert "SandAI-org/MAGI-1" in message and "special_tokens.npz" in message and not captured


# ------------------------------------------------------------------------------------- MAGI-1 DiT Loader
def test_dit_loader_finds_the_special_tokens_once(pack, tmp_path):
    """The official path: the table from models/text_encoders, else models/diffusion_models, else an error
    saying where to get it; found before the weights load."""
    folder_paths = pack.modules["loaders"].folder_paths
    text_encoders, empty = tmp_path / "text_encoders", tmp_path / "empty"
    text_encoders.mkdir(), empty.mkdir()
    load = dict(checkpoint="dit.safetensors", variant="auto", weight_dtype="auto", attention="auto")
    # the tiny weights folder stands in for models/diffusion_models (it holds a special_tokens.npz too)
    folder_paths.folders = {"text_encoders": [str(empty)], "diffusion_models": [builtin.WEIGHTS]}
    try:
        model = pack.MAGI1DiTLoader.execute(**load).result[0]
        assert torch.equal(model.model.special_tokens.hq, builtin.tiny_special_tokens().hq)
        other = np.random.default_rng(0).normal(size=(100, 64))
        np.savez(text_encoders / "special_tokens.npz", other_tokens=other)
        folder_paths.folders["text_encoders"] = [str(text_encoders)]
        model = pack.MAGI1DiTLoader.execute(**load).result[0]
        assert torch.equal(model.model.special_tokens.hq, torch.from_numpy(other[1].astype(np.float16)).float())
        folder_paths.folders = {"text_encoders": [str(empty)], "diffusion_models": [str(empty)]}
        with pytest.raises(FileNotFoundError) as error:  # before looking for the weights
            pack.MAGI1DiTLoader.execute(**load)
        assert "SandAI-org/MAGI-1" in str(error.value) and str(empty) in str(error.value)
    finally:
        folder_paths.folders = {}


def test_t5_module_no_longer_searches_for_the_table(pack):
    t5 = sys.modules[pack.modules["text_encode"].__name__.rsplit(".", 1)[0] + ".t5"]
    assert not hasattr(t5, "special_tokens")
    assert not hasattr(pack.modules["sampler"], "find_special_tokens")


def test_decode_gives_frames_of_the_encoded_size(pack, vae):
    latent = pack.MAGI1EncodePrefix.execute(vae=vae, width=64, height=64, prefix_video=frames(8)).result[0]
    images = pack.MAGI1Decode.execute(vae=vae, samples=latent, tile_size=256).result[0]
    assert images.shape == (8, 64, 64, 3) and 0 <= float(images.min()) and float(images.max()) <= 1


# ------------------------------------------------------------------------------------- built-in models
def test_the_benchmark_model_loads_and_encodes_through_the_nodes(pack):
    """Both built-in models are listed first, load with their own special tokens and share the VAE file; the
    text-encode node reads the chosen model's own encoder (an old workflow without the input gets tiny's)."""
    loaders = pack.modules["loaders"]
    assert loaders.checkpoint_choices("diffusion_models")[:2] == [TINY, loaders.BENCHMARK_CHOICE]
    model = pack.MAGI1DiTLoader.execute(checkpoint=loaders.BENCHMARK_CHOICE, variant="auto", weight_dtype="auto",
                                        attention="auto").result[0]
    dit = model.model.diffusion_model
    assert dit.config.caption_channels == 64 and dit.distill
    assert torch.equal(model.model.special_tokens.hq, builtin.BENCHMARK_MODEL.special_tokens().hq)
    assert not torch.equal(model.model.special_tokens.hq, builtin.tiny_special_tokens().hq)
    vae = pack.MAGI1VAELoader.execute(vae_name=loaders.BENCHMARK_CHOICE, weight_dtype="auto").result[0]
    assert repr(vae.config) == repr(builtin.load_tiny_vae().config)  # the pack's own copy of magi1: by value
    prompt = "a red ball moving right slowly and a blue square standing still over a brick wall"
    (states, extra), = pack.MAGI1TinyTextEncode.execute(prompt=prompt, model="bench").result[0]
    expected_states, expected_mask = builtin.BENCHMARK_MODEL.load_text_encoder().encode(prompt)
    assert torch.equal(states[0], expected_states) and torch.equal(extra["attention_mask"][0], expected_mask)
    (old_states, _), = pack.MAGI1TinyTextEncode.execute(prompt=prompt).result[0]
    assert torch.equal(old_states[0], builtin.load_tiny_text_encoder().encode(prompt)[0])
    assert not torch.equal(old_states, states)


# ------------------------------------------------------------------------------------ MAGI-1 MotionDetailCache
class _Model:
    def __init__(self):
        self.model_options = {}

    def clone(self):
        return _Model()


def cache_policy(pack, **inputs):
    node = pack.MAGI1MotionDetailCache
    patched = node.execute(model=_Model(), **inputs).result[0]
    return patched.model_options["transformer_options"][pack.modules["cache_policy"].POLICY_KEY]


def node_defaults(pack):
    schema = pack.MAGI1MotionDetailCache.GET_SCHEMA()
    return {inp.id: inp.options["default"] for inp in schema.inputs if "default" in inp.options}


def test_a_fresh_cache_node_selects_the_slow_preset_and_custom_keeps_it(pack):
    CachePolicy = pack.modules["cache_policy"].CachePolicy  # the pack's own copy of cache_core

    defaults = node_defaults(pack)
    assert defaults["preset"] == "slow" and defaults["mode"] == CachePolicy.slow().mode
    assert cache_policy(pack, **defaults) == CachePolicy.slow()
    assert cache_policy(pack, **{**defaults, "preset": "custom"}) == CachePolicy.slow()
    assert cache_policy(pack, **{**defaults, "preset": "fast"}) == CachePolicy.fast()
    # the preset's own chunk_tau wins over the widget; extrapolation comes from the widget
    chosen = cache_policy(pack, **{**defaults, "chunk_tau": 0.9, "velocity_extrapolation": 0.5})
    assert chosen == CachePolicy.slow(velocity_extrapolation=0.5)
    custom = cache_policy(pack, **{**defaults, "preset": "custom", "chunk_tau": 0.0, "tau": 0.3})
    assert custom.chunk_tau is None and custom.tau == 0.3


def test_a_cache_node_saved_before_the_extrapolation_inputs_keeps_its_behaviour(pack):
    CachePolicy = pack.modules["cache_policy"].CachePolicy

    old = {k: v for k, v in node_defaults(pack).items() if k not in ("velocity_extrapolation", "chunk_tau")}
    custom = cache_policy(pack, **{**old, "preset": "custom"})
    assert custom.velocity_extrapolation == 0.0 and custom.chunk_tau is None
    assert cache_policy(pack, **old) == CachePolicy.slow()  # a preset brings its own values


def test_memory_check_refuses_before_allocating_and_names_the_fixes(pack):
    """The sampler's check: a run that fits passes, one that fits only with the weights partly in host
    memory passes with a note, one that does not fit is refused naming the cheapest changes and the plan."""
    memory = sys.modules[pack.modules["sampler"].__name__.rsplit(".", 1)[0] + ".memory_check"]
    from magi1.weights.loader import OFFICIAL_MODEL_CONFIGS
    from magi1.planning.memory_plan import replan

    plan = memory_plan(OFFICIAL_MODEL_CONFIGS["4.5B"], 96, 720, 720, weight_dtype="bfloat16", reuse="token")
    assert memory.check_plan(plan, plan.total_gpu) is None
    partial = replan(plan, resident_layers=0)
    note = memory.check_plan(plan, (partial.total_gpu + plan.total_gpu) // 2)
    assert "host memory" in note
    with pytest.raises(ValueError) as refused:
        memory.check_plan(plan, partial.total_gpu // 2)
    text = str(refused.value)
    assert "kv_offload saves" in text and "MAGI-1 memory plan: 96 frames 720x720" in text
    assert "can be made free" in text
    # block swap in the sampler's terms: ComfyUI's partial loading (the plan's name for it is not shown)
    large = memory_plan(OFFICIAL_MODEL_CONFIGS["24B"], 96, 720, 1280)
    assert any("resident_layers" in saving.changes for saving in large.savings(24e9))
    with pytest.raises(ValueError) as refused:
        memory.check_plan(large, 24e9)
    text = str(refused.value)
    assert re.search(r"partial loading with \d+ saves", text) and "resident_layers" not in text


def test_a_run_larger_than_host_memory_is_refused_with_the_numbers(pack):
    memory = sys.modules[pack.modules["sampler"].__name__.rsplit(".", 1)[0] + ".memory_check"]
    dit = pack.modules["loaders"].builtin.TINY.load_dit()  # the pack's own copy of magi1
    plan = memory.plan_run(dit, VideoRequest(frames=96, height=4096, width=4096))
    need = plan.dit_phase - plan.weights_on_gpu
    memory.check_host_memory(plan, need)  # fits exactly
    with pytest.raises(ValueError, match=r"needs \d+\.\d GB of memory beside the weights .* make the video smaller"):
        memory.check_host_memory(plan, need - 1)


def test_frames_are_rounded_up_to_whole_chunks_and_reported(pack, model, captured):
    """25 frames make two chunks (48 frames), not one (the release floors 25 to 24 frames)."""
    _, report, _ = sample(pack, model, frames=25).result
    assert captured[-1]["frames_to_generate"] == 28  # 7 latent frames: two chunks
    assert "MAGI-1 frames: 25 asked, 48 made (2 chunks of 24)" in report
    _, report, _ = sample(pack, model, frames=48).result
    assert captured[-1]["frames_to_generate"] == 48 and "48 asked, 48 made" in report


def test_report_names_a_schedule_that_never_reaches_the_token_phase(pack, model, captured):
    defaults = {i.id: i.options.get("default") for i in pack.MAGI1MotionDetailCache.GET_SCHEMA().inputs
                if i.id != "model"}
    released = dict(defaults, mode="motion_detail", preset="custom", warmup_steps=5, chunk_wise_steps=20)
    cached = pack.MAGI1MotionDetailCache.execute(model=model, **released).result[0]
    _, report, _ = sample(pack, cached, steps=16).result
    assert "MAGI-1 note: token phase never reached at 16 steps: warm-up 5 + chunk-level 20" in report
    fresh = pack.MAGI1MotionDetailCache.execute(model=model, **defaults).result[0]
    assert "token phase never reached" not in sample(pack, fresh, steps=16).result[1]


def test_tiny_encoder_names_the_words_it_does_not_know(pack, model, captured):
    conditioning, unknown = pack.MAGI1TinyTextEncode.execute(prompt="a red zebra ball moving right qux").result
    assert unknown == "qux, zebra"
    _, report, _ = sample(pack, model, positive=conditioning).result
    assert "the tiny text encoder does not know ['qux', 'zebra']: unknown words are read as <unk>" in report
    known, none = pack.MAGI1TinyTextEncode.execute(prompt="a red ball moving right over a checkerboard").result
    assert none == "" and "does not know" not in sample(pack, model, positive=known).result[1]


def test_special_token_search_lists_only_input_model_folders(pack, tmp_path, monkeypatch):
    folder_paths = pack.modules["loaders"].folder_paths
    output = tmp_path / "output"
    inputs = tmp_path / "models" / "text_encoders"
    for folder in (output / "text_encoders", inputs):
        folder.mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    monkeypatch.setitem(folder_paths.folders, "text_encoders", [str(output / "text_encoders"), str(inputs)])
    monkeypatch.setitem(folder_paths.folders, "diffusion_models", [])
    with pytest.raises(FileNotFoundError) as error:
        pack.modules["loaders"].special_tokens_table()
    assert str(inputs) in str(error.value) and str(output) not in str(error.value)


def test_prompt_schedule_reaches_the_sampler_chunk_by_chunk(pack, model, captured):
    plain, _ = pack.MAGI1TinyTextEncode.execute(prompt="a red ball moving right over a checkerboard").result
    one, _ = pack.MAGI1TinyTextEncode.execute(prompt="0: a red ball moving right over a checkerboard").result
    assert len(one) == 1 and torch.equal(one[0][0], plain[0][0]) and one[0][1].keys() == plain[0][1].keys()
    sample(pack, model, positive=plain)
    sample(pack, model, positive=one)
    assert torch.equal(captured[-1]["caption"], captured[-2]["caption"])  # a one-prompt schedule is the prompt

    text = "0: a red ball moving right over a checkerboard\n1: a blue square moving left over a striped wall"
    scheduled, _ = pack.MAGI1TinyTextEncode.execute(prompt=text).result
    assert [entry[1]["magi1_first_chunk"] for entry in scheduled] == [0, 1]
    _, report, _ = sample(pack, model, positive=scheduled, frames=72).result
    caption = captured[-1]["caption"]  # 3 chunks: 0 the first prompt, 1 and 2 the second
    second, _ = pack.MAGI1TinyTextEncode.execute(prompt="a blue square moving left over a striped wall").result
    sample(pack, model, positive=plain, frames=72)
    sample(pack, model, positive=second, frames=72)
    assert torch.equal(caption[0], captured[-2]["caption"][0])
    assert torch.equal(caption[1:], captured[-1]["caption"][1:])
    _, report, _ = sample(pack, model, positive=scheduled, frames=24).result
    assert "the prompts scheduled from chunks [1] are not used: this run makes 1 chunks" in report
    assert pack.MAGI1TinyTextEncode.validate_inputs(prompt="1: a red ball").startswith(
        "prompt: MAGI-1 Tiny Text Encode (demo): prompt schedule: line '1: a red ball' starts at chunk 1")


def test_cache_mask_previews_are_large_enough_to_see(pack):
    visible = pack.modules["sampler"].visible
    frames = (torch.rand(5, 8, 24) > 0.5).float()
    big = visible(frames)
    assert big.shape == (5, 8 * 16, 24 * 16)  # 16 = 384 // 24: whole blocks, each token a sharp square
    assert torch.equal(big[:, ::16, ::16], frames)
    assert visible(torch.zeros(1, 4, 500)).shape == (1, 4, 500)  # already wide: unchanged


# ------------------------------------------------------------------------ reports: model, device, frames
def memory_module(pack):
    return sys.modules[pack.modules["sampler"].__name__.rsplit(".", 1)[0] + ".memory_check"]


def test_built_in_models_report_their_own_names(pack, model, captured):
    """Not "custom_distill (as chosen)": the loader's log and the sampler's report name the built-in model as
    the loader lists it."""
    loaders, memory = pack.modules["loaders"], memory_module(pack)
    assert [m.title for m in loaders.BUILTIN.values()] == [TINY, loaders.BENCHMARK_CHOICE] == list(loaders.BUILTIN)
    bench = pack.MAGI1DiTLoader.execute(checkpoint=loaders.BENCHMARK_CHOICE, variant="auto", weight_dtype="auto",
                                        attention="auto").result[0].model.diffusion_model
    assert memory.weights_line(bench, torch.device("cpu")) == (
        "MAGI-1 model: MAGI-1 benchmark model (built-in, 128x128), distilled; weights: float32")
    _, report, _ = sample(pack, model).result
    assert "MAGI-1 model: MAGI-1 tiny demo (built-in), distilled; weights: float32" in report.splitlines()
    assert "custom" not in report and "as chosen" not in report


def test_the_plan_on_the_cpu_speaks_of_memory_and_the_frames_made(pack, model, captured):
    """The sampler's plan on the CPU: no "GPU" anywhere in the report, and the frames the run makes (25
    asked: two whole chunks, 48 frames), not the 28 handed to generate."""
    _, report, _ = sample(pack, model, frames=25).result
    assert "MAGI-1 memory plan: 48 frames 64x64, 2 chunks of" in report and "28 frames" not in report
    assert "on the CPU" in report and "total memory (peak)" in report and "GPU" not in report, report
    memory, dit = memory_module(pack), model.model.diffusion_model
    request = VideoRequest(frames=25, height=64, width=64)
    plan, _, _ = memory.checked_plan(model, dit, request)
    assert plan.device == torch.device("cpu") and plan.frames_made == 48
    gpu = memory.plan_run(dit, request)  # no device: worded for a GPU, as before
    assert gpu == plan and gpu.lines()[-1].lstrip().startswith("total GPU (peak)")
    assert memory.plan_run(dit, request, torch.device("cpu")).lines() == plan.lines()
    with pytest.raises(ValueError) as refused:
        memory.check_host_memory(plan, 0)
    plan_text = str(refused.value).split("\n", 1)[1]  # after "... or use a GPU."
    assert plan_text.startswith("MAGI-1 memory plan: 48 frames") and "GPU" not in plan_text


def test_fp8_weights_line_has_no_gpu_estimate_on_the_cpu_and_never_0_ms(pack, monkeypatch):
    memory = memory_module(pack)
    ops = sys.modules[memory.__name__.rsplit(".", 2)[0] + ".magi1.network.ops"]
    dit = pack.MAGI1DiTLoader.execute(checkpoint=TINY, variant="auto", weight_dtype="fp8_e4m3fn",
                                      attention="auto").result[0].model.diffusion_model
    assert memory.weights_line(dit, torch.device("cpu")) == (
        "MAGI-1 model: MAGI-1 tiny demo (built-in), distilled; weights: fp8_e4m3fn, each layer's float8 weights "
        "cast to float32 as it runs (the CPU has no float8 arithmetic)")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "fp8_arithmetic", lambda device: True)  # an Ada/Hopper GPU, without one here
    small = memory.weights_line(dit, cuda)  # the tiny model: about 0.01 ms
    assert "cast to float32 as it runs, under 1 ms of memory traffic per DiT call at 1 TB/s" in small
    assert " 0 ms" not in small
    large = types.SimpleNamespace(weights="fp8_e4m3fn", dtype=torch.bfloat16, parameters=lambda: [
        torch.empty(10 ** 9, dtype=torch.float8_e4m3fn, device="meta")])
    assert memory._weights(large, cuda) == ("fp8_e4m3fn, each layer's float8 weights cast to bfloat16 as it runs, "
                                            "about 3 ms of memory traffic per DiT call at 1 TB/s (an estimate)")
    monkeypatch.setattr(ops, "fp8_arithmetic", lambda device: False)
    assert "this GPU has no float8 arithmetic" in memory._weights(large, cuda)


def test_a_long_videos_captions_are_a_prompts_distinct_rows(pack, model, captured):
    """171 chunks of one prompt read 8 distinct captions (the DURATION token saturates 7 chunks before the end):
    what the sampler hands over does not grow with the video."""
    plain, _ = pack.MAGI1TinyTextEncode.execute(prompt="a red ball moving right over a checkerboard").result
    sample(pack, model, positive=plain, frames=4096)
    rows = captured[-1]["rows"]
    assert len(rows) == 171 and rows.table.shape[0] == 8
    assert captured[-1]["caption"].shape[0] == 171  # the same captions, chunk by chunk
