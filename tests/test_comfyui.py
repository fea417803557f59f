"""The pack inside a real ComfyUI: registration, node schemas, the cache node's contract, a live server
(the demo by POST /prompt and comfy-cli, image-to-video and continuation through MAGI-1 Encode Prefix on
the tiny model, the checks made at queue time).

Needs a ComfyUI checkout, which CI does not have: set COMFYUI_DIR to it (and COMFYUI_PYTHON to a Python
that has ComfyUI's requirements and the pack's requirements.txt, if not this one).
../shared/tools/comfyui/env.sh stands one up on CPU; then `$COMFYUI_PYTHON -m pip install -r requirements.txt`
(ftfy and beautifulsoup4 are not among ComfyUI's).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from magi1 import builtin
from magi1.sampling.layout import frames_to_generate

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").exists(),
    reason="needs a ComfyUI checkout: set COMFYUI_DIR (CI has none)",
)

# Every script below runs after this, inside ComfyUI's environment (ComfyUI's root is the working
# directory, first on sys.path): CPU only, and the pack imported as ``magipack`` from this checkout.
PRELUDE = textwrap.dedent(
    """
    import importlib.util, sys
    from comfy.cli_args import args
    args.cpu = True  # before comfy.model_management probes for a GPU

    spec = importlib.util.spec_from_file_location("magipack", PACK + "/__init__.py", submodule_search_locations=[PACK])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["magipack"] = pack
    spec.loader.exec_module(pack)
    """
)
IN_PROCESS = textwrap.dedent(
    """
    import asyncio, logging
    import torch
    import comfy.model_patcher
    from comfy_api.latest import ComfyExtension, io

    import nodes  # ComfyUI's own module must still be ComfyUI's
    assert hasattr(nodes, "NODE_CLASS_MAPPINGS"), "the pack shadowed ComfyUI's nodes module"

    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    node_list = asyncio.run(extension.get_node_list())
    assert node_list, "no nodes registered"
    ids = set()
    for node in node_list:
        schema = node.GET_SCHEMA()
        assert schema.node_id.startswith("MAGI1") and schema.node_id not in ids, schema.node_id
        ids.add(schema.node_id)
        assert schema.category == "MAGI-1" and schema.display_name and schema.description
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
            default = getattr(inp, "default", None)
            if getattr(inp, "options", None) is not None:  # file lists have no default
                assert default in inp.options or (default is None and inp.id in ("checkpoint", "vae_name")), \
                    f"{schema.node_id}.{inp.id}"
            elif default is not None and getattr(inp, "min", None) is not None:
                assert inp.min <= default <= inp.max, f"{schema.node_id}.{inp.id}"

    # The cache node: a clone carrying the policy; the input model untouched; stacking replaces.
    from magipack.cache_core import CachePolicy
    from magipack.nodes.cache_policy import MAGI1MotionDetailCache, POLICY_KEY
    schema = MAGI1MotionDetailCache.GET_SCHEMA()
    defaults = {inp.id: inp.default for inp in schema.inputs if inp.id != "model"}
    device = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=device, offload_device=device)
    options_before = repr(model.model_options)
    patched = MAGI1MotionDetailCache.execute(model=model, **defaults).result[0]
    assert patched is not model and repr(model.model_options) == options_before
    assert patched.model is model.model  # same weights, only options differ
    assert patched.model_options["transformer_options"][POLICY_KEY] == CachePolicy.slow()  # a fresh node: slow

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    fast = MAGI1MotionDetailCache.execute(model=patched, **{**defaults, "preset": "fast", "mode": "motion"}).result[0]
    policy = fast.model_options["transformer_options"][POLICY_KEY]
    assert policy == CachePolicy.fast(mode="motion"), policy
    assert patched.model_options["transformer_options"][POLICY_KEY] == CachePolicy.slow()  # a fresh node: slow
    assert any("replacing it" in r.getMessage() for r in records), "stacking must warn"

    try:
        MAGI1MotionDetailCache.execute(model=model, **{**defaults, "detail_window": 4})
    except ValueError as error:
        assert "detail_window_size must be" in str(error) and "odd" in str(error), error
    else:
        raise AssertionError("an even detail window must be refused")
    print("OK", sorted(ids))
    """
)


# The release's T5 encoding, rebuilt from a stock CLIP (nodes/t5.py) on a tiny random T5 v1.1: the CLIP
# is what CLIPLoader type "mochi" builds (genmo.mochi_te + MochiT5Tokenizer, the real tokenizer), only
# with a tiny config; the reference is transformers' T5EncoderModel with the official tokenizer call.
T5_PATH = textwrap.dedent(
    """
    import types
    import torch
    import comfy.sd, comfy.sd1_clip, comfy.text_encoders.genmo as genmo, comfy.text_encoders.sd3_clip as sd3_clip
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from magipack.nodes.t5 import t5_states
    from magipack.magi1.prompts.text import prepare_prompt

    TINY = {"d_ff": 64, "d_kv": 8, "d_model": 32, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
            "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 4, "num_layers": 2, "pad_token_id": 0,
            "eos_token_id": 1, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    real_json = comfy.sd1_clip.json
    comfy.sd1_clip.json = types.SimpleNamespace(load=lambda f: dict(TINY))  # the stock classes, a tiny config
    import nodes
    assert "mochi" in nodes.CLIPLoader.INPUT_TYPES()["required"]["type"][0]  # the loader type the README names

    def build(target_clip, tokenizer, sd):
        target = types.SimpleNamespace(clip=target_clip, tokenizer=tokenizer, params={})
        clip = comfy.sd.CLIP(target, parameters=1, model_options={"dtype": torch.float32})
        missing, _ = clip.load_sd(sd)
        assert not missing, missing
        return clip

    g = torch.Generator().manual_seed(0)
    # The release's encoder, as T5Embedder runs it: HF T5EncoderModel, tokenizer padded to 800, mask on.
    reference = T5EncoderModel(T5Config(**TINY)).eval()
    sd = {k: torch.randn(v.shape, generator=g) * (0.05 if "shared" in k or "embed" in k else 0.2) + (1.0 if "layer_norm" in k else 0.0)
          for k, v in reference.state_dict().items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # one table (tied in T5)
    reference.load_state_dict(sd)
    sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    mochi = build(genmo.mochi_te(), genmo.MochiT5Tokenizer, sd)  # what CLIPLoader type "mochi" builds
    tokenizer = AutoTokenizer.from_pretrained("comfy/text_encoders/t5_tokenizer")
    prompts = ["A red fox trots across a snowy meadow at dawn, cinematic lighting.",
               "Two CATS (playing:1.3) with a ball of yarn... https://x.com #12",
               "a b c " * 120, "the quick brown fox " * 220]
    for prompt in prompts:
        states, mask = t5_states(mochi, prompt)
        batch = tokenizer([prepare_prompt(prompt)], max_length=800, padding="max_length", truncation=True,
                          return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        with torch.no_grad():
            expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[0]
        n = int(batch["attention_mask"].sum())
        assert int(mask.sum()) == n and bool(mask[:n].all()), (int(mask.sum()), n)
        err = float((states[:n] - expected[:n]).norm() / expected[:n].norm())
        print("prompt tokens", n, "of", states.shape[0], "relative error", err)
        assert err < 1e-5

    import comfy.text_encoders.pixart_t5 as pixart_t5
    pixart = build(pixart_t5.pixart_te(), pixart_t5.PixArtTokenizer, sd)  # no padding, no mask: also exact
    states, mask = t5_states(pixart, prompts[1])
    batch = tokenizer([prepare_prompt(prompts[1])], max_length=800, padding="max_length", truncation=True, return_tensors="pt")
    n = int(batch["attention_mask"].sum())
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state[0, :n]
    assert states.shape[0] == n and bool(mask.all())
    assert float((states - expected).norm() / expected.norm()) < 1e-5

    class PaddedT5(comfy.sd1_clip.SD1ClipModel):  # T5 padded to 77 without a mask (the SD3/Flux T5 setting)
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=sd3_clip.T5XXLModel, model_options=model_options)
    class PaddedTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, clip_name="t5xxl", tokenizer=sd3_clip.T5XXLTokenizer)
    padded = build(PaddedT5, PaddedTokenizer, sd)
    try:
        t5_states(padded, prompts[0])
    except ValueError as error:
        assert "type 'mochi'" in str(error), error
    else:
        raise AssertionError("a padded prompt without a mask must be refused")
    comfy.sd1_clip.json = real_json

    print("T5 OK")
    """
)


# The nodes executed in-process on a tiny random DiT and VAE placed in ComfyUI's model folders:
# loader -> cache -> sampler (twice: identical) -> decode, image-to-video and continuation through
# MAGI-1 Encode Prefix, and the errors users meet.
NODES_RUN = textwrap.dedent(
    """
    import json, os, tempfile
    import numpy as np
    import torch
    import folder_paths
    from safetensors.torch import save_file

    from magipack.magi1 import VAEConfig, random_dit, random_vae
    from magipack.nodes.cache_policy import MAGI1MotionDetailCache
    from magipack.nodes.loaders import MAGI1DiTLoader, MAGI1VAELoader
    from magipack.nodes.sampler import MAGI1Sampler
    from magipack.nodes.vae import MAGI1Decode, MAGI1EncodePrefix

    # A tiny random DiT, VAE and special-token table in ComfyUI's model folders.
    root = tempfile.mkdtemp()
    for sub in ("diffusion_models", "vae", "text_encoders"):
        os.makedirs(os.path.join(root, sub))
        folder_paths.add_model_folder_path(sub, os.path.join(root, sub), is_default=True)
    config = json.load(open(PACK + "/tests/fixtures/pipeline/distill45.json"))["model_config"]
    dit = random_dit(config, seed=0)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              os.path.join(root, "diffusion_models", "tiny_distill.safetensors"),
              metadata={"magi1_model_config": json.dumps(config)})
    vae_config = VAEConfig(embed_dim=256, depth=1, num_heads=4, mlp_ratio=1.0, video_size=32)
    vae = random_vae(vae_config, seed=0)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(root, "vae", "tiny_vae.safetensors"),
              metadata={"magi1_vae_config": json.dumps(vae_config.to_dict())})
    width = config["caption_channels"]
    other_tokens = np.random.default_rng(0).normal(size=(100, width))
    np.savez(os.path.join(root, "text_encoders", "special_tokens.npz"), other_tokens=other_tokens)

    positive = [[torch.randn(1, 7, width), {"attention_mask": torch.ones(1, 7, dtype=torch.bool)}]]
    model = MAGI1DiTLoader.execute(checkpoint="tiny_distill.safetensors", variant="auto", weight_dtype="auto",
                                   attention="auto").result[0]
    assert model.model.diffusion_model.distill and model.model.diffusion_model.dtype == torch.float32
    # the special-token table is found once, by the loader, and travels with the MODEL
    assert torch.equal(model.model.special_tokens.hq, torch.from_numpy(other_tokens[1].astype(np.float16)).float())
    defaults = {i.id: i.default for i in MAGI1MotionDetailCache.GET_SCHEMA().inputs if i.id != "model"}
    cached = MAGI1MotionDetailCache.execute(model=model, **defaults).result[0]
    assert cached.model.special_tokens is model.model.special_tokens
    vae = MAGI1VAELoader.execute(vae_name="tiny_vae.safetensors", weight_dtype="auto").result[0]
    request = dict(positive=positive, width=32, height=32, frames=48, steps=8, seed=1, guidance=7.5)
    latent, report, masks = MAGI1Sampler.execute(model=cached, record_masks=True, **request).result
    again = MAGI1Sampler.execute(model=cached, record_masks=True, **request).result[0]
    assert torch.equal(latent["samples"], again["samples"]), "two runs from the same patched model must agree"
    plain = MAGI1Sampler.execute(model=model, **request).result[0]
    assert latent["samples"].shape == (1, 16, 12, 4, 4), latent["samples"].shape
    assert "computed" in report and masks.shape[-1] == 3 and masks.shape[0] >= 8, masks.shape
    print("report:", report)
    frames = MAGI1Decode.execute(vae=vae, samples=latent, tile_size=256).result[0]
    assert frames.shape == (48, 32, 32, 3) and 0 <= float(frames.min()) and float(frames.max()) <= 1, frames.shape

    def encode(**images):
        return MAGI1EncodePrefix.execute(vae=vae, width=32, height=32, **images).result[0]

    # image-to-video from the first decoded frame
    start = encode(start_image=frames[:1])
    assert start["samples"].shape == (1, 16, 1, 4, 4), start["samples"].shape
    i2v = MAGI1Sampler.execute(model=model, prefix_latent=start, **request).result[0]
    assert i2v["samples"].shape == (1, 16, 12, 4, 4), i2v["samples"].shape  # 48 frames, the image the first
    # another size is resized to the video's (ComfyUI's own bicubic); 9 prefix frames keep their last 8
    resized = encode(start_image=torch.rand(1, 24, 40, 3))
    assert resized["samples"].shape == (1, 16, 1, 4, 4), resized["samples"].shape
    prefix = encode(prefix_video=frames[:9])
    assert prefix["samples"].shape == (1, 16, 2, 4, 4), prefix["samples"].shape
    assert torch.equal(prefix["samples"], encode(prefix_video=frames[1:9])["samples"])
    v2v = MAGI1Sampler.execute(model=model, prefix_latent=prefix, **request).result[0]
    assert v2v["samples"].shape == (1, 16, 16, 4, 4), v2v["samples"].shape  # 2 + 12 new in 3 chunks, after the prefix

    def refused(node, match, **arguments):
        try:
            node.execute(**arguments)
        except ValueError as error:
            assert match in str(error), error
        else:
            raise AssertionError(f"{sorted(arguments)} must be refused")

    refused(MAGI1Sampler, "nearest valid value is 48", model=model, **{**request, "width": 40})
    wide = [[torch.randn(1, 7, width + 8), {"attention_mask": torch.ones(1, 7, dtype=torch.bool)}]]
    refused(MAGI1Sampler, f"holds {width + 8}-wide text states but this model reads {width}-wide", model=model,
            **{**request, "positive": wide})
    refused(MAGI1Sampler, "encoded at 32x32 but the sampler makes 48x32: set MAGI-1 Encode Prefix's width/height",
            model=model, prefix_latent=start, **{**request, "width": 48})
    refused(MAGI1EncodePrefix, "not both", vae=vae, width=32, height=32, start_image=frames[:1], prefix_video=frames)
    refused(MAGI1EncodePrefix, "connect start_image", vae=vae, width=32, height=32)
    other = random_vae(VAEConfig(embed_dim=64, depth=1, num_heads=4, patch_size=4, video_size=16), seed=1)
    refused(MAGI1EncodePrefix, "does not match the MAGI-1 DiT", vae=other, width=32, height=32, start_image=frames[:1])

    # without the table the loader refuses, saying where to get it and where to put it
    os.remove(os.path.join(root, "text_encoders", "special_tokens.npz"))
    try:
        MAGI1DiTLoader.execute(checkpoint="tiny_distill.safetensors", variant="auto", weight_dtype="auto",
                               attention="auto")
    except FileNotFoundError as error:
        assert "SandAI-org/MAGI-1" in str(error) and "text_encoders" in str(error), error
    else:
        raise AssertionError("missing special tokens must be refused")
    print("NODES OK")
    """
)
PARTIAL_LOAD = textwrap.dedent(
    """
    import torch
    import comfy.model_management as mm
    import comfy.ops
    from magipack.magi1 import VideoRequest, builtin, chunk_captions, generate, load_dit
    from magipack.nodes.loaders import MAGI1DiTLoader, TINY_CHOICE

    model = builtin.TINY
    states, mask = model.load_text_encoder().encode(model.example_prompt)
    caption, caption_mask = chunk_captions(states, mask, 2, model.special_tokens(), length=800)

    def run(dit):
        dit.execution_device = torch.device("cpu")
        request = VideoRequest(frames=48, height=32, width=32, steps=8, seed=3, caption=caption, caption_mask=caption_mask)
        return generate(dit, request).latent

    def loaded(**options):
        patcher = MAGI1DiTLoader.execute(checkpoint=TINY_CHOICE, variant="auto", attention="auto",
                                         **{"weight_dtype": "auto", **options}).result[0]
        return patcher, patcher.model.diffusion_model

    patcher, dit = loaded()
    layers = [m for m in dit.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv3d))]
    assert layers and all(isinstance(m, comfy.ops.CastWeightBiasOp) for m in layers), "not ComfyUI's operations"
    size = patcher.model_size()
    patcher.load(torch.device("cpu"), lowvram_model_memory=size, full_load=True)
    full = run(dit)
    patcher.unpatch_model()
    patcher.load(torch.device("cpu"), lowvram_model_memory=size // 3)  # a third of the model "fits"
    assert patcher.model.model_lowvram and patcher.model.lowvram_patch_counter >= 0, "not loaded partially"
    partial_modules = sum(getattr(m, "prev_comfy_cast_weights", None) is not None for m in dit.modules())
    assert partial_modules > 0, "no module left to ComfyUI's cast"
    partial = run(dit)
    assert torch.equal(full, partial), (full - partial).abs().max()
    # ComfyUI's operations give what the pack's own give
    plain = load_dit(model.dit_file, distill=True)
    assert torch.equal(run(plain), full)
    # fp8 weights through ComfyUI's operations: recognised kinds, close to float32
    _, fp8 = loaded(weight_dtype="fp8_e4m3fn_scaled")
    assert fp8.weights == "fp8_e4m3fn_scaled"
    err = ((run(fp8) - full).norm() / full.norm()).item()
    assert 0 < err < 0.5, err
    print(f"PARTIAL OK {partial_modules} modules cast by ComfyUI; fp8 scaled latent error {err:.3f}")
    """
)
NODE_IDS = ["MAGI1Decode", "MAGI1DiTLoader", "MAGI1EncodePrefix", "MAGI1MotionDetailCache", "MAGI1MultiGPU",
            "MAGI1Sampler", "MAGI1SaveCaptionStates", "MAGI1SaveVideo", "MAGI1TextEncode", "MAGI1TinyTextEncode", "MAGI1VAELoader"]


def run_in_comfyui(script, timeout=600):
    """Run ``script`` with ComfyUI's Python in its root, with ``PACK`` set to this checkout; its stdout."""
    done = subprocess.run([COMFYUI_PYTHON, "-c", f"PACK = {str(ROOT)!r}\n" + PRELUDE + script], cwd=COMFYUI_DIR,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_t5_states_from_stock_clip_match_the_release_encoding():
    assert "T5 OK" in run_in_comfyui(T5_PATH)


def test_pack_registers_and_cache_node_keeps_its_contract():
    assert f"OK {NODE_IDS}" in run_in_comfyui(IN_PROCESS)


def test_partially_loaded_model_gives_the_fully_loaded_latent():
    out = run_in_comfyui(PARTIAL_LOAD)
    assert "PARTIAL OK" in out, out


def test_nodes_generate_and_decode_on_a_tiny_model():
    assert "NODES OK" in run_in_comfyui(NODES_RUN)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """A real ComfyUI on CPU with the pack (symlinked into a custom_nodes folder of its own): its URL,
    output folder and log."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "custom_nodes").mkdir()
        (tmp / "custom_nodes" / "ComfyUI-MAGI1-MotionDetailCache").symlink_to(ROOT)
        # The official DiT layout (an index beside its shards) holding the built-in tiny model, with its special
        # tokens where the official table goes; empty stand-ins for the official VAE and T5 the workflows name,
        # so that those workflows pass the server's validation (their loaders then fail, as they should).
        models = tmp / "models"
        write_sharded_tiny(models / "diffusion_models" / OFFICIAL_FOLDER)
        (models / "text_encoders").mkdir(parents=True)
        (models / "text_encoders" / "special_tokens.npz").write_bytes(Path(builtin.TINY.special_tokens_file).read_bytes())
        for name in ("vae/magi1_vae.safetensors", "text_encoders/t5xxl_fp16.safetensors"):
            (models / name).parent.mkdir(parents=True, exist_ok=True)
            (models / name).write_text("{}")
        (tmp / "input").mkdir()
        (tmp / "temp").mkdir()  # its own temp (main.py empties it at start and exit) and user folders:
        (tmp / "user").mkdir()  # the borrowed ComfyUI's are left alone
        (tmp / "input" / "example.png").write_bytes((Path(COMFYUI_DIR) / "input" / "example.png").read_bytes())
        write_video(tmp / "input" / "magi1_prefix.mp4")
        (tmp / "extra_model_paths.yaml").write_text(
            f"magi_test:\n  custom_nodes: {tmp / 'custom_nodes'}\n  diffusion_models: {models / 'diffusion_models'}\n"
            f"  vae: {models / 'vae'}\n  text_encoders: {models / 'text_encoders'}\n")
        port = free_port()
        log_path = tmp / "server.log"
        log = open(log_path, "w")
        process = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
             "--output-directory", str(tmp / "output"), "--input-directory", str(tmp / "input"),
             "--temp-directory", str(tmp / "temp"), "--user-directory", str(tmp / "user"),
             "--extra-model-paths-config", str(tmp / "extra_model_paths.yaml")],
            cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 240
            while time.time() < deadline and process.poll() is None:
                try:
                    get(url, "/system_stats")
                    break
                except OSError:
                    time.sleep(1)
            else:
                raise AssertionError(f"server did not answer; log:\n{log_path.read_text()[-3000:]}")
            yield types.SimpleNamespace(url=url, port=port, output=tmp / "output", log=log_path, pid=process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()


OFFICIAL_FOLDER = "4.5B_distill/inference_weight.distill"  # as in the official download
OFFICIAL_ENTRY = OFFICIAL_FOLDER + "/model.safetensors.index.json"  # its one entry in MAGI-1 DiT Loader


def write_sharded_tiny(folder, shards=2):
    """The built-in tiny DiT saved as the official checkpoints are: shards named model-0000i-of-0000n and the
    model.safetensors.index.json mapping every tensor to its shard."""
    folder.mkdir(parents=True)
    state = load_file(builtin.TINY.dit_file)
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({key: state[key] for key in keys[i::shards]}, str(folder / name))
        weight_map.update({key: name for key in keys[i::shards]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_video(path, frames=12):
    """A small mp4 (PyAV, in ComfyUI's environment) for LoadVideo."""
    script = ("import av, numpy as np, sys\n"
              "with av.open(sys.argv[1], 'w') as c:\n"
              "    s = c.add_stream('libx264', rate=24); s.width = s.height = 64; s.pix_fmt = 'yuv420p'\n"
              f"    for i in range({frames}):\n"
              "        c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format='rgb24')))\n"
              "    c.mux(s.encode())\n")
    done = subprocess.run([COMFYUI_PYTHON, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def get(url, route, timeout=30):
    with urllib.request.urlopen(url + route, timeout=timeout) as response:
        return json.load(response)


def post(url, route, body):
    request = urllib.request.Request(url + route, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{route}: HTTP {error.code}: {error.read().decode()[:3000]}") from None


def post_refused(url, route, body):
    """POST what the server must refuse: the HTTP status and its JSON answer."""
    request = urllib.request.Request(url + route, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    raise AssertionError(f"{route} took what it must refuse")


def test_live_server_lists_the_nodes(server):
    node = get(server.url, "/object_info/MAGI1MotionDetailCache")["MAGI1MotionDetailCache"]
    assert node["category"] == "MAGI-1" and node["output"] == ["MODEL"]
    assert set(node["input"]["required"]) >= {"model", "mode", "tau", "detail_window", "combine_mode", "proxy"}
    for node_id in NODE_IDS:
        assert get(server.url, f"/object_info/{node_id}")[node_id]["category"] == "MAGI-1", node_id
    every = get(server.url, "/object_info")
    assert sorted(k for k in every if k.startswith("MAGI1")) == NODE_IDS
    ours = [line for line in server.log.read_text().splitlines() if "ComfyUI-MAGI1-MotionDetailCache" in line]
    assert ours and not any("IMPORT FAILED" in line for line in ours), "\n".join(ours)
    loader = every["MAGI1DiTLoader"]["input"]["required"]["checkpoint"]
    assert "MAGI-1 tiny demo (built-in)" in loader[0] or loader[1].get("options", [None])[0] == "MAGI-1 tiny demo (built-in)"


def test_stock_nodes_take_the_widgets_the_workflows_give(server):
    from test_workflows import STOCK_WIDGETS

    widget_types = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
    for kind, expected in STOCK_WIDGETS.items():
        info = get(server.url, f"/object_info/{kind}")[kind]
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        widgets = [name for name in order if isinstance(declared[name][0], list) or declared[name][0] in widget_types]
        assert widgets == expected, (kind, widgets)


def needs_no_external_weights(api):
    """Only the built-in models: no file-picking loader other than ours set to a built-in choice."""
    builtin = ("MAGI-1 tiny demo (built-in)", "MAGI-1 benchmark model (built-in, 128x128)")
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] in ("CLIPLoader", "LoadImage", "LoadVideo"):
            return False
        if node["class_type"] == "MAGI1DiTLoader" and inputs["checkpoint"] not in builtin:
            return False
        if node["class_type"] == "MAGI1VAELoader" and inputs["vae_name"] not in builtin:
            return False
    return True


def sampler_latent_frames(api, node_id, prefix=0):
    """Latent frames a sampler returns (magi1.sampling.layout.FRAMES_RULE): its frames as generated after ``prefix``
    latent frames, in whole 6-frame chunks (a start image's frame kept, a prefix video's left out); a prefix
    linked from another sampler is that sampler's output."""
    sampler = api[node_id]["inputs"]
    source = sampler.get("prefix_latent")
    if isinstance(source, list) and api[source[0]]["class_type"] == "MAGI1Sampler":
        prefix = sampler_latent_frames(api, source[0])
    new = frames_to_generate(sampler["frames"], prefix) // 4
    return -(-(new + prefix) // 6) * 6 - (prefix if prefix > 1 else 0)


def expected_frames(api, prefix=0):
    """Frames of the saved video: every sampler's latent frames (one segment each), decoded in tiles of 3
    latent frames (12 frames; a tile of one latent frame gives one frame)."""
    total = 0
    for node_id in [k for k, node in api.items() if node["class_type"] == "MAGI1Sampler"]:
        latent_frames = sampler_latent_frames(api, node_id, prefix)
        total += sum(1 if size == 1 else 4 * size for size in (min(3, latent_frames - s)
                                                               for s in range(0, latent_frames, 3)))
    return total


def video_frames(path):
    """(frames, width, height) of a video file, decoded with PyAV in ComfyUI's environment."""
    script = ("import av, sys; c = av.open(sys.argv[1]); s = c.streams.video[0]; "
              "n = sum(1 for _ in c.decode(s)); print(n, s.width, s.height)")
    done = subprocess.run([COMFYUI_PYTHON, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(int(v) for v in done.stdout.split())


API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflows_without_external_weights_run(server, path):
    api = json.loads(path.read_text())
    began = time.time()
    entry = run_prompt(server, api)
    if not needs_no_external_weights(api):
        # The server took the graph (names, types, links and values valid); it stops at a loader, whose
        # official file is an empty stand-in here.
        errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
        assert entry["status"]["status_str"] == "error" and errors, json.dumps(entry["status"])[:3000]
        assert errors[0]["node_type"] in ("MAGI1DiTLoader", "MAGI1VAELoader", "CLIPLoader"), errors[0]
        pytest.skip(f"{path.name} validated; running it needs the official checkpoints")
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    videos = [item for output in entry["outputs"].values() for item in output.get("images", []) + output.get("video", [])
              if str(item.get("filename", "")).endswith(".mp4")]
    assert videos, entry["outputs"]
    sampler = next(node["inputs"] for node in api.values() if node["class_type"] == "MAGI1Sampler")
    file = server.output / videos[0]["subfolder"] / videos[0]["filename"]
    assert video_frames(file) == (expected_frames(api), sampler["width"], sampler["height"])
    reports = [text for output in entry["outputs"].values() for text in output.get("text", [])]
    assert any("computed" in text for text in reports), reports
    print(f"{path.name}: {time.time() - began:.1f} s, {videos[0]['filename']}, report: {reports}")


def saved_video(server, entry):
    """(frames, width, height) of the one video a finished prompt saved."""
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    videos = [item for output in entry["outputs"].values() for item in output.get("images", []) + output.get("video", [])
              if str(item.get("filename", "")).endswith(".mp4")]
    assert len(videos) == 1, entry["outputs"]
    return video_frames(server.output / videos[0]["subfolder"] / videos[0]["filename"])


def with_prefix(source_nodes, images, width=64, height=64, seed=7):
    """The tiny demo with a prefix: ``source_nodes`` (API nodes by id) give the frames at ``images`` =
    (input name of MAGI-1 Encode Prefix, link), encoded at ``width`` x ``height`` into the sampler's prefix."""
    api = json.loads((ROOT / "workflows" / "api" / "magi1_tiny_demo.json").read_text())
    api.update(source_nodes)
    name, link = images
    api["31"] = {"class_type": "MAGI1EncodePrefix",
                 "inputs": {"width": width, "height": height, "vae": ["5", 0], name: link}}
    sampler = next(node["inputs"] for node in api.values() if node["class_type"] == "MAGI1Sampler")
    sampler.update(prefix_latent=["31", 0], seed=seed)  # another seed than the demo's: not a cached result
    return api


LOAD_IMAGE = {"33": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
LOAD_VIDEO = {"30": {"class_type": "LoadVideo", "inputs": {"file": "magi1_prefix.mp4"}},
              "32": {"class_type": "GetVideoComponents", "inputs": {"video": ["30", 0]}}}


def test_tiny_model_continues_an_image_and_a_video_through_encode_prefix(server):
    """Image-to-video (ComfyUI's example.png, stretched to 64x64) and video continuation (a 12-frame mp4:
    3 latent frames) on the built-in tiny model, through MAGI-1 Encode Prefix, in the running server."""
    for source, images, prefix in ((LOAD_IMAGE, ("start_image", ["33", 0]), 1),
                                   (LOAD_VIDEO, ("prefix_video", ["32", 0]), 3)):
        api = with_prefix(source, images)
        began = time.time()
        assert saved_video(server, run_prompt(server, api)) == (expected_frames(api, prefix), 64, 64)
        print(f"{images[0]}: {time.time() - began:.1f} s")


def test_the_tiny_demo_runs_on_two_worker_processes(server):
    """MAGI-1 Multi-GPU between the model and the sampler: 2 worker processes (gloo on the CPU here), started
    and stopped by the sampler in the running server; the same video as the demo graph makes in one process."""
    api = json.loads((ROOT / "workflows" / "api" / "magi1_tiny_demo.json").read_text())
    sampler = next(node["inputs"] for node in api.values() if node["class_type"] == "MAGI1Sampler")
    api["40"] = {"class_type": "MAGI1MultiGPU", "inputs": {"model": sampler["model"], "gpus": 2, "cfg_parallel": 1}}
    sampler.update(model=["40", 0], seed=11)  # another seed than the demo's: not a cached result
    assert saved_video(server, run_prompt(server, api)) == (expected_frames(api), 64, 64)


def test_prefix_inputs_are_checked_at_queue_time(server):
    """Neither or both of start_image and prefix_video, or a prompt from 0.1.0 wiring images into the
    sampler: refused when queued, before anything runs."""
    neither = with_prefix(LOAD_IMAGE, ("start_image", ["33", 0]))
    del neither["31"]["inputs"]["start_image"]
    both = with_prefix({**LOAD_IMAGE, **LOAD_VIDEO}, ("start_image", ["33", 0]))
    both["31"]["inputs"]["prefix_video"] = ["32", 0]
    old = with_prefix(LOAD_IMAGE, ("start_image", ["33", 0]))
    del old["31"], old["6"]["inputs"]["prefix_latent"]
    old["6"]["inputs"].update(vae=["5", 0], start_image=["33", 0])  # the 0.1.0 sampler's inputs
    for api, node, message in ((neither, "31", "connect start_image (image-to-video) or prefix_video"),
                               (both, "31", "not both"), (old, "6", "no longer takes vae")):
        code, answer = post_refused(server.url, "/prompt", {"prompt": api, "client_id": "magi1-tests"})
        errors = answer["node_errors"][node]["errors"]
        assert code == 400 and any(message in error["details"] for error in errors), answer


def test_the_official_layout_is_one_dropdown_entry_that_runs(server):
    """A sharded checkpoint in the official layout is listed once, by its index (never its shards), the shipped
    workflows name exactly that entry, and a graph using it runs (the tiny model saved as official shards)."""
    options = get(server.url, "/object_info/MAGI1DiTLoader")["MAGI1DiTLoader"]["input"]["required"]["checkpoint"]
    choices = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert OFFICIAL_ENTRY in choices and not any("model-0000" in choice for choice in choices), choices
    for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] == "MAGI1DiTLoader":
                assert node["inputs"]["checkpoint"] in choices, (path.name, node["inputs"]["checkpoint"])
    api = json.loads((ROOT / "workflows" / "api" / "magi1_tiny_demo.json").read_text())
    loader = next(node["inputs"] for node in api.values() if node["class_type"] == "MAGI1DiTLoader")
    sampler = next(node["inputs"] for node in api.values() if node["class_type"] == "MAGI1Sampler")
    for checkpoint, seed in ((OFFICIAL_ENTRY, 21), (OFFICIAL_FOLDER + "/model-00002-of-00002.safetensors", 22)):
        loader["checkpoint"] = checkpoint  # the entry, and a shard a workflow saved before 0.8 names
        sampler["seed"] = seed  # not a cached result
        assert saved_video(server, run_prompt(server, api)) == (expected_frames(api), 64, 64)


def test_each_queue_time_problem_is_reported_on_its_own_input(server):
    """One wrong value, one error, on that input, in words that name the fix; ComfyUI's own message for a value
    that is not a number; dropdown values and NaN refused before anything runs."""
    def refused(changes):
        api = json.loads((ROOT / "workflows" / "api" / "magi1_tiny_demo.json").read_text())
        for class_type, name, value in changes:
            next(node for node in api.values() if node["class_type"] == class_type)["inputs"][name] = value
        code, answer = post_refused(server.url, "/prompt", {"prompt": api, "client_id": "magi1-tests"})
        assert code == 400, answer
        return {(error["extra_info"].get("input_name"), error["type"]): error["details"]
                for node in answer["node_errors"].values() for error in node["errors"]}

    errors = refused([("MAGI1Sampler", "steps", 5)])
    assert list(errors) == [("steps", "custom_validation_failed")] and "multiple of 4" in errors[("steps", "custom_validation_failed")]
    errors = refused([("MAGI1Sampler", "steps", 5), ("MAGI1Sampler", "width", 100)])
    assert sorted(name for name, _ in errors) == ["steps", "width"]
    errors = refused([("MAGI1Sampler", "steps", "abc")])
    assert list(errors) == [("steps", "invalid_input_type")], errors  # ComfyUI's conversion message
    errors = refused([("MAGI1Sampler", "guidance", "nan")])
    assert list(errors) == [("guidance", "custom_validation_failed")] and "finite" in str(errors)
    errors = refused([("MAGI1DiTLoader", "weight_dtype", "int8")])
    assert list(errors) == [("weight_dtype", "custom_validation_failed")] and "pick one of 'auto'" in str(errors)
    errors = refused([("MAGI1TinyTextEncode", "model", "huge"), ("MAGI1MotionDetailCache", "preset", "bogus")])
    assert sorted(name for name, _ in errors) == ["model", "preset"] and "'custom', 'slow', 'fast'" in str(errors)
    errors = refused([("MAGI1TinyTextEncode", "prompt", "0: a red ball\n1:a blue square")])
    assert list(errors) == [("prompt", "custom_validation_failed")] and "write '1: a blue square'" in str(errors)


def test_sampler_refuses_a_prefix_of_another_size(server):
    entry = run_prompt(server, with_prefix(LOAD_IMAGE, ("start_image", ["33", 0]), width=32, height=48))
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert errors and errors[0]["node_type"] == "MAGI1Sampler", entry["status"]
    assert errors[0]["exception_message"].startswith(
        "the prefix latent was encoded at 32x48 but the sampler makes 64x64: set MAGI-1 Encode Prefix's "
        "width/height to 64x64"), errors[0]["exception_message"]


def test_our_nodes_in_the_server_are_the_workflow_builders(server):
    """What the builder read from the schemas through the stand-ins (socket and widget order, defaults,
    output names) is what the real ComfyUI serves."""
    from comfy_stubs import node_schemas

    for node_id, schema in node_schemas().items():
        info = get(server.url, f"/object_info/{node_id}")[node_id]
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        assert order == [inp.id for inp in schema.inputs], node_id
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for inp in schema.inputs:
            if "default" in inp.options:
                assert declared[inp.id][1]["default"] == inp.options["default"], (node_id, inp.id)
            if inp.io_type != "COMBO":
                assert declared[inp.id][0] == inp.io_type, (node_id, inp.id)
        assert info["output"] == [out.io_type for out in schema.outputs], node_id
        assert info["output_name"] == [out.options.get("display_name") or out.io_type for out in schema.outputs]


def run_prompt(server, api, timeout=600):
    """POST an API graph (it must pass validation), then its /history entry once it has finished."""
    prompt_id = post(server.url, "/prompt", {"prompt": api, "client_id": "magi1-tests"})["prompt_id"]
    began, history = time.time(), {}
    while time.time() - began < timeout and not history:
        time.sleep(1)
        history = get(server.url, f"/history/{prompt_id}")
    return history[prompt_id]


def resident_mb(pid):
    """The process's resident memory now, in MB (Linux: /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def peak_while_running(server, api):
    """``(history entry, peak resident MB of the server)`` of one prompt, sampled every 0.1 s."""
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_mb(server.pid))
            time.sleep(0.1)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        return run_prompt(server, api), peak[0]
    finally:
        done.set()
        watcher.join()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc (Linux)")
def test_a_long_video_runs_at_flat_server_memory(server):
    """The minute-video workflow (one sampler, a prompt schedule, the streamed save): the server's peak memory
    making 720 frames is that of making 240 (the models loaded before either), and the mp4 has every frame."""
    api = json.loads((ROOT / "workflows" / "api" / "magi1_minute_video.json").read_text())
    sampler = next(k for k, node in api.items() if node["class_type"] == "MAGI1Sampler")
    peaks = {}
    for frames, seed in ((96, 1), (240, 2), (720, 3)):  # the first loads the models
        api[sampler]["inputs"].update(frames=frames, seed=seed)
        entry, peaks[frames] = peak_while_running(server, api)
        assert video_frames(server.output / saved_path(entry)) == (frames, 64, 64)
    print(f"server peak resident memory: {peaks}")
    assert peaks[720] <= peaks[240] * 1.1, peaks


def saved_path(entry):
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    videos = [item for output in entry["outputs"].values() for item in output.get("images", [])
              if str(item.get("filename", "")).endswith(".mp4")]
    assert len(videos) == 1, entry["outputs"]
    return Path(videos[0]["subfolder"]) / videos[0]["filename"]


def test_comfy_cli_runs_the_demo(server):
    comfy = Path(COMFYUI_PYTHON).parent / "comfy"
    if not comfy.exists():
        pytest.skip(f"needs comfy-cli (>= 1.23) beside {COMFYUI_PYTHON}")
    before = set(server.output.rglob("*.mp4"))
    for name, bump in (("magi1_tiny_demo.json", 1), ("api/magi1_tiny_demo.json", 2)):
        graph = json.loads((ROOT / "workflows" / name).read_text())
        if "nodes" in graph:  # UI format: the sampler's seed is its fifth widget value
            next(node for node in graph["nodes"] if node["type"] == "MAGI1Sampler")["widgets_values"][4] += bump
        else:
            next(node for node in graph.values() if node["class_type"] == "MAGI1Sampler")["inputs"]["seed"] += bump
        path = server.output.parent / f"cli_{bump}.json"  # another seed: not a cached result
        path.write_text(json.dumps(graph))
        done = subprocess.run([str(comfy), "--workspace", COMFYUI_DIR, "--skip-prompt", "run", "--workflow", str(path),
                               "--wait", "--port", str(server.port), "--timeout", "300"],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "DO_NOT_TRACK": "1"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    made = set(server.output.rglob("*.mp4")) - before
    assert len(made) == 2, made
