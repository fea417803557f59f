"""Writes the example workflows: each graph once, as a UI-format (0.4) file in ``workflows/`` and its
API-format twin in ``workflows/api/``.

    python workflows/build_workflows.py

Our nodes' inputs, widget order and defaults come from their schemas, read through the ComfyUI stand-ins
of the tests (``tests/comfy_stubs.py``; no ComfyUI needed); a graph gives only the values that differ
from the defaults. ``tests/test_workflows.py`` checks every pair independently (UI converted to API with
the nodes' own schemas); a ComfyUI checkout checks the stock nodes' widget order and runs the demo.
Node ids are kept from one version to the next (saved edits and API prompts name them); a new node
takes an id no example has used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACK_ID = "magi1-motiondetailcache"  # the registry id (pyproject [project] name)


@dataclass
class NodeType:
    sockets: list  # [(input name, type)] in schema order
    widgets: list  # widget names in schema order
    outputs: list  # [(output name, type)]
    defaults: dict = field(default_factory=dict)  # widget name -> default value
    extras: dict = field(default_factory=dict)  # widget name -> a UI-only value after it; API files leave it out


def _our_node_types():
    """Our nodes' sockets, widgets (names, order, defaults) and outputs, read from their schemas through
    the ComfyUI stand-ins of the tests (no ComfyUI needed), so that nothing here is retyped."""
    spec = importlib.util.spec_from_file_location("magi1_workflow_stubs", os.path.join(ROOT, "tests", "comfy_stubs.py"))
    stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubs)
    types = {}
    for node_id, schema in stubs.node_schemas().items():
        widgets = [inp for inp in schema.inputs if inp.kind in stubs.WIDGET_KINDS]
        types[node_id] = NodeType(
            sockets=[(inp.id, inp.io_type) for inp in schema.inputs if inp.kind not in stubs.WIDGET_KINDS],
            widgets=[inp.id for inp in widgets],
            outputs=[(out.options.get("display_name") or out.io_type, out.io_type) for out in schema.outputs],
            defaults={inp.id: inp.options["default"] for inp in widgets if "default" in inp.options},
            # seed's "control after generate": fixed, so that an example makes the same video every time
            extras={inp.id: "fixed" for inp in widgets if inp.options.get("control_after_generate")})
    return types


# Stock nodes, which have no schema here (tests/test_comfyui.py checks their widgets against a ComfyUI).
STOCK_TYPES = {
    "CLIPLoader": NodeType([], ["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "LoadImage": NodeType([], ["image"], [("IMAGE", "IMAGE"), ("MASK", "MASK")], extras={"image": "image"}),
    "LoadVideo": NodeType([], ["file"], [("VIDEO", "VIDEO")], extras={"file": "image"}),  # the upload button
    "GetVideoComponents": NodeType([("video", "VIDEO")], [], [("images", "IMAGE"), ("audio", "AUDIO"),
                                                              ("fps", "FLOAT")]),
    "CreateVideo": NodeType([("images", "IMAGE"), ("audio", "AUDIO")], ["fps"], [("VIDEO", "VIDEO")]),
    "SaveVideo": NodeType([("video", "VIDEO")], ["filename_prefix", "format", "codec"], []),
    "PreviewImage": NodeType([("images", "IMAGE")], [], []),
    "PreviewAny": NodeType([("source", "*")], [], []),
    "ImageBatch": NodeType([("image1", "IMAGE"), ("image2", "IMAGE")], [], [("IMAGE", "IMAGE")]),
    "LatentConcat": NodeType([("samples1", "LATENT"), ("samples2", "LATENT")], ["dim"], [("LATENT", "LATENT")]),
    "MarkdownNote": NodeType([], ["text"], []),  # frontend only: not in API files
}
NODE_TYPES = {**_our_node_types(), **STOCK_TYPES}
FRONTEND_ONLY = {"MarkdownNote"}

T5 = {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
      "url": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"}
VAE = {"name": "magi1_vae.safetensors", "directory": "vae",
       "url": "https://huggingface.co/sand-ai/MAGI-1/resolve/main/ckpt/vae/diffusion_pytorch_model.safetensors"}
DIT_4_5B_DISTILL = "4.5B_distill/inference_weight.distill/model.safetensors.index.json"
TINY = "MAGI-1 tiny demo (built-in)"
BENCHMARK_MODEL = "MAGI-1 benchmark model (built-in, 128x128)"
MODEL_FILES_NOTE = (
    "### Model files\n\n"
    "- **DiT**: the folder `ckpt/magi/4.5B_distill` of [sand-ai/MAGI-1](https://huggingface.co/sand-ai/MAGI-1) "
    "into `models/diffusion_models/` (pick its `model.safetensors.index.json`).\n"
    "- **VAE**: `ckpt/vae/diffusion_pytorch_model.safetensors` from the same repository, saved as "
    "`models/vae/magi1_vae.safetensors`.\n"
    "- **T5**: `t5xxl_fp16.safetensors` in `models/text_encoders/`, loaded with CLIPLoader type *mochi*.\n"
    "- **Special tokens**: `example/assets/special_tokens.npz` of "
    "[SandAI-org/MAGI-1](https://github.com/SandAI-org/MAGI-1) in `models/text_encoders/` (MAGI-1 DiT "
    "Loader reads it).\n\n"
    "MAGI-1 makes 24 frames per chunk at 24 fps; width and height are multiples of 16.")

MEMORY_NOTE = (
    "\n\n### Memory\n\n"
    "This run (4.5B distill, 720x720, 96 frames, cache slow) plans 22.8 GB of GPU memory. On a smaller GPU: "
    "MAGI-1 DiT Loader's `weight_dtype` **fp8_e4m3fn_scaled** (weights in float8: saves 4.4 GB), or the "
    "official `ckpt/magi/4.5B_distill_quant` checkpoint (recognised by itself); the sampler's **kv_offload** "
    "(saves 8.2 GB, a little slower). The sampler checks the plan before it starts and says what would fit; "
    "its report prints the plan.")


@dataclass
class Node:
    id: int
    type: str
    pos: tuple
    widgets: dict = field(default_factory=dict)  # values other than the schema's defaults
    links: dict = field(default_factory=dict)  # input name -> (source node id, output index)
    title: str = None
    size: tuple = (320, 130)
    models: list = None  # files the frontend may offer to download


def _real_model():
    """The nodes every workflow on the official checkpoints shares (ids 1-8), sampler inputs aside."""
    return [
        Node(1, "MAGI1DiTLoader", (40, 60), dict(checkpoint=DIT_4_5B_DISTILL), size=(420, 130)),
        Node(2, "MAGI1MotionDetailCache", (500, 60), _cache(), links={"model": (1, 0)}, size=(340, 430)),
        Node(3, "CLIPLoader", (40, 240), dict(clip_name=T5["name"], type="mochi", device="default"), models=[T5],
             size=(420, 110)),
        Node(5, "MAGI1VAELoader", (40, 600), dict(vae_name=VAE["name"]), models=[VAE], size=(420, 90)),
        Node(7, "MAGI1Decode", (1300, 60), links={"vae": (5, 0), "samples": (6, 0)}, size=(270, 80)),
        Node(8, "CreateVideo", (1300, 190), dict(fps=24), links={"images": (7, 0)}, size=(270, 80)),
        Node(11, "PreviewAny", (1300, 480), links={"source": (6, 1)}, title="Cache report", size=(380, 160)),
    ]


def _cache():
    """The cache node as a fresh one is: the calibrated ``slow`` preset (``CachePolicy.slow()``,
    bench/results/calibration_bench.md), its widgets showing the preset's values (the workflow test checks that
    they agree), so switching to custom keeps them."""
    return {}


def _sampler(**widgets):
    """The sampler's widgets: its defaults (720x720, 96 frames, 16 steps), seed 42 unless given."""
    return {"seed": 42, **widgets}


