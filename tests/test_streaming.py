"""Layer streaming ("block swap", ``magi1.weights.streaming``): streamed models give bit-identical outputs to
resident ones, for single forwards (dense and sparse), whole generations and after interrupted calls;
the bookkeeping (how many layers are on the device, host copies, remove) holds. The CPU runs the same
logic with clones; the CUDA test (streams, memory) skips without a GPU."""

import gc

import pytest
import torch

import magi1
import run_request
from cache_core import CachePolicy
from magi1 import KVCache
from magi1.weights.streaming import stream_layers, streamed_device_bytes
from pipeline_fixtures import load, request

LAYERS = 4
CONFIG = dict(num_layers=LAYERS, hidden_size=64, ffn_hidden_size=64, num_attention_heads=8, num_query_groups=2,
              kv_channels=8, caption_channels=24, caption_max_length=12, in_channels=16, out_channels=16,
              apply_layernorm_1p=True)
FRAMES, HEIGHT, WIDTH, CHUNKS = 2, 4, 6, 2
CT = FRAMES * (HEIGHT // 2) * (WIDTH // 2)


def model(config=CONFIG, seed=7, **kw):
    return magi1.random_dit(config, seed=seed, **kw).eval()


def inputs(seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, CHUNKS, 12, dtype=torch.bool)
    mask[0, 0, :5] = mask[0, 1, :9] = True
    args = dict(x=torch.randn(1, 16, CHUNKS * FRAMES, HEIGHT, WIDTH, generator=g), t=torch.tensor([[0.6, 0.2]]),
                caption=torch.randn(1, CHUNKS, 12, 24, generator=g), caption_mask=mask,
                kv_range=[(0, CT), (0, 2 * CT)])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()}


def calls(dit, device="cpu"):
    """A dense call writing the cache, a sparse call reading it, and an N=2 call: their outputs and the cache."""
    with torch.no_grad():
        cache = KVCache.for_model(dit, CHUNKS * CT)
        args = inputs(device=device)
        dense = dit(**args, kv_cache=cache, kv_write_chunks=CHUNKS)
        active = [torch.arange(0, CT, 3, device=device), None]
        sparse = dit(**args, kv_cache=cache, kv_write_chunks=CHUNKS, active=active)
        pair = {k: torch.cat([v, v.flip(0) + 0.1]) if k in ("x", "caption") else v for k, v in args.items()}
        pair["t"], pair["caption_mask"] = args["t"].repeat(2, 1), args["caption_mask"].repeat(2, 1, 1)
        batch = dit(**pair, unconditional=True)
    return [dense, sparse, batch] + cache.keys + cache.values


def assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def assert_streamed_layers_on_host(streamer, dit):
    for index in streamer.streamed:
        layer = dit.videodit_blocks.layers[index]
        for name, host in streamer.host_copies(index).items():
            assert layer.get_parameter(name).data_ptr() == host.data_ptr(), name


@pytest.fixture(scope="module")
def reference():
    return calls(model())


@pytest.mark.parametrize("resident", [0, 1, 2, 3])
def test_streamed_forwards_equal_the_resident_model(reference, resident):
    dit = model()
    streamer = stream_layers(dit, "cpu", resident)
    assert streamer.streamed == list(range(resident, LAYERS))
    assert_same(calls(dit), reference)
    assert_same(calls(dit), reference)  # and again: the hooks serve every call
    assert streamer.max_resident == resident + min(2, LAYERS - resident)
    assert streamer.resident_now == resident
    assert_streamed_layers_on_host(streamer, dit)


def test_resident_layers_covering_the_model_stream_nothing(reference):
    dit = model()
    streamer = stream_layers(dit, "cpu", LAYERS + 3)
    assert streamer.streamed == [] and not streamer._hooks
    assert_same(calls(dit), reference)
    assert streamer.max_resident == streamer.resident_now == LAYERS
    with pytest.raises(ValueError, match="resident_layers"):
        stream_layers(model(), "cpu", -1)


def test_remove_restores_a_resident_model(reference):
    dit = model()
    streamer = stream_layers(dit, "cpu", 1)
    with pytest.raises(RuntimeError, match="already streams"):
        stream_layers(dit, "cpu", 2)
    calls(dit)
    streamer.remove()
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in dit.modules()]
    assert sum(hooks) == 0
    assert_same(calls(dit), reference)
    stream_layers(dit, "cpu", 2).remove()  # it can be streamed again


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_call_stopped_midway_leaves_a_working_model(reference, error):
    """An exception in a streamed layer (an interrupt) on the 2nd call: the model stays consistent and
    the next calls give the same outputs. KeyboardInterrupt skips the always-called hooks; the next
    call cleans up instead."""
    dit = model()
    streamer = stream_layers(dit, "cpu", 1)
    layer = dit.videodit_blocks.layers[2]
    seen = []

    def flaky(*args, **kw):
        seen.append(1)
        if len(seen) == 2:
            raise error("stop")
        return type(layer).forward(layer, *args, **kw)

    layer.forward = flaky
    with torch.no_grad():
        dit(**inputs())
        with pytest.raises(error):
            dit(**inputs())
    if error is RuntimeError:
        assert streamer.resident_now == 1
        assert_streamed_layers_on_host(streamer, dit)
    del layer.forward
    assert_same(calls(dit), reference)
    assert streamer.resident_now == 1 and streamer.max_resident == 3
    assert_streamed_layers_on_host(streamer, dit)


