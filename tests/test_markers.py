"""The markers of tests/conftest.py name tests that exist: a renamed or removed test would otherwise drop out
of its marker silently (and a slow test would land in the quick subset)."""

import ast
from pathlib import Path

import conftest

TESTS = Path(__file__).parent


def functions_of(file):
    tree = ast.parse((TESTS / file).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_marked_test_exists():
    missing = []
    for table in (conftest.MULTIPROCESS, conftest.COMFYUI, conftest.SLOW):
        for file, names in table.items():
            missing += [f"{file}::{name}" for name in names - functions_of(file)]
    for file in conftest.MULTIPROCESS_FILES | conftest.COMFYUI_FILES:
        if not (TESTS / file).exists():
            missing.append(file)
    assert not missing, missing


def test_the_marker_names_are_registered_and_documented():
    assert set(conftest.MARKERS) == {"multiprocess", "comfyui", "slow", "quick"}
    for name in conftest.MARKERS:
        assert f"-m {name}" in conftest.__doc__ or f"``{name}``" in conftest.__doc__