def _encode_prefix(image_source, pos):
    """MAGI-1 Encode Prefix (a new node, id 15 wherever it appears) at the sampler's default size, from the
    start image or the prefix video ``image_source`` = (input name, (node id, output index))."""
    name, link = image_source
    return Node(15, "MAGI1EncodePrefix", pos, links={"vae": (5, 0), name: link}, size=(380, 130))


def text_to_video():
    return _real_model() + [
        Node(4, "MAGI1TextEncode", (40, 390), dict(prompt=(
            "A golden retriever runs along a sunlit beach as small waves roll in, its ears flapping, the "
            "camera tracking beside it at low height.")), links={"clip": (3, 0)}, size=(420, 170)),
        Node(6, "MAGI1Sampler", (880, 60), _sampler(), links={"model": (2, 0), "positive": (4, 0),
                                                          "preview_vae": (5, 0)}, size=(380, 330)),
        Node(9, "SaveVideo", (1300, 300), dict(filename_prefix="video/magi1_t2v", format="auto", codec="auto"),
             links={"video": (8, 0)}, size=(380, 140)),
        Node(12, "MarkdownNote", (40, 720), dict(text=MODEL_FILES_NOTE + MEMORY_NOTE), size=(420, 380)),
    ]


def image_to_video():
    return _real_model() + [
        Node(4, "MAGI1TextEncode", (40, 390), dict(prompt=(
            "The scene comes alive: clouds drift slowly across the sky and the light shifts gently while the "
            "camera pushes in.")), links={"clip": (3, 0)}, size=(420, 170)),
        Node(10, "LoadImage", (500, 460), dict(image="example.png"), title="Start image", size=(340, 320)),
        _encode_prefix(("start_image", (10, 0)), (880, 440)),
        Node(6, "MAGI1Sampler", (880, 60), _sampler(), links={"model": (2, 0), "positive": (4, 0),
                                                          "prefix_latent": (15, 0), "preview_vae": (5, 0)},
             size=(380, 330)),
        Node(9, "SaveVideo", (1300, 300), dict(filename_prefix="video/magi1_i2v", format="auto", codec="auto"),
             links={"video": (8, 0)}, size=(380, 140)),
        Node(12, "MarkdownNote", (40, 720), dict(text=MODEL_FILES_NOTE + (
            "\n\nMAGI-1 Encode Prefix resizes the start image to its width x height, which must be the "
            "sampler's; it becomes the first frame.")), size=(420, 340)),
    ]


