"""Token-block mode (``MagiDiT.set_token_block``): each layer's per-token work in blocks of tokens. Against
the whole call on random weights (dense with the KV cache, sparse, two sequences, context parallel), and
its planned (``dit_activation_bytes(token_block=)``) and measured activation peak.

Measured here (2-core CPU, torch 2.13): float32 differs from the whole call by at most 6e-7 relative (norm
of the difference over the norm), bfloat16 (also with official fp8 weights) by at most 1.2e-4 (a block of
1 token); blocks holding every token give exactly the whole call's values by construction (the same
kernels on the same shapes). Smaller blocks often give equal values too (multiples of 4 tokens here), but
that depends on the BLAS kernels, so only the tolerance is asserted for them.
"""

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import magi1
from magi1 import random_dit
from run_request import generate, memory_plan
from magi1.sampling.layout import VideoLayout
from magi1.planning.memory_plan import WindowCalls, dit_activation_bytes, window_calls
from pipeline_fixtures import load, relative_error, request
from test_dit_sparse import CHUNKS, CONFIG, CT, SLICE, cache_with_clean_prefix, window_inputs
from test_memory_plan import CONFIG_24B, CONFIG_4_5B, LiveBytes

BLOCKS = [1, 7, 24, 40, 1000]  # 24 = CT: 7 and 40 do not divide a chunk, 1000 holds every token (96)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}  # measured: 6e-7 and 1.2e-4
MODELS = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "fp8_official")]


@pytest.fixture(scope="module")
def models():
    return {(dtype, weights): random_dit(dict(CONFIG, num_layers=3), seed=11, dtype=dtype, weights=weights)
            for dtype, weights in MODELS}


def call(kind):
    """Forward arguments of a call of ``kind``; the cached ones get a fresh cache per forward."""
    inputs = window_inputs(1)
    if kind == "two_sequences":  # no cache: the window's own keys only
        g = torch.Generator().manual_seed(3)
        return dict(inputs, x=torch.randn(2, *inputs["x"].shape[1:], generator=g), t=inputs["t"].repeat(2, 1),
                    caption=inputs["caption"].repeat(2, 1, 1, 1), caption_mask=inputs["caption_mask"].repeat(2, 1, 1),
                    kv_range=[(SLICE * CT, (SLICE + j + 1) * CT) for j in range(CHUNKS)])
    inputs.update(kv_write_chunks=CHUNKS)
    if kind == "sparse":  # uneven chunk runs, one of them empty
        g = torch.Generator().manual_seed(4)
        inputs["active"] = [torch.randperm(CT, generator=g)[:7].sort().values, None, torch.tensor([], dtype=torch.long),
                            torch.randperm(CT, generator=g)[:13].sort().values]
    return inputs


def forward(model, inputs, block):
    """The call's velocities and the keys/values it leaves in its cache (None without one)."""
    model.set_token_block(block)
    try:
        cache = cache_with_clean_prefix(model, 5) if "kv_write_chunks" in inputs else None
        out = model(**inputs, kv_cache=cache)
    finally:
        model.set_token_block(None)
    return out, None if cache is None else torch.stack(cache.keys + cache.values)


@pytest.mark.parametrize("dtype,weights", MODELS)
@pytest.mark.parametrize("kind", ["cached", "sparse", "two_sequences"])
def test_blocks_give_the_whole_call_up_to_rounding(models, dtype, weights, kind):
    model, inputs = models[dtype, weights], call(kind)
    whole, whole_cache = forward(model, inputs, None)
    for block in BLOCKS:
        out, cache = forward(model, inputs, block)
        assert relative_error(out, whole) <= TOLERANCE[dtype], block
        if cache is not None:
            assert relative_error(cache, whole_cache) <= TOLERANCE[dtype], block
        if block >= CHUNKS * CT:  # one block: the same operations as the whole call
            assert torch.equal(out, whole) and (cache is None or torch.equal(cache, whole_cache))


def test_set_token_block_checks_its_argument(models):
    model = models[torch.float32, None]
    for bad in (0, -4, 2.5, True, "64"):
        with pytest.raises(ValueError, match="token_block must be a positive integer or None"):
            model.set_token_block(bad)
    model.set_token_block(64)
    assert model.token_block == 64
    model.set_token_block(None)
    assert model.token_block is None


def test_the_stop_check_is_polled_between_blocks(models):
    model, polls = models[torch.float32, None], {None: [], 24: []}
    for block in polls:
        forward(model, dict(call("cached"), stop=lambda seen=polls[block]: seen.append(1)), block)
    # 96 tokens in 4 blocks: 3 polls between blocks in each of the 3 passes over them, in each of the 3 layers
    assert len(polls[24]) - len(polls[None]) == 3 * 3 * 3


