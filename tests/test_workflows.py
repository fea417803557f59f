"""The example workflows: every UI-format file (workflows/*.json) is a well-formed 0.4 graph of stock
nodes and ours, its API-format twin (workflows/api/*.json) is exactly what it converts to, and our nodes
in both are the schemas' (widgets, sockets, outputs), with the node ids of earlier versions. The
conversion here uses the nodes' own schemas (through the stand-ins of comfy_stubs), not the generator's
tables; tests/test_comfyui.py checks the stock nodes' widget order below against a real ComfyUI."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cache_core import CachePolicy
from comfy_stubs import WIDGET_KINDS, pack_nodes
from magi1 import builtin

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"

# Stock nodes the workflows may use: widget names in order, and UI-only values after some of them
# (an upload button's value). Checked against /object_info by tests/test_comfyui.py.
STOCK_WIDGETS = {
    "CLIPLoader": ["clip_name", "type", "device"],
    "LoadImage": ["image"],
    "LoadVideo": ["file"],
    "GetVideoComponents": [],
    "ImageBatch": [],
    "LatentConcat": ["dim"],
    "CreateVideo": ["fps"],
    "SaveVideo": ["filename_prefix", "format", "codec"],
    "PreviewImage": [],
    "PreviewAny": [],
}
STOCK_UI_EXTRAS = {("LoadImage", "image"), ("LoadVideo", "file")}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
EXPECTED = {"magi1_tiny_demo", "magi1_bench_demo", "magi1_text_to_video", "magi1_image_to_video", "magi1_video_continuation",
            "magi1_long_video", "magi1_minute_video"}


@pytest.fixture(scope="module")
def schemas():
    with pack_nodes() as nodes:
        yield {node.GET_SCHEMA().node_id: node.GET_SCHEMA() for node in nodes}


def widget_inputs(schema):
    return [inp for inp in schema.inputs if inp.kind in WIDGET_KINDS]


def ui_to_api(ui, schemas):
    """The API prompt a UI-format graph stands for: widget values by name, links as [source id, slot]."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            continue
        values = list(node.get("widgets_values") or [])
        inputs = {}
        if kind in schemas:
            for inp in widget_inputs(schemas[kind]):
                inputs[inp.id] = values.pop(0)
                if inp.options.get("control_after_generate"):
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), node["id"]
        else:
            for name in STOCK_WIDGETS[kind]:
                inputs[name] = values.pop(0)
                if (kind, name) in STOCK_UI_EXTRAS:
                    values.pop(0)
        assert not values, f"node {node['id']} ({kind}) has {len(values)} widget values too many"
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source, slot, target, _, _ = links[socket["link"]]
                assert target == node["id"]
                inputs[socket["name"]] = [str(source), slot]
        api[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return api


def test_every_example_has_an_api_twin():
    assert {p.stem for p in UI_FILES} == EXPECTED
    assert {p.stem for p in API_DIR.glob("*.json")} == EXPECTED


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_file_is_a_wellformed_graph(path, schemas):
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    for node in ui["nodes"]:
        for key in ("pos", "size", "flags", "order", "mode", "properties"):
            assert key in node, (node["id"], key)
        assert node["type"] in schemas or node["type"] in STOCK_WIDGETS or node["type"] in FRONTEND_ONLY, node["type"]
        if node["type"] in schemas:  # our nodes: the inputs are the schema's sockets, in its order
            sockets = [inp.id for inp in schemas[node["type"]].inputs if inp.kind not in WIDGET_KINDS]
            assert [socket["name"] for socket in node["inputs"]] == sockets, node["type"]
            assert node["properties"]["cnr_id"] == "magi1-motiondetailcache"
    for link_id, source, slot, target, target_slot, kind in ui["links"]:
        output = nodes[source]["outputs"][slot]
        socket = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and socket["link"] == link_id
        assert output["type"] == kind and socket["type"] in (kind, "*")
    for node in ui["nodes"]:  # no dangling references
        for socket in node.get("inputs", []):
            assert socket["link"] is None or any(link[0] == socket["link"] for link in ui["links"])


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_is_the_ui_graph(path, schemas):
    ui = json.loads(path.read_text())
    api = json.loads((API_DIR / path.name).read_text())
    expected = ui_to_api(ui, schemas)
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == expected


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_our_widget_values_are_valid(path, schemas):
    from magi1 import VideoLayout

    api = json.loads((API_DIR / path.name).read_text())
    for node in api.values():
        schema = schemas.get(node["class_type"])
        if schema is None:
            continue
        for inp in widget_inputs(schema):
            value, where = node["inputs"][inp.id], f"{path.stem}: {schema.node_id}.{inp.id}"
            if inp.id in ("checkpoint", "vae_name"):  # file lists: a built-in model or a safetensors file
                builtin_choices = ("MAGI-1 tiny demo (built-in)", "MAGI-1 benchmark model (built-in, 128x128)")
                assert value in builtin_choices or value.endswith((".safetensors", ".index.json")), where
            elif "options" in inp.options:
                assert value in inp.options["options"], where
            elif "min" in inp.options:
                assert inp.options["min"] <= value <= inp.options["max"], where
        if schema.node_id == "MAGI1Sampler":
            inputs = node["inputs"]
            VideoLayout.plan(inputs["frames"], inputs["height"], inputs["width"])  # a size the model takes
            assert inputs["steps"] % 4 == 0


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_our_nodes_are_the_schemas_nodes(path, schemas):
    """Every widget of every node of ours, in both files, is the schema's, in its order (the UI holds values
    only, so an input added or moved would shift them); sockets and outputs by name and type."""
    ui = json.loads(path.read_text())
    api = json.loads((API_DIR / path.name).read_text())
    for node in ui["nodes"]:
        schema = schemas.get(node["type"])
        if schema is None:
            continue
        where = f"{path.stem}: node {node['id']} ({node['type']})"
        widgets = [inp.id for inp in widget_inputs(schema)]
        extras = sum(1 for inp in widget_inputs(schema) if inp.options.get("control_after_generate"))
        assert len(node["widgets_values"]) == len(widgets) + extras, where
        sockets = [(inp.id, inp.io_type) for inp in schema.inputs if inp.kind not in WIDGET_KINDS]
        assert [(socket["name"], socket["type"]) for socket in node["inputs"]] == sockets, where
        outputs = [(out.options.get("display_name") or out.io_type, out.io_type) for out in schema.outputs]
        assert [(out["name"], out["type"]) for out in node["outputs"]] == outputs, where
        inputs = api[str(node["id"])]["inputs"]
        assert [name for name, value in inputs.items() if not isinstance(value, list)] == widgets, where
        assert {name for name, value in inputs.items() if isinstance(value, list)} <= {s for s, _ in sockets}, where


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_images_reach_the_sampler_through_encode_prefix(path):
    """0.2.0: start images and prefix videos are encoded by MAGI-1 Encode Prefix at the sampler's size."""
    api = json.loads((API_DIR / path.name).read_text())
    sampler = next(node["inputs"] for node in api.values() if node["class_type"] == "MAGI1Sampler")
    assert not {"vae", "start_image", "prefix_video"} & set(sampler)
    loads = [node for node in api.values() if node["class_type"] in ("LoadImage", "LoadVideo")]
    if not loads:
        assert "prefix_latent" not in sampler
        return
    encode = api[sampler["prefix_latent"][0]]
    assert encode["class_type"] == "MAGI1EncodePrefix"
    assert (encode["inputs"]["width"], encode["inputs"]["height"]) == (sampler["width"], sampler["height"])
    image = encode["inputs"].get("start_image") or encode["inputs"]["prefix_video"]
    source = api[image[0]]
    if source["class_type"] == "GetVideoComponents":  # a video's frames
        assert "prefix_video" in encode["inputs"]
        source = api[source["inputs"]["video"][0]]
    assert source["class_type"] == ("LoadImage" if "start_image" in encode["inputs"] else "LoadVideo")


def test_node_ids_are_kept():
    """Node ids never change between versions (saved edits and API prompts name them); new nodes take new ids."""
    ids = {path.stem: {int(k): v["class_type"] for k, v in json.loads((API_DIR / path.name).read_text()).items()}
           for path in UI_FILES}
    real = {1: "MAGI1DiTLoader", 2: "MAGI1MotionDetailCache", 3: "CLIPLoader", 4: "MAGI1TextEncode",
            5: "MAGI1VAELoader", 6: "MAGI1Sampler", 7: "MAGI1Decode", 8: "CreateVideo", 9: "SaveVideo",
            11: "PreviewAny"}
    for name in ("magi1_text_to_video", "magi1_image_to_video", "magi1_video_continuation"):
        assert {k: v for k, v in ids[name].items() if k in real} == real, name
    assert ids["magi1_image_to_video"][10] == "LoadImage" and ids["magi1_video_continuation"][10] == "LoadVideo"
    assert ids["magi1_video_continuation"][13] == "GetVideoComponents"
    assert ids["magi1_image_to_video"][15] == ids["magi1_video_continuation"][15] == "MAGI1EncodePrefix"  # 0.2.0
    demo = {1: "MAGI1DiTLoader", 2: "MAGI1MotionDetailCache", 4: "MAGI1TinyTextEncode", 5: "MAGI1VAELoader",
            6: "MAGI1Sampler", 7: "MAGI1Decode", 8: "CreateVideo", 9: "SaveVideo", 11: "PreviewAny", 14: "PreviewImage"}
    assert ids["magi1_tiny_demo"] == ids["magi1_bench_demo"] == demo


def test_demo_runs_the_builtin_tiny_model():
    api = json.loads((API_DIR / "magi1_tiny_demo.json").read_text())
    kinds = {node["class_type"]: node["inputs"] for node in api.values()}
    assert kinds["MAGI1DiTLoader"]["checkpoint"] == kinds["MAGI1VAELoader"]["vae_name"] == "MAGI-1 tiny demo (built-in)"
    assert "MAGI1TinyTextEncode" in kinds and "CLIPLoader" not in kinds
    assert kinds["MAGI1MotionDetailCache"]["mode"] == CachePolicy.slow().mode  # the node default: hybrid
    assert {"SaveVideo", "CreateVideo"} <= set(kinds)
    assert kinds["MAGI1Sampler"]["steps"] == builtin.STEPS and kinds["MAGI1Sampler"]["width"] == builtin.SIZE


def test_bench_demo_runs_the_builtin_benchmark_model():
    api = json.loads((API_DIR / "magi1_bench_demo.json").read_text())
    kinds = {node["class_type"]: node["inputs"] for node in api.values()}
    choice = "MAGI-1 benchmark model (built-in, 128x128)"
    assert kinds["MAGI1DiTLoader"]["checkpoint"] == kinds["MAGI1VAELoader"]["vae_name"] == choice
    assert kinds["MAGI1TinyTextEncode"]["model"] == "bench" and "CLIPLoader" not in kinds
    assert kinds["MAGI1Sampler"]["width"] == kinds["MAGI1Sampler"]["height"] == builtin.BENCHMARK_MODEL.size
    assert kinds["MAGI1Sampler"]["steps"] == builtin.BENCHMARK_MODEL.steps
    words = set(builtin.BENCHMARK_MODEL.load_text_encoder().config.vocabulary)
    assert set(kinds["MAGI1TinyTextEncode"]["prompt"].replace(",", " ").split()) <= words  # no unknown word


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_cache_nodes_show_the_slow_preset_they_select(path):
    """Every example's cache node selects the calibrated slow preset and its widgets show the preset's
    values, so that switching to custom changes nothing."""
    api = json.loads((API_DIR / path.name).read_text())
    cache = next(node["inputs"] for node in api.values() if node["class_type"] == "MAGI1MotionDetailCache")
    slow = CachePolicy.slow(mode=cache["mode"])
    assert cache["preset"] == "slow"
    shown = CachePolicy(mode=cache["mode"], tau=cache["tau"], warmup_steps=cache["warmup_steps"],
                        chunk_wise_steps=cache["chunk_wise_steps"], final_full_steps=cache["final_full_steps"],
                        motion_floor=cache["motion_floor"], detail_alpha=cache["detail_alpha"],
                        detail_window_size=cache["detail_window"], detail_lambda=cache["detail_lambda"],
                        weight_combine_mode=cache["combine_mode"], proxy=cache["proxy"],
                        max_reuse=cache["max_reuse"] or None, velocity_extrapolation=cache["velocity_extrapolation"],
                        chunk_tau=cache["chunk_tau"] or None)
    assert shown == slow and slow == CachePolicy.slow()  # the node's default mode is the presets' mode


def test_files_are_what_the_builder_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # its dataclasses look their module up
    try:
        spec.loader.exec_module(build)
    finally:
        del sys.modules[spec.name]
    for name, graph in build.WORKFLOWS.items():
        nodes = graph()
        assert json.loads((ROOT / "workflows" / f"{name}.json").read_text()) == build.to_ui(name, nodes), name
        assert json.loads((API_DIR / f"{name}.json").read_text()) == build.to_api(nodes), name


def test_long_video_continues_each_segment_from_the_one_before():
    api = json.loads((API_DIR / "magi1_long_video.json").read_text())
    samplers = {k: v["inputs"] for k, v in api.items() if v["class_type"] == "MAGI1Sampler"}
    assert len(samplers) == 3
    chain = [s.get("prefix_latent", [None])[0] for s in samplers.values()]
    assert chain == [None, "6", "17"]  # segment 2 continues segment 1's latent, segment 3 segment 2's
    prompts = [api[s["positive"][0]]["inputs"]["prompt"] for s in samplers.values()]
    assert len(set(prompts)) == 3  # a different prompt for each segment


def test_long_video_decodes_the_joined_latents_once():
    api = json.loads((API_DIR / "magi1_long_video.json").read_text())
    decodes = [k for k, v in api.items() if v["class_type"] == "MAGI1Decode"]
    assert len(decodes) == 1  # one decode over the three segments: its tiles cross the joins
    joined, sources = api[decodes[0]]["inputs"]["samples"][0], []

    def segments(node_id):
        node = api[node_id]
        if node["class_type"] == "MAGI1Sampler":
            return [node_id]
        assert node["class_type"] == "LatentConcat" and node["inputs"]["dim"] == "t"
        return segments(node["inputs"]["samples1"][0]) + segments(node["inputs"]["samples2"][0])
    sources = segments(joined)
    assert sources == ["6", "17", "19"]  # in the order they were made


def test_minute_video_is_one_scheduled_sampler_saved_chunk_by_chunk():
    from magi1 import parse_prompt_schedule

    api = json.loads((API_DIR / "magi1_minute_video.json").read_text())
    samplers = [k for k, v in api.items() if v["class_type"] == "MAGI1Sampler"]
    assert len(samplers) == 1 and api[samplers[0]]["inputs"]["frames"] >= 720  # 30 s at 24 fps
    prompt = api[api[samplers[0]]["inputs"]["positive"][0]]["inputs"]["prompt"]
    assert len(parse_prompt_schedule(prompt)) >= 2  # a prompt schedule
    saves = [v for v in api.values() if v["class_type"] == "MAGI1SaveVideo"]
    assert len(saves) == 1 and saves[0]["inputs"]["samples"] == [samplers[0], 0]
    assert not any(v["class_type"] in ("MAGI1Decode", "CreateVideo") for v in api.values())