def video_continuation():
    return _real_model() + [
        Node(4, "MAGI1TextEncode", (40, 390), dict(prompt=(
            "The camera keeps moving forward along the forest path as sunlight flickers through the leaves.")),
            links={"clip": (3, 0)}, size=(420, 170)),
        Node(10, "LoadVideo", (500, 460), dict(file="magi1_prefix.mp4"), title="Video to continue", size=(340, 320)),
        Node(13, "GetVideoComponents", (500, 820), links={"video": (10, 0)}, size=(280, 90)),
        _encode_prefix(("prefix_video", (13, 0)), (880, 440)),
        Node(6, "MAGI1Sampler", (880, 60), _sampler(), links={"model": (2, 0), "positive": (4, 0),
                                                          "prefix_latent": (15, 0), "preview_vae": (5, 0)},
             size=(380, 330)),
        Node(9, "SaveVideo", (1300, 300), dict(filename_prefix="video/magi1_continued", format="auto", codec="auto"),
             links={"video": (8, 0)}, size=(380, 140)),
        Node(12, "MarkdownNote", (40, 720), dict(text=MODEL_FILES_NOTE + (
            "\n\nPut the video to continue in `ComfyUI/input/` and pick it in *Video to continue*. MAGI-1 "
            "Encode Prefix resizes it to its width x height, which must be the sampler's; the generated frames "
            "follow its last frame (the saved video holds the new frames only).")), size=(420, 380)),
    ]


