"""The pack's foundation: layout, import hygiene, metadata, and the README's commands."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_PACKAGES = ("cache_core", "magi1", "nodes")
OFFLINE_PACKAGES = ("train",)  # repository tools the pack never imports (train/: the tiny model's training)
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server")


def pack_sources(*folders):
    """The pack's own Python files (not the tests), optionally restricted to some top-level folders."""
    files = [ROOT / "__init__.py"] if not folders else []
    for folder in folders or PACK_PACKAGES:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def imports(path):
    """(module, level) for every import statement of a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def resolved_imports(path):
    """Every module a file imports, as an absolute dotted name (relative imports resolved against the
    repository root, where the pack's folders are top level); ``from X import y`` gives X and X.y."""
    package = list(path.relative_to(ROOT).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [module] if module else []
            found += [f"{module}.{alias.name}" if module else alias.name for alias in node.names]
    return found


def test_layout():
    for name in ("__init__.py", "nodes", "cache_core", "workflows", "tests", "magi1", "programs", "pyproject.toml",
                 "README.md", "LICENSE", "requirements.txt", ".ci/run"):
        assert (ROOT / name).exists(), name
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_importing_the_pack_outside_comfyui_is_silent_and_registers_nothing():
    script = f"""
import importlib.util, sys
before = list(sys.path)
spec = importlib.util.spec_from_file_location("magipack", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["magipack"] = pack
spec.loader.exec_module(pack)
assert not hasattr(pack, "comfy_entrypoint"), "registered nodes without ComfyUI"
assert sys.path == before, "the pack changed sys.path"
import magipack.cache_core, magipack.magi1
assert magipack.cache_core.CachePolicy().mode == "motion_detail"
"""
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_no_code_touches_sys_path():
    for path in pack_sources() + sorted((ROOT / "bench").rglob("*.py")) + sorted((ROOT / "train").rglob("*.py")):
        assert "sys.path" not in path.read_text(), f"{path.relative_to(ROOT)} mentions sys.path"


# `python -m magi1` runs magi1/__main__.py, which hands over to the program outside the library
# (programs/cli.py, run from the pack's folder, where `programs` is a top-level package): its one absolute import.
PROGRAM_IMPORTS = {ROOT / "magi1" / "__main__.py": {"programs"}}


def test_imports_inside_the_pack_are_relative():
    for path in pack_sources():
        allowed = PROGRAM_IMPORTS.get(path, set())
        for module, level in imports(path):
            if level == 0 and module.split(".")[0] not in allowed:
                assert module.split(".")[0] not in PACK_PACKAGES, f"{path.relative_to(ROOT)}: absolute import {module}"


def test_cache_core_and_magi1_never_import_comfyui():
    for path in pack_sources("cache_core", "magi1"):
        for module, level in imports(path):
            if level == 0:
                assert module.split(".")[0] not in COMFY_MODULES, f"{path.relative_to(ROOT)} imports {module}"
            else:  # relative imports stay inside their own top-level package (subpackages may climb to it)
                depth = len(path.relative_to(ROOT).parts) - 1
                assert level <= depth, f"{path.relative_to(ROOT)} reaches outside its package ({'.' * level}{module})"


def test_the_pack_never_imports_the_offline_tools():
    """Nothing the pack runs (its __init__, cache_core, magi1, nodes) imports train/, absolutely or relatively."""
    for path in pack_sources():
        for module in resolved_imports(path):
            assert module.split(".")[0] not in OFFLINE_PACKAGES, f"{path.relative_to(ROOT)} imports {module}"


def test_train_is_not_a_runtime_package():
    """train/ stays outside the runtime: not a pack package, not installed, not loaded by importing the pack,
    and it reaches the pack only through absolute imports (``from magi1... import``)."""
    assert not set(OFFLINE_PACKAGES) & set(PACK_PACKAGES)
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"] == []
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("magipack", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["magipack"] = pack
spec.loader.exec_module(pack)
import magipack.cache_core, magipack.magi1, magipack.magi1.builtin, magipack.magi1.builtin.text_encoder
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "train" or m.startswith("magipack.train"))
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for path in sorted((ROOT / "train").rglob("*.py")):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no module docstring"
        for module, level in imports(path):
            if level:  # relative imports stay inside train/
                assert module.split(".")[0] not in PACK_PACKAGES and level <= len(path.relative_to(ROOT).parts) - 1, \
                    f"{path.relative_to(ROOT)} reaches outside train/ ({'.' * level}{module})"


def test_cache_core_needs_only_torch_numpy_einops():
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy", "einops"}
    for path in pack_sources("cache_core"):
        for module, level in imports(path):
            if level == 0:
                assert module.split(".")[0] in allowed, f"{path.relative_to(ROOT)} imports {module}"


def test_cache_core_public_api():
    import cache_core

    for name in ("motion_weights", "detail_weights", "combine_weights", "CachePolicy", "CacheState", "ChunkStep",
                 "Decision"):
        assert name in cache_core.__all__ and hasattr(cache_core, name)


def test_pyproject_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "magi1-motiondetailcache" and project["description"]
    # The version is the newest CHANGELOG entry: a breaking change to saved workflows is listed there.
    newest = re.search(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert newest and project["version"] == newest.group(1)
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert deps == {"torch", "einops", "numpy", "safetensors", "ftfy", "beautifulsoup4", "av"}
    assert project["optional-dependencies"]["gpu"] == ["flash-attn"]
    assert any(d.startswith("pytest") for d in project["optional-dependencies"]["test"])
    assert "Repository" in project["urls"]
    comfy = meta["tool"]["comfy"]
    assert comfy["DisplayName"] == "MAGI-1 MotionDetailCache"
    assert comfy["PublisherId"] and comfy["Icon"].endswith(".png") and comfy["requires-comfyui"].startswith(">=")
    icon = comfy["Icon"].rsplit("/main/", 1)[-1]
    assert (ROOT / icon).read_bytes().startswith(b"\x89PNG"), "the Icon URL must point at a PNG in the repo"
    assert meta["tool"]["setuptools"]["packages"] == [], "the pack must never install its folders as packages"
    assert meta["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_requirements_are_loose_and_flash_attn_optional():
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert {r.split(">")[0] for r in reqs} == {"torch", "einops", "numpy", "safetensors", "ftfy", "beautifulsoup4", "av"}
    assert not any("==" in r for r in reqs), "pins break other packs"


def readme_commands():
    """Shell lines of the README's fenced bash blocks, with their line numbers."""
    lines, found, inside = (ROOT / "README.md").read_text().splitlines(), [], False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside = line.strip() == "```bash"
        elif inside:
            found.append((number, line.strip()))
    return found


def test_readme_first_screen_has_what_install_and_test():
    commands = dict((line, number) for number, line in readme_commands())
    first_screen = 60
    text = (ROOT / "README.md").read_text().splitlines()[:first_screen]
    assert "MotionDetailCache" in text[0] and any("MAGI-1" in line for line in text[:5])
    assert commands["comfy node install magi1-motiondetailcache"] <= first_screen
    assert any("custom_nodes" in line for line in commands) and any("requirements.txt" in line for line in commands)
    assert commands["python -m pytest -q"] <= first_screen


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    readme = [line for _, line in readme_commands()]
    test_command = next(line for line in readme if "pytest" in line)
    assert ci_lines[-1] == test_command
    assert 'pip install -q ".[test]"' in ci_lines and 'pip install ".[test]"' in readme
    assert any(ln.startswith("python3 -m venv") for ln in ci_lines) and "set -euo pipefail" in ci_lines


@pytest.mark.parametrize("folder", ["cache_core", "magi1", "nodes"])
def test_every_module_has_a_docstring(folder):
    for path in pack_sources(folder):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"


WINGS = sorted(p.name for p in (ROOT / "magi1").iterdir() if (p / "__init__.py").exists() and p.name != "builtin")


def _wing_imports(path):
    """The magi1 modules a module imports, as dotted names below magi1 (relative imports resolved)."""
    package = list(path.relative_to(ROOT).parent.parts)  # e.g. ["magi1", "network"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [base + [alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "magi1":
                names = [node.module.split(".")]
            else:
                continue
            found |= {".".join(parts[1:]) for parts in names if parts and parts[0] == "magi1"}
    return found


@pytest.mark.parametrize("wing", WINGS)
def test_each_wing_imports_only_what_its_docstring_allows(wing):
    """magi1's subpackages import each other in one direction: each ``__init__`` docstring's "May import" line
    names the other wings it may use (``magi1.checks`` and its own modules always)."""
    doc = ast.get_docstring(ast.parse((ROOT / "magi1" / wing / "__init__.py").read_text()))
    assert doc and "May import:" in doc, wing
    allowed = set(re.findall(r"``magi1\.(\w+)``", doc.split("May import:")[1])) | {"checks", wing}
    assert allowed - {"checks", wing} <= set(WINGS) | {"builtin"}, allowed  # builtin: the built-in models
    bad = {}
    for path in sorted((ROOT / "magi1" / wing).glob("*.py")):
        used = {name.split(".")[0] for name in _wing_imports(path)} - {""}
        if used - allowed:
            bad[path.name] = sorted(used - allowed)
    assert not bad, f"magi1.{wing} may import {sorted(allowed)}; these modules reach further: {bad}"


def test_the_wings_hold_every_library_module():
    """Besides its wings, magi1/ holds only its __init__, the shared checks, the built-in models and the hand-over
    to ``python -m magi1``'s program (``programs/cli.py``)."""
    loose = sorted(p.name for p in (ROOT / "magi1").glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "checks.py"], loose
    assert {"network", "weights", "video", "prompts", "sampling", "distributed", "planning"} <= set(WINGS)