def test_a_failed_call_set_up_releases_the_prefetch():
    dit = model()
    streamer = stream_layers(dit, "cpu", 2)
    bad = inputs()
    bad["kv_range"] = [(0, CT)]
    with torch.no_grad(), pytest.raises(ValueError, match="kv_range"):
        dit(**bad)
    assert streamer.resident_now == 2
    assert_streamed_layers_on_host(streamer, dit)


def test_streaming_is_for_inference():
    dit = model().requires_grad_(True)
    stream_layers(dit, "cpu", 1)
    with pytest.raises(RuntimeError, match="inference"):
        dit(**inputs())
    with torch.inference_mode():
        out = dit(**inputs())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("config, resident", [("base", 0), ("distill45", 1), ("distill45", 2)])
def test_streamed_generation_equals_resident(config, resident):
    """Whole generations (CFG passes on base, the KV cache, a reuse policy's sparse calls)."""
    description, tensors, _ = load(config)
    args = request(description, tensors)
    config_dict = {**description["model_config"], "num_layers": LAYERS}

    def run(streamed):
        dit = model(config_dict, seed=3)
        dit.distill = description["engine_config"]["distill"]
        streamer = stream_layers(dit, "cpu", resident) if streamed else None
        policy = CachePolicy(mode="motion_detail", tau=0.05, warmup_steps=1, chunk_wise_steps=2, final_full_steps=1)
        return run_request.generate(dit, **args, policy=policy), streamer

    (plain, _), (streamed, streamer) = run(False), run(True)
    assert torch.equal(streamed.latent, plain.latent)
    assert plain.stats.computed_fraction < 1.0  # sparse calls were made
    assert streamer.max_resident == resident + 2 and streamer.resident_now == resident


def test_device_bytes_plan():
    meta = magi1.build_dit(CONFIG, device="meta")
    total = sum(p.numel() * p.element_size() for p in meta.parameters())
    layer = sum(p.numel() * p.element_size() for p in meta.videodit_blocks.layers[0].parameters())
    rest = total - LAYERS * layer
    assert streamed_device_bytes(meta, LAYERS) == streamed_device_bytes(meta, 9) == total
    assert streamed_device_bytes(meta, 0) == rest + 2 * layer
    assert streamed_device_bytes(meta, 1) == rest + 3 * layer
    assert streamed_device_bytes(meta, 3) == total
    assert streamed_device_bytes(meta, 0, in_flight=1) == rest + layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (streams, pinned memory, peak memory)")
def test_cuda_streaming_equals_resident_with_less_memory():
    config = dict(CONFIG, num_layers=8, hidden_size=512, ffn_hidden_size=2048, kv_channels=64)

    def peak(dit):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = calls(dit, "cuda")
        torch.cuda.synchronize()
        return [o.cpu() for o in out], torch.cuda.max_memory_allocated()

    resident = model(config, device="cuda")
    plain, plain_peak = peak(resident)
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    dit = model(config)
    streamer = stream_layers(dit, "cuda", 1)
    assert all(h.is_pinned() for h in streamer.host_copies(1).values())
    streamed, streamed_peak = peak(dit)
    assert_same(streamed, plain)
    assert streamer.max_resident == 3 and streamer.resident_now == 1
    assert streamed_peak < plain_peak
    streamer.remove()
    assert all(p.is_cuda for p in dit.parameters())
    restored, _ = peak(dit)
    assert_same(restored, plain)


def test_load_dit_can_stream_its_layers(tmp_path):
    """load_dit(..., resident_layers=k): the model comes back streaming, with a resident model's outputs."""
    import json

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model().state_dict().items()}, str(tmp_path / "m.safetensors"),
              metadata={"magi1_model_config": json.dumps(CONFIG)})
    resident = magi1.load_dit(tmp_path / "m.safetensors")
    streamed = magi1.load_dit(tmp_path / "m.safetensors", resident_layers=1)
    streamer = streamed._layer_streamer
    assert streamer.streamed == list(range(1, LAYERS))
    assert_same(calls(streamed), calls(resident))
    assert streamer.max_resident == 3