def tiny_demo():
    return [
        Node(1, "MAGI1DiTLoader", (40, 60), dict(checkpoint=TINY), size=(380, 130)),
        Node(2, "MAGI1MotionDetailCache", (460, 60), _cache(), links={"model": (1, 0)}, size=(340, 430)),
        Node(4, "MAGI1TinyTextEncode", (40, 240), dict(prompt="a red ball moving right over a checkerboard"),
             size=(380, 150)),
        Node(5, "MAGI1VAELoader", (40, 440), dict(vae_name=TINY), size=(380, 90)),
        Node(6, "MAGI1Sampler", (840, 60), _sampler(width=64, height=64, frames=48, steps=16, seed=0,
                                                    record_masks=True),
             links={"model": (2, 0), "positive": (4, 0), "preview_vae": (5, 0)}, size=(360, 330)),
        Node(7, "MAGI1Decode", (1240, 60), links={"vae": (5, 0), "samples": (6, 0)}, size=(270, 80)),
        Node(8, "CreateVideo", (1240, 190), dict(fps=24), links={"images": (7, 0)}, size=(270, 80)),
        Node(9, "SaveVideo", (1240, 300), dict(filename_prefix="video/magi1_tiny_demo", format="auto", codec="auto"),
             links={"video": (8, 0)}, size=(380, 300)),
        Node(11, "PreviewAny", (840, 440), links={"source": (6, 1)}, title="Cache report", size=(360, 160)),
        Node(14, "PreviewImage", (840, 640), links={"images": (6, 2)}, title="Where the cache computed (white)",
             size=(360, 300)),
        Node(12, "MarkdownNote", (40, 580), dict(text=(
            "### MAGI-1 tiny demo\n\nRuns on any CPU with no download: the pack's built-in tiny MAGI-1 (same "
            "architecture, trained on simple synthetic videos at 64x64) with MotionDetailCache. It knows "
            "prompts like *a yellow square bouncing over a striped wall* or *a blue ball growing in front of a "
            "gray wall, the camera pans left*.\n\nFor real videos use the other example workflows with the "
            "official checkpoints.")), size=(380, 300)),
    ]


def bench_demo():
    """The tiny demo's graph (same node ids) on the built-in benchmark model: 128x128 detailed scenes."""
    nodes = {node.id: node for node in tiny_demo()}
    nodes[1].widgets.update(checkpoint=BENCHMARK_MODEL)
    nodes[5].widgets.update(vae_name=BENCHMARK_MODEL)
    nodes[4].widgets.update(prompt="a red ball moving right slowly and a blue square standing still over a brick "
                                   "wall, the camera pans left", model="bench")
    nodes[6].widgets.update(width=128, height=128)
    nodes[9].widgets.update(filename_prefix="video/magi1_bench_demo")
    nodes[12].widgets.update(text=(
        "### MAGI-1 benchmark model\n\nRuns on any CPU with no download: the pack's built-in benchmark model "
        "(the MAGI-1 architecture trained on synthetic 128x128 scenes: one to three small objects over a "
        "detailed background, static camera or pan) with MotionDetailCache. Objects move *slowly* or "
        "*quickly*, *then stopping*, *standing still then moving*, or *entering from* a side; backgrounds: "
        "brick wall, tiled floor, checkerboard, striped wall, grassy field, cloudy sky.\n\nIt is the "
        "cache benchmark's model (`python -m bench.quality.policies --model bench`)."))
    return list(nodes.values())


LONG_VIDEO_PROMPTS = ("a red ball moving right over a checkerboard", "a red ball bouncing over a checkerboard",
                      "a red ball shrinking over a checkerboard, the camera pans left")


