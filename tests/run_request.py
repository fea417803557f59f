"""The tests' keyword form of the functions that take a ``magi1.VideoRequest``: ``generate(model, caption,
caption_mask, frames=..., policy=..., on_step=...)``, ``memory_plan(config, frames, height, width, ...)``,
``run_flops`` / ``estimate_run(config, frames=..., passes=...)`` put the request's fields in a
``VideoRequest`` and pass the rest on, so that a test names only what it varies."""

import dataclasses

import magi1
from cache_core import CachePolicy
from magi1 import VideoRequest
from magi1.planning import run_time

REQUEST_FIELDS = {f.name for f in dataclasses.fields(VideoRequest)}
# A policy of each kind the memory plan tells apart (``VideoRequest.reuse``).
REUSE_POLICIES = {"off": None, "chunk": CachePolicy(mode="flowcache"), "token": CachePolicy.slow()}


def split(options):
    """``(VideoRequest of the request's fields, the other options)``."""
    fields = {name: value for name, value in options.items() if name in REQUEST_FIELDS}
    return VideoRequest(**fields), {name: value for name, value in options.items() if name not in REQUEST_FIELDS}


def request_of(caption=None, caption_mask=None, **fields):
    return VideoRequest(caption=caption, caption_mask=caption_mask, **fields)


def generate(model, caption=None, caption_mask=None, **options):
    request, hooks = split(dict(options, caption=caption, caption_mask=caption_mask))
    return magi1.generate(model, request, **hooks)


def memory_plan(config, frames, height, width, *, reuse="off", **options):
    """The plan of a request whose policy keeps ``reuse`` ("off", "chunk" or "token")."""
    request, plan_options = split(dict(options, frames=frames, height=height, width=width,
                                       policy=REUSE_POLICIES[reuse]))
    return magi1.memory_plan(config, request, **plan_options)


def run_flops(config, **options):
    request, other = split(options)
    return run_time.run_flops(config, request, **other)


def estimate_run(config, **options):
    request, other = split(options)
    return run_time.estimate_run(config, request, **other)
