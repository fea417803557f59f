"""The example workflows as ComfyUI templates: every ``workflows/<name>.json`` has a ``<name>.jpg`` thumbnail
(made by ``python workflows/make_thumbnails.py`` from the built-in models' real output), and a live ComfyUI
lists them under ``/api/workflow_templates`` and serves workflow and thumbnail.

The live check needs a ComfyUI checkout (COMFYUI_DIR, as tests/test_comfyui.py); the file checks run always.
"""

import json
import urllib.request
from pathlib import Path

import pytest

import test_comfyui
from test_comfyui import get, server  # noqa: F401  (server: the live-ComfyUI fixture)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
PACK_FOLDER = "ComfyUI-MAGI1-MotionDetailCache"  # the name the server fixture gives the pack's folder
needs_comfyui = test_comfyui.pytestmark


def ui_workflows():
    return sorted(WORKFLOWS.glob("*.json"))


def is_jpeg(data):
    return data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"


def test_every_workflow_has_a_thumbnail():
    assert ui_workflows(), "no workflows/*.json"
    missing = [p.name for p in ui_workflows() if not p.with_suffix(".jpg").exists()]
    assert not missing, f"no thumbnail for {missing}: run python workflows/make_thumbnails.py"
    for path in ui_workflows():
        data = path.with_suffix(".jpg").read_bytes()
        assert is_jpeg(data) and 5_000 < len(data) < 400_000, path.with_suffix(".jpg").name


def test_thumbnails_are_frames_of_the_right_model():
    """The plan the script follows: built-in workflows show their own model's video for their own prompt;
    the official ones the tiny model's, labelled."""
    make_thumbnails = pytest.importorskip("workflows.make_thumbnails")
    for path in ui_workflows():
        job = make_thumbnails.plan(path)
        assert job["model"] in ("tiny", "bench") and 24 <= job["frames"] <= make_thumbnails.MAX_FRAMES
        nodes = {}
        for node in json.loads(path.read_text())["nodes"]:
            nodes.setdefault(node["type"], node)  # the first of each type, as the script reads them
        if "MAGI1TinyTextEncode" in nodes:
            text, model = nodes["MAGI1TinyTextEncode"]["widgets_values"][:2]
            assert job["model"] == model and "built-in" in job["label"]
            if "\n" not in text:
                assert job["prompt"] == text
        else:
            assert job["model"] == "tiny" and "tiny model output" in job["label"]


def test_thumbnail_grid_layout():
    torch = pytest.importorskip("torch")
    make_thumbnails = pytest.importorskip("workflows.make_thumbnails")
    pytest.importorskip("PIL")
    video = torch.linspace(-1, 1, 48).view(1, 48, 1, 1).expand(3, 48, 8, 8)
    sheet = make_thumbnails.frame_grid(video, "label")
    tile = make_thumbnails.TILE
    assert sheet.size == (2 * tile, 2 * tile + make_thumbnails.BAR)
    first, last = sheet.getpixel((tile // 2, tile // 2)), sheet.getpixel((tile + tile // 2, tile + tile // 2))
    assert first[0] < last[0]  # frames in time order: top left early, bottom right late


@needs_comfyui
def test_comfyui_lists_the_workflows_as_templates(server):  # noqa: F811
    listed = get(server.url, "/api/workflow_templates")
    assert PACK_FOLDER in listed, listed
    assert sorted(listed[PACK_FOLDER]) == [p.stem for p in ui_workflows()]  # api/ (API format) not listed
    for path in ui_workflows():
        base = f"{server.url}/api/workflow_templates/{PACK_FOLDER}/"
        with urllib.request.urlopen(base + path.name, timeout=30) as response:
            assert json.load(response)["nodes"], path.name
        with urllib.request.urlopen(base + path.with_suffix(".jpg").name, timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            assert response.read() == path.with_suffix(".jpg").read_bytes()