# --------------------------------------------------------------------------------------- context parallel
def _context_parallel_worker(rank, world, port, out_dir, block):
    from magi1.weights.layer_sharding import distribute
    from magi1.distributed.parallel import Parallel
    from parallel_harness import lonely_request, uneven_forward, uneven_request
    torch.set_num_threads(1)
    par = Parallel.start(rank, world, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        out = {}
        for name, make in (("uneven", uneven_request), ("lonely", lonely_request)):
            model, inputs = make()
            distribute(model, par)
            model.set_token_block(block)
            out[name] = uneven_forward(model, inputs)
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "out.pt"))
    finally:
        par.close()


@pytest.mark.parametrize("world,block", [(2, 3), (3, 4)])
def test_context_parallel_blocks_match_one_whole_process(world, block):
    """Each rank's share of an uneven sparse call (20 tokens: 7, 8, 5 per chunk) and of a one-token call (a
    rank without tokens) in blocks crossing chunk boundaries at other places on every rank."""
    from magi1.distributed.workers import free_port
    from parallel_harness import lonely_request, uneven_forward, uneven_request
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_context_parallel_worker, args=(world, free_port(), out_dir, block), nprocs=world, join=True)
        out = torch.load(os.path.join(out_dir, "out.pt"))
    for name, make in (("uneven", uneven_request), ("lonely", lonely_request)):
        assert relative_error(out[name], uneven_forward(*make())) < 1e-5, name


# ----------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("config,height,width,cache",
                         [(CONFIG_24B, 720, 1280, "off"), (CONFIG_4_5B, 720, 720, "token")])
def test_planned_peak_falls_with_the_block(config, height, width, cache):
    layout = VideoLayout.plan(96, height, width, patch_size=config.patch_size)
    calls = window_calls(layout, passes=1, reuse=cache)
    peaks = [dit_activation_bytes(config, layout, calls, token_block=block) for block in (None, 16384, 8192, 4096)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < 0.4 * peaks[0]
    with pytest.raises(ValueError, match="token_block must be a positive integer or None"):
        dit_activation_bytes(config, layout, calls, token_block=0)
    # A block as large as the call: every per-token temporary counted for every token, as by default.
    one_block = dit_activation_bytes(config, layout, WindowCalls(1, 1, False), token_block=layout.tokens_per_chunk)
    assert one_block >= 0.9 * dit_activation_bytes(config, layout, WindowCalls(1, 1, False))


@pytest.mark.parametrize("name,dtype,block", [("distill45", torch.float32, 16), ("distill24", torch.float32, 64),
                                              ("distill45", torch.bfloat16, 64)])
def test_measured_peak_falls_and_stays_under_the_plan(name, dtype, block):
    """As test_memory_plan's measured peak (everything a generation allocates, 5 chunks of 96 tokens), with
    the model in token-block mode: lower than without, below the plan with ``token_block``, and not far below."""
    description, tensors, model = load(name)
    if dtype != torch.float32:
        model, model.distill = magi1.random_dit(model.config, dtype=dtype), model.distill
    args = request(description, tensors)
    args.update(frames=4 * 2 * 5, height=64, width=96, noise=None, prefix=None, steps=4,
                caption=args["caption"][:1], caption_mask=args["caption_mask"][:1])
    plan = memory_plan(model.config, args["frames"], args["height"], args["width"], compute_dtype=dtype,
                       weight_dtype=str(dtype)[6:], passes=1, chunk_width=args["chunk_width"],
                       window_size=args["window_size"], decode=False)
    calls = window_calls(plan.layout, passes=1, window_size=args["window_size"])
    activations = dit_activation_bytes(model.config, plan.layout, calls, compute_dtype=dtype, token_block=block)
    planned = plan.kv_on_gpu + plan.policy_state + max(activations, plan.policy_transient)
    peaks = []
    for mode in (None, block):
        model.set_token_block(mode)
        with LiveBytes() as live:
            generate(model, **args)
        peaks.append(live.peak)
    model.set_token_block(None)
    assert planned < plan.dit_phase - plan.weights_on_gpu and peaks[1] < peaks[0]
    assert 0.6 * planned < peaks[1] <= planned, (peaks, planned)


def test_configure_is_the_one_way_to_change_how_a_model_runs():
    model = random_dit(dict(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=1,
                            kv_channels=32, caption_channels=16, caption_max_length=8), seed=0)
    before = model.configure(token_block=256, attention_backend="sdpa", execution_device="cpu")
    assert before == dict(token_block=None, attention_backend="auto", execution_device=None)
    assert (model.token_block, model.attention_backend, model.device) == (256, "sdpa", torch.device("cpu"))
    model.configure(**before)
    assert (model.token_block, model.attention_backend, model.execution_device) == (None, "auto", None)
    with pytest.raises(ValueError, match="configure takes"):
        model.configure(distill=True)  # what a model is comes from its loader, not a setting
    with pytest.raises(ValueError, match="token_block must be a positive integer"):
        model.configure(token_block=0)