def long_video():
    """A long video in segments on the tiny model: generate, continue from that latent with another prompt,
    continue again; the segments' latents joined in time and decoded as one (ids 1-9 as in the tiny demo), so
    that the decode's overlapping tiles cross the joins as they cross every other tile boundary."""
    nodes = [
        Node(1, "MAGI1DiTLoader", (40, 60), dict(checkpoint=TINY), size=(380, 130)),
        Node(2, "MAGI1MotionDetailCache", (460, 60), _cache(), links={"model": (1, 0)}, size=(340, 430)),
        Node(5, "MAGI1VAELoader", (40, 240), dict(vae_name=TINY), size=(380, 90)),
    ]
    text_ids, sampler_ids = (4, 16, 18), (6, 17, 19)
    for k, (text, sampler) in enumerate(zip(text_ids, sampler_ids)):
        links = {"model": (2, 0), "positive": (text, 0), "preview_vae": (5, 0)}
        if k:
            links["prefix_latent"] = (sampler_ids[k - 1], 0)  # continue from the segment before
        nodes += [
            Node(text, "MAGI1TinyTextEncode", (40 + 420 * k, 540), dict(prompt=LONG_VIDEO_PROMPTS[k]),
                 title=f"Segment {k + 1} prompt", size=(380, 150)),
            Node(sampler, "MAGI1Sampler", (40 + 420 * k, 740), _sampler(width=64, height=64, frames=48, steps=16,
                                                                       seed=k), links=links,
                 title=f"Segment {k + 1}", size=(380, 330)),
        ]
    nodes += [
        # (ids 20-23, the segments' own decodes and their ImageBatch joins until 0.9, are not reused)
        Node(24, "LatentConcat", (1300, 540), dict(dim="t"), links={"samples1": (6, 0), "samples2": (17, 0)},
             size=(240, 80)),
        Node(25, "LatentConcat", (1300, 660), dict(dim="t"), links={"samples1": (24, 0), "samples2": (19, 0)},
             size=(240, 80)),
        Node(7, "MAGI1Decode", (1300, 780), links={"vae": (5, 0), "samples": (25, 0)}, size=(270, 80)),
        Node(8, "CreateVideo", (1300, 900), dict(fps=24), links={"images": (7, 0)}, size=(270, 80)),
        Node(9, "SaveVideo", (1300, 1020), dict(filename_prefix="video/magi1_long_video", format="auto",
                                                codec="auto"), links={"video": (8, 0)}, size=(380, 300)),
        Node(11, "PreviewAny", (1300, 60), links={"source": (19, 1)}, title="Last segment's report", size=(360, 160)),
        Node(12, "MarkdownNote", (860, 60), dict(text=(
            "### A long video in segments\n\nEach segment continues the one before it from its latent "
            "(MAGI-1 Sampler's `prefix_latent`) with its own prompt, so the story can change as it goes. The "
            "segments' latents are joined in time (`LatentConcat`, dim t) and decoded as one video, so no seam "
            "shows at the joins. Runs on any CPU with the built-in tiny model; with the official checkpoints, "
            "swap the loaders and text nodes as in the other workflows.\n\nOne sampler with a prompt schedule "
            "does the same chunk by chunk, in one run: see `magi1_minute_video`.")), size=(400, 300)),
    ]
    return nodes


MINUTE_VIDEO_SCHEDULE = "\n".join(f"{first}: {prompt}" for first, prompt in (
    (0, "a red ball moving right over a checkerboard"),
    (8, "a red ball bouncing over a checkerboard"),
    (16, "a blue square moving left over a checkerboard"),
    (24, "a red ball shrinking over a checkerboard, the camera pans left")))


def minute_video():
    """30 s (720 frames, 30 chunks) in one sampler with a prompt schedule on the tiny model, decoded and written
    to the mp4 chunk by chunk (MAGI-1 Decode and Save Video): memory stays flat however long the video."""
    return [
        Node(1, "MAGI1DiTLoader", (40, 60), dict(checkpoint=TINY), size=(380, 130)),
        Node(2, "MAGI1MotionDetailCache", (460, 60), _cache(), links={"model": (1, 0)}, size=(340, 430)),
        Node(4, "MAGI1TinyTextEncode", (40, 540), dict(prompt=MINUTE_VIDEO_SCHEDULE), title="Prompt schedule",
             size=(460, 200)),
        Node(5, "MAGI1VAELoader", (40, 240), dict(vae_name=TINY), size=(380, 90)),
        Node(6, "MAGI1Sampler", (860, 60), _sampler(width=64, height=64, frames=720, steps=16),
             links={"model": (2, 0), "positive": (4, 0)}, size=(380, 330)),
        Node(26, "MAGI1SaveVideo", (1300, 60), dict(filename_prefix="video/magi1_minute_video"),
             links={"vae": (5, 0), "samples": (6, 0)}, size=(380, 300)),
        Node(11, "PreviewAny", (860, 460), links={"source": (6, 1)}, title="Cache report", size=(380, 160)),
        Node(12, "MarkdownNote", (1300, 420), dict(text=(
            "### A long video in one run\n\n30 seconds (720 frames) from one sampler, its prompt changing on a "
            "schedule (`N: prompt` lines: from chunk N on, a chunk being 24 frames). MAGI-1 keeps only the "
            "window's keys and values and chunks on the GPU, and **MAGI-1 Decode and Save Video** decodes and "
            "writes the mp4 chunk by chunk, so memory does not grow with the length: set `frames` as high as "
            "4096 (171 s). Runs on any CPU with the built-in tiny model.")), size=(400, 260)),
    ]


WORKFLOWS = {
    "magi1_tiny_demo": tiny_demo,
    "magi1_bench_demo": bench_demo,
    "magi1_text_to_video": text_to_video,
    "magi1_image_to_video": image_to_video,
    "magi1_video_continuation": video_continuation,
    "magi1_long_video": long_video,
    "magi1_minute_video": minute_video,
}


