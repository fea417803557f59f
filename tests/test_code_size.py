"""Small rooms: no function over 60 lines and no class over 200 in the runtime packages (magi1/,
cache_core/, nodes/), so that each piece can be read at once. The DiT's forward and its call set-up
are the one exception (they follow the official model's structure)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 200
EXCEPTIONS = set()


def definitions(path):
    """``(qualified name, kind, lines)`` of every function and class of a file."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                found.append((name, kind, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")

    visit(ast.parse(path.read_text()), "")
    return found


def test_no_long_function_or_class_in_the_runtime():
    too_long = []
    for folder in ("magi1", "cache_core", "nodes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for name, kind, lines in definitions(path):
                limit = MAX_CLASS_LINES if kind == "class" else MAX_FUNCTION_LINES
                if lines > limit and (relative, name) not in EXCEPTIONS:
                    too_long.append(f"{relative}: {kind} {name} has {lines} lines (at most {limit})")
    assert not too_long, "\n".join(too_long)


def test_the_size_rule_sees_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text("class A:\n    def f(self):\n" + "        x = 1\n" * 70)
    assert ("A.f", "function", 71) in definitions(source)


def test_the_two_checks_modules_stay_one_helper():
    """magi1 and cache_core may not import each other, so each has the same argument checks: they must not
    drift apart (only their docstrings differ)."""
    bodies = []
    for package in ("magi1", "cache_core"):
        tree = ast.parse((ROOT / package / "checks.py").read_text())
        tree.body = tree.body[1:]  # the module docstring
        bodies.append(ast.dump(tree))
    assert bodies[0] == bodies[1]
