"""Writes the example workflows: each graph once, as a UI-format (0.4) file in ``workflows/`` and its
API-format twin in ``workflows/api/``.

    python workflows/build_workflows.py

``tests/test_workflows.py`` checks every pair independently (UI converted to API with the nodes' own
schemas); a ComfyUI checkout checks the stock nodes' widget order and runs the demo.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_ID = "magi1-motiondetailcache"  # the registry id (pyproject [project] name)

# node type -> (socket inputs [(name, type)], widget names in schema order, outputs [(name, type)]).
# A widget name in WIDGET_EXTRAS adds a UI-only value after it (seed's "control after generate", upload
# buttons); API files leave those out.
NODE_TYPES = {
    "MAGI1DiTLoader": ([], ["checkpoint", "variant", "weight_dtype", "attention"], [("MODEL", "MODEL")]),
    "MAGI1VAELoader": ([], ["vae_name", "weight_dtype"], [("MAGI1_VAE", "MAGI1_VAE")]),
    "MAGI1TextEncode": ([("clip", "CLIP")], ["prompt"], [("CONDITIONING", "CONDITIONING")]),
    "MAGI1TinyTextEncode": ([], ["prompt"], [("CONDITIONING", "CONDITIONING")]),
    "MAGI1MotionDetailCache": (
        [("model", "MODEL")],
        ["mode", "preset", "tau", "warmup_steps", "chunk_wise_steps", "final_full_steps", "motion_floor",
         "detail_alpha", "detail_window", "detail_lambda", "combine_mode", "proxy", "max_reuse"],
        [("MODEL", "MODEL")]),
    "MAGI1Sampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "MAGI1_VAE"),
         ("start_image", "IMAGE"), ("prefix_video", "IMAGE"), ("prefix_latent", "LATENT")],
        ["width", "height", "frames", "steps", "seed", "guidance", "record_masks", "kv_offload"],
        [("latent", "LATENT"), ("cache_report", "STRING"), ("cache_masks", "IMAGE")]),
    "MAGI1Decode": ([("vae", "MAGI1_VAE"), ("samples", "LATENT")], ["tile_size"], [("IMAGE", "IMAGE")]),
    "CLIPLoader": ([], ["clip_name", "type", "device"], [("CLIP", "CLIP")]),
    "LoadImage": ([], ["image"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "LoadVideo": ([], ["file"], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO")], [], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO")], ["fps"], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO")], ["filename_prefix", "format", "codec"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "PreviewAny": ([("source", "*")], [], []),
    "MarkdownNote": ([], ["text"], []),  # frontend only: not in API files
}
WIDGET_EXTRAS = {("MAGI1Sampler", "seed"): "fixed", ("LoadImage", "image"): "image", ("LoadVideo", "file"): "image"}
FRONTEND_ONLY = {"MarkdownNote"}
STOCK = {"CLIPLoader", "LoadImage", "LoadVideo", "GetVideoComponents", "CreateVideo", "SaveVideo", "PreviewImage",
         "PreviewAny"}

T5 = {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
      "url": "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"}
VAE = {"name": "magi1_vae.safetensors", "directory": "vae",
       "url": "https://huggingface.co/sand-ai/MAGI-1/resolve/main/ckpt/vae/diffusion_pytorch_model.safetensors"}
DIT_4_5B_DISTILL = "4.5B_distill/inference_weight.distill/model.safetensors.index.json"
TINY = "MAGI-1 tiny demo (built-in)"
MODEL_FILES_NOTE = (
    "### Model files\n\n"
    "- **DiT**: the folder `ckpt/magi/4.5B_distill` of [sand-ai/MAGI-1](https://huggingface.co/sand-ai/MAGI-1) "
    "into `models/diffusion_models/` (pick its `model.safetensors.index.json`).\n"
    "- **VAE**: `ckpt/vae/diffusion_pytorch_model.safetensors` from the same repository, saved as "
    "`models/vae/magi1_vae.safetensors`.\n"
    "- **T5**: `t5xxl_fp16.safetensors` in `models/text_encoders/`, loaded with CLIPLoader type *mochi*.\n"
    "- **Special tokens**: `example/assets/special_tokens.npz` of "
    "[SandAI-org/MAGI-1](https://github.com/SandAI-org/MAGI-1) in `models/text_encoders/`.\n\n"
    "MAGI-1 makes 24 frames per chunk at 24 fps; width and height are multiples of 16.")


@dataclass
class Node:
    id: int
    type: str
    pos: tuple
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (source node id, output index)
    title: str = None
    size: tuple = (320, 130)
    models: list = None  # files the frontend may offer to download


def _real_model():
    """The nodes every workflow on the official checkpoints shares (ids 1-8), sampler inputs aside."""
    return [
        Node(1, "MAGI1DiTLoader", (40, 60), dict(checkpoint=DIT_4_5B_DISTILL, variant="auto", weight_dtype="auto",
                                                  attention="auto"), size=(420, 130)),
        Node(2, "MAGI1MotionDetailCache", (500, 60), _cache(), links={"model": (1, 0)}, size=(340, 370)),
        Node(3, "CLIPLoader", (40, 240), dict(clip_name=T5["name"], type="mochi", device="default"), models=[T5],
             size=(420, 110)),
        Node(5, "MAGI1VAELoader", (40, 600), dict(vae_name=VAE["name"], weight_dtype="auto"), models=[VAE],
             size=(420, 90)),
        Node(7, "MAGI1Decode", (1300, 60), dict(tile_size=256), links={"vae": (5, 0), "samples": (6, 0)},
             size=(270, 80)),
        Node(8, "CreateVideo", (1300, 190), dict(fps=24), links={"images": (7, 0)}, size=(270, 80)),
        Node(11, "PreviewAny", (1300, 480), links={"source": (6, 1)}, title="Cache report", size=(380, 160)),
    ]


def _cache(mode="motion_detail"):
    """The calibrated ``slow`` preset (``CachePolicy.slow()``, bench/calibration.md; the workflow test checks
    that they agree). The widgets show the preset's values, so switching to custom keeps them."""
    return dict(mode=mode, preset="slow", tau=0.04, warmup_steps=2, chunk_wise_steps=2, final_full_steps=1,
                motion_floor=0.6, detail_alpha=0.5, detail_window=3, detail_lambda=0.5, combine_mode="max",
                proxy="denoised", max_reuse=4)


