"""How soon an interrupt stops a generation: the tiny model at 2048x2048 (98,304 tokens a chunk), the
interrupt raised from another thread after a few seconds, the time until ``generate`` has stopped and
released its buffers. Before the stop check inside the DiT, an interrupt was only seen between steps
(152 s at this size in issue 20's report).

    python -m bench.speed.interrupt_latency            # prints the latency (bench/results/interrupt_latency.txt)
"""

from __future__ import annotations

import gc
import threading
import time

import magi1
from magi1 import VideoRequest, chunk_captions, generate
from magi1 import builtin

SIZE = 2048


class Interrupted(Exception):
    pass


def measure(after_seconds, size=SIZE):
    model = builtin.TINY
    dit = model.load_dit()
    states, mask = model.load_text_encoder().encode(model.example_prompt)
    caption, caption_mask = chunk_captions(states, mask, 1, model.special_tokens(), length=dit.config.caption_max_length)
    flag = threading.Event()
    raised = {}

    def stop():
        if flag.is_set():
            raised.setdefault("at", time.perf_counter())
            raise Interrupted

    timer = threading.Timer(after_seconds, lambda: (raised.setdefault("set", time.perf_counter()), flag.set()))
    began = time.perf_counter()
    timer.start()
    try:
        request = VideoRequest(frames=24, height=size, width=size, steps=4, caption=caption, caption_mask=caption_mask)
        generate(dit, request, stop=stop)
    except Interrupted:
        pass
    gc.collect()
    done = time.perf_counter()
    return raised["set"] - began, done - raised["set"], raised.get("at", done) - raised["set"]


if __name__ == "__main__":
    layout = magi1.VideoLayout.plan(24, SIZE, SIZE)
    print(f"tiny model, {SIZE}x{SIZE}, 24 frames: {layout.tokens_per_chunk} tokens a chunk")
    for after in (3.0, 8.0):
        ran, stopped, seen = measure(after)
        print(f"interrupt after {ran:.1f} s: seen {seen:.2f} s later, generate returned {stopped:.2f} s later")
