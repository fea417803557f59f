"""The whole generations that pin the sampler's behaviour across refactors (see
``tests/fixtures/make_regression.py``): the demo, and cached 3-pass and 1-pass runs on the official
pipeline fixtures, with prefixes, a negative prompt and masks.

The recorded latents depend on the CPU's intra-op thread count (a reduction split over more or fewer
threads sums in another order), so every case runs, and was recorded, with RECORDED_THREADS threads,
whatever OMP_NUM_THREADS or the machine's core count says."""

from contextlib import contextmanager

import torch

from cache_core import CachePolicy
from run_request import generate
from pipeline_fixtures import load, request


def _policy(mode, tau, **kw):
    return CachePolicy(**{"mode": mode, "tau": tau, "warmup_steps": 1, "chunk_wise_steps": 2,
                          "final_full_steps": 1, **kw})


def _fixture(config, policy, **changes):
    description, tensors, model = load(config)
    args = {**request(description, tensors), **changes}
    if "seed" in changes:
        args.pop("noise")
    return generate(model, **args, policy=policy, record_masks=True)


def _demo():
    from cache_core import PRESET_SCHEDULE, CachePolicy
    from demo import sample  # the repository root is on the path in tests and in the recorder
    from magi1.builtin import TINY

    # the slow preset as it was when the case was recorded (0.3.x): the case guards the code, not the preset
    return sample(model=TINY, policy=CachePolicy(mode="motion_detail", tau=0.04, **PRESET_SCHEDULE))[0]


def _base_motion_detail_negative():
    description, tensors, _ = load("base")
    caption = request(description, tensors)["caption"]
    return _fixture("base", _policy("motion_detail", 0.3), negative_caption=caption.flip(-1),
                    negative_mask=request(description, tensors)["caption_mask"])


def _distill45_continuation():
    description, tensors, model = load("distill45")
    args = request(description, tensors)
    prefix = torch.randn(16, 8, *args["noise"].shape[2:], generator=torch.Generator().manual_seed(3))
    return _fixture("distill45", _policy("motion", 0.05, proxy="latent"), prefix=prefix, seed=5)


CASES = {
    "demo": _demo,  # python demo.py on the tiny model: its example prompt, seed 0, the 0.3 slow preset
    "base_motion_detail_negative": _base_motion_detail_negative,  # 3 passes, token reuse, negative prompt
    "base_i2v_flowcache": lambda: _fixture("base_i2v", _policy("flowcache", 0.05)),  # 3 passes, image prefix
    "distill45_motion_detail": lambda: _fixture("distill45", _policy("motion_detail", 0.05)),  # 1 pass
    "distill24_teacache": lambda: _fixture("distill24", _policy("teacache", 0.05)),
    "distill45_continuation": _distill45_continuation,  # 1 pass, a prefix video of 8 latent frames
}


RECORDED_THREADS = 2  # torch.set_num_threads works above OMP_NUM_THREADS and the core count too


@contextmanager
def recorded_threads():
    """Run with the thread count the fixtures were recorded with; the caller's is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_case(name):
    with recorded_threads(), torch.no_grad():
        return CASES[name]()


def describe(stats):
    """What a run's statistics say, as plain JSON values."""
    return {
        "flops": stats.flops,
        "dense_flops": stats.dense_flops,
        "model_calls": stats.model_calls,
        "kv_cache_bytes": stats.kv_cache_bytes,
        "records": [[r.step, r.chunk, r.chunk_step, r.t, r.phase, r.action, r.n_active, r.n_tokens]
                    for r in stats.records],
    }