def _sampler(**widgets):
    values = dict(width=720, height=720, frames=96, steps=16, seed=42, guidance=7.5, record_masks=False,
                  kv_offload=False)
    values.update(widgets)
    return values


def text_to_video():
    return _real_model() + [
        Node(4, "MAGI1TextEncode", (40, 390), dict(prompt=(
            "A golden retriever runs along a sunlit beach as small waves roll in, its ears flapping, the "
            "camera tracking beside it at low height.")), links={"clip": (3, 0)}, size=(420, 170)),
        Node(6, "MAGI1Sampler", (880, 60), _sampler(), links={"model": (2, 0), "positive": (4, 0)}, size=(380, 330)),
        Node(9, "SaveVideo", (1300, 300), dict(filename_prefix="video/magi1_t2v", format="auto", codec="auto"),
             links={"video": (8, 0)}, size=(380, 140)),
        Node(12, "MarkdownNote", (40, 720), dict(text=MODEL_FILES_NOTE), size=(420, 300)),
    ]


def image_to_video():
    return _real_model() + [
        Node(4, "MAGI1TextEncode", (40, 390), dict(prompt=(
            "The scene comes alive: clouds drift slowly across the sky and the light shifts gently while the "
            "camera pushes in.")), links={"clip": (3, 0)}, size=(420, 170)),
        Node(10, "LoadImage", (500, 460), dict(image="example.png"), title="Start image", size=(340, 320)),
        Node(6, "MAGI1Sampler", (880, 60), _sampler(), links={"model": (2, 0), "positive": (4, 0), "vae": (5, 0),
                                                          "start_image": (10, 0)}, size=(380, 330)),
        Node(9, "SaveVideo", (1300, 300), dict(filename_prefix="video/magi1_i2v", format="auto", codec="auto"),
             links={"video": (8, 0)}, size=(380, 140)),
        Node(12, "MarkdownNote", (40, 720), dict(text=MODEL_FILES_NOTE + (
            "\n\nThe start image is resized to width x height and becomes the first frame.")), size=(420, 320)),
    ]


