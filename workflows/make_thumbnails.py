"""Thumbnails for ComfyUI's template browser: one ``<name>.jpg`` beside every ``workflows/<name>.json``.

    python workflows/make_thumbnails.py            # every workflow (run again after adding one)
    python workflows/make_thumbnails.py magi1_tiny_demo.json

ComfyUI lists a custom-node pack's ``workflows/*.json`` under ``/api/workflow_templates`` and shows the
same-name ``.jpg`` as its card. Each thumbnail is a grid of four frames of a real output, generated here on
the CPU with the pack's built-in models (a few seconds each):

- a workflow that runs a built-in model (it has a MAGI-1 Tiny Text Encode node) shows that model's video
  for the workflow's own prompt, frame count and seed;
- a workflow for the official checkpoints shows the tiny model's video for a prompt of the tiny model's
  vocabulary, and says so on the image ("tiny model output"): the official weights are not here.

Needs Pillow (a dependency of matplotlib, in the test extras; ComfyUI brings it too). Run from anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the pack's root: magi1, cache_core, demo

# Tiny-model prompts for the official-model workflows, chosen to echo each workflow's idea. A workflow not
# named here gets one of FALLBACK_PROMPTS, picked by a hash of its name (stable between runs).
OFFICIAL_PROMPTS = {
    "magi1_text_to_video": "a yellow ball moving right over a grassy field",
    "magi1_image_to_video": "a red square bouncing in front of a blue sky, the camera pans left",
    "magi1_video_continuation": "a green triangle moving left over a striped wall",
}
FALLBACK_PROMPTS = (
    "a red ball moving right over a checkerboard",
    "a purple square spinning over a gray wall",
    "an orange ball growing over a checkerboard",
    "a white triangle moving up over a grassy field",
)
TILE = 256  # each frame is scaled (nearest) to this many pixels a side
MAX_FRAMES = 96  # longer workflows are previewed on their first 96 frames (4 chunks)
BAR = 44  # caption strip height


def _widgets(workflow, node_type):
    """The widget values of the first node of ``node_type`` in a UI-format workflow, or None."""
    for node in workflow.get("nodes", []):
        if node.get("type") == node_type:
            return node.get("widgets_values") or []
    return None


def _first_prompt(text):
    """A prompt-schedule text (``0-1: ...`` lines) reduced to its first prompt; a plain prompt unchanged."""
    for line in text.splitlines():
        line = re.sub(r"^\s*[\d\s,\-:*]+:\s*", "", line).strip()
        if line:
            return line
    return text.strip()


def plan(path):
    """What to generate for the workflow at ``path``: ``dict(model, prompt, frames, seed, label)``."""
    workflow = json.loads(Path(path).read_text())
    name = Path(path).stem
    sampler = _widgets(workflow, "MAGI1Sampler") or []
    tiny_text = _widgets(workflow, "MAGI1TinyTextEncode")
    if tiny_text and isinstance(tiny_text[0], str):
        model = tiny_text[1] if len(tiny_text) > 1 and tiny_text[1] in ("tiny", "bench") else "tiny"
        frames = sampler[2] if len(sampler) > 2 and isinstance(sampler[2], int) else 48
        seed = sampler[4] if len(sampler) > 4 and isinstance(sampler[4], int) else 0
        frames = max(24, min(frames, MAX_FRAMES))
        label = f"{name}: {'built-in benchmark' if model == 'bench' else 'built-in tiny'} model output"
        if sum(node.get("type") == "MAGI1Sampler" for node in workflow.get("nodes", [])) > 1:
            label += " (first segment)"  # the first sampler's prompt, frames and seed
        return dict(model=model, prompt=_first_prompt(tiny_text[0]), frames=frames, seed=seed, label=label)
    prompt = OFFICIAL_PROMPTS.get(name)
    if prompt is None:
        pick = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(FALLBACK_PROMPTS)
        prompt = FALLBACK_PROMPTS[pick]
    return dict(model="tiny", prompt=prompt, frames=48, seed=0,
                label=f"{name}: tiny model output (official weights not run)")


def frame_grid(video, label):
    """``[3, F, H, W]`` in [-1, 1] -> a PIL image: frames at 1/8, 3/8, 5/8, 7/8 in a 2x2 grid, a caption
    strip below."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    count = video.shape[1]
    picks = [min(count - 1, int(count * q / 8)) for q in (1, 3, 5, 7)]
    pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    sheet = Image.new("RGB", (2 * TILE, 2 * TILE + BAR), (18, 18, 18))
    for slot, index in enumerate(picks):
        tile = Image.fromarray(pixels[index]).resize((TILE, TILE), Image.NEAREST)
        sheet.paste(tile, ((slot % 2) * TILE, (slot // 2) * TILE))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    frames = ", ".join(str(i + 1) for i in picks)
    draw.text((8, 2 * TILE + 5), label, fill=(235, 235, 235), font=font)
    draw.text((8, 2 * TILE + 24), f"frames {frames} of {count}", fill=(170, 170, 170), font=font)
    return sheet


def make(path):
    """Generate and write ``path``'s thumbnail (same name, ``.jpg``); returns the thumbnail's path."""
    from demo import sample
    from magi1.builtin import MODELS

    job = plan(path)
    model = MODELS[job["model"]]
    result, vae = sample(job["prompt"], frames=job["frames"], seed=job["seed"], model=model)
    video = vae.decode(result.latent)
    out = Path(path).with_suffix(".jpg")
    frame_grid(video, job["label"]).save(out, "JPEG", quality=88)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write workflows/<name>.jpg for every workflows/<name>.json.")
    parser.add_argument("workflows", nargs="*", help="workflow files (default: every workflows/*.json)")
    args = parser.parse_args(argv)
    paths = [Path(p) if Path(p).exists() else HERE / p for p in args.workflows] or sorted(HERE.glob("*.json"))
    for path in paths:
        began = time.perf_counter()
        out = make(path)
        print(f"wrote {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out} "
              f"({plan(path)['label']}) in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