def _order(nodes):
    """Execution order (sources first), as the frontend's ``order`` field."""
    done, order = set(), []
    pending = list(nodes)
    while pending:
        for node in pending:
            if all(src in done for src, _ in node.links.values()):
                done.add(node.id)
                order.append(node.id)
                pending.remove(node)
                break
        else:
            raise ValueError("the graph has a cycle")
    return {node_id: i for i, node_id in enumerate(order)}


def widget_values(node):
    """Every widget's value by name, in schema order: the node's own, else the schema's default."""
    spec = NODE_TYPES[node.type]
    unknown = set(node.widgets) - set(spec.widgets)
    missing = [name for name in spec.widgets if name not in node.widgets and name not in spec.defaults]
    if unknown or missing:
        raise ValueError(f"node {node.id} ({node.type}): unknown widgets {sorted(unknown)}, no value for {missing}")
    return {name: node.widgets.get(name, spec.defaults.get(name)) for name in spec.widgets}


def to_ui(name, nodes):
    by_id = {node.id: node for node in nodes}
    order = _order(nodes)
    links = []
    link_ids = {}  # (target id, input name) -> link id
    for node in sorted(nodes, key=lambda n: order[n.id]):
        sockets = [s for s, _ in NODE_TYPES[node.type].sockets]
        if set(node.links) - set(sockets):
            raise ValueError(f"node {node.id} ({node.type}): no inputs {sorted(set(node.links) - set(sockets))}")
        for socket, (src, slot) in sorted(node.links.items(), key=lambda kv: sockets.index(kv[0])):
            link_type = NODE_TYPES[by_id[src].type].outputs[slot][1]
            link_id = len(links) + 1
            links.append([link_id, src, slot, node.id, sockets.index(socket), link_type])
            link_ids[(node.id, socket)] = link_id
    ui_nodes = []
    for node in sorted(nodes, key=lambda n: n.id):
        spec = NODE_TYPES[node.type]
        values = []
        for widget, value in widget_values(node).items():
            values.append(value)
            if widget in spec.extras:
                values.append(spec.extras[widget])
        properties = {} if node.type in FRONTEND_ONLY else {"Node name for S&R": node.type}
        if node.type in STOCK_TYPES and node.type not in FRONTEND_ONLY:
            properties["cnr_id"] = "comfy-core"
        elif node.type not in FRONTEND_ONLY:
            properties["cnr_id"] = PACK_ID
        if node.models:
            properties["models"] = node.models
        entry = {
            "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
            "order": order[node.id], "mode": 0,
            "inputs": [{"name": socket, "type": kind, "link": link_ids.get((node.id, socket))}
                       for socket, kind in spec.sockets],
            "outputs": [{"name": output, "type": kind, "slot_index": i,
                         "links": [l[0] for l in links if l[1] == node.id and l[2] == i] or None}
                        for i, (output, kind) in enumerate(spec.outputs)],
            "properties": properties,
            "widgets_values": values,
        }
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)
    return {  # the workflow's own id (before 0.2.0 all four shared one: a loop variable hid ``name``)
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/{name}")), "revision": 0,
        "last_node_id": max(n.id for n in nodes), "last_link_id": len(links),
        "nodes": ui_nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.9, "offset": [0, 0]}}, "version": 0.4,
    }


def to_api(nodes):
    api = {}
    for node in sorted(nodes, key=lambda n: n.id):
        if node.type in FRONTEND_ONLY:
            continue
        inputs = widget_values(node)
        sockets = [s for s, _ in NODE_TYPES[node.type].sockets]
        inputs.update({name: [str(src), slot] for name, (src, slot) in
                       sorted(node.links.items(), key=lambda kv: sockets.index(kv[0]))})
        api[str(node.id)] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title or node.type}}
    return api


def main():
    for name, build in WORKFLOWS.items():
        nodes = build()
        for path, data in ((os.path.join(HERE, f"{name}.json"), to_ui(name, nodes)),
                           (os.path.join(HERE, "api", f"{name}.json"), to_api(nodes))):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            print("wrote", os.path.relpath(path, os.path.dirname(HERE)))


if __name__ == "__main__":
    main()