def video_continuation():
    return _real_model() + [
        Node(4, "MAGI1TextEncode", (40, 390), dict(prompt=(
            "The camera keeps moving forward along the forest path as sunlight flickers through the leaves.")),
            links={"clip": (3, 0)}, size=(420, 170)),
        Node(10, "LoadVideo", (500, 460), dict(file="magi1_prefix.mp4"), title="Video to continue", size=(340, 320)),
        Node(13, "GetVideoComponents", (500, 820), links={"video": (10, 0)}, size=(280, 90)),
        Node(6, "MAGI1Sampler", (880, 60), _sampler(), links={"model": (2, 0), "positive": (4, 0), "vae": (5, 0),
                                                          "prefix_video": (13, 0)}, size=(380, 330)),
        Node(9, "SaveVideo", (1300, 300), dict(filename_prefix="video/magi1_continued", format="auto", codec="auto"),
             links={"video": (8, 0)}, size=(380, 140)),
        Node(12, "MarkdownNote", (40, 720), dict(text=MODEL_FILES_NOTE + (
            "\n\nPut the video to continue in `ComfyUI/input/` and pick it in *Video to continue*. It is resized "
            "to width x height; the generated frames follow its last frame (the saved video holds the new "
            "frames only).")), size=(420, 360)),
    ]


def tiny_demo():
    return [
        Node(1, "MAGI1DiTLoader", (40, 60), dict(checkpoint=TINY, variant="auto", weight_dtype="auto",
                                                  attention="auto"), size=(380, 130)),
        Node(2, "MAGI1MotionDetailCache", (460, 60), _cache(), links={"model": (1, 0)}, size=(340, 370)),
        Node(4, "MAGI1TinyTextEncode", (40, 240), dict(prompt="a red ball moving right over a checkerboard"),
             size=(380, 150)),
        Node(5, "MAGI1VAELoader", (40, 440), dict(vae_name=TINY, weight_dtype="auto"), size=(380, 90)),
        Node(6, "MAGI1Sampler", (840, 60), _sampler(width=64, height=64, frames=48, steps=16, seed=0,
                                                    record_masks=True),
             links={"model": (2, 0), "positive": (4, 0)}, size=(360, 330)),
        Node(7, "MAGI1Decode", (1240, 60), dict(tile_size=256), links={"vae": (5, 0), "samples": (6, 0)},
             size=(270, 80)),
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


WORKFLOWS = {
    "magi1_tiny_demo": tiny_demo,
    "magi1_text_to_video": text_to_video,
    "magi1_image_to_video": image_to_video,
    "magi1_video_continuation": video_continuation,
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


def to_ui(name, nodes):
    by_id = {node.id: node for node in nodes}
    order = _order(nodes)
    links = []
    link_ids = {}  # (target id, input name) -> link id
    for node in sorted(nodes, key=lambda n: order[n.id]):
        sockets = NODE_TYPES[node.type][0]
        for name, (src, slot) in sorted(node.links.items(), key=lambda kv: [s for s, _ in sockets].index(kv[0])):
            link_type = NODE_TYPES[by_id[src].type][2][slot][1]
            link_id = len(links) + 1
            links.append([link_id, src, slot, node.id, [s for s, _ in sockets].index(name), link_type])
            link_ids[(node.id, name)] = link_id
    ui_nodes = []
    for node in sorted(nodes, key=lambda n: n.id):
        sockets, widgets, outputs = NODE_TYPES[node.type]
        if set(node.widgets) != set(widgets) or set(node.links) - {s for s, _ in sockets}:
            raise ValueError(f"node {node.id} ({node.type}): widgets {sorted(node.widgets)} != {sorted(widgets)}")
        values = []
        for name in widgets:
            values.append(node.widgets[name])
            if (node.type, name) in WIDGET_EXTRAS:
                values.append(WIDGET_EXTRAS[(node.type, name)])
        properties = {} if node.type in FRONTEND_ONLY else {"Node name for S&R": node.type}
        if node.type in STOCK:
            properties["cnr_id"] = "comfy-core"
        elif node.type not in FRONTEND_ONLY:
            properties["cnr_id"] = PACK_ID
        if node.models:
            properties["models"] = node.models
        entry = {
            "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
            "order": order[node.id], "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": link_ids.get((node.id, name))} for name, kind in sockets],
            "outputs": [{"name": name, "type": kind, "slot_index": i,
                         "links": [l[0] for l in links if l[1] == node.id and l[2] == i] or None}
                        for i, (name, kind) in enumerate(outputs)],
            "properties": properties,
            "widgets_values": values,
        }
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)
    return {
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
        inputs = dict(node.widgets)
        inputs.update({name: [str(src), slot] for name, (src, slot) in node.links.items()})
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
