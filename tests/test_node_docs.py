"""The documentation: a help page per node in ComfyUI's node-documentation convention (the pack's
``WEB_DIRECTORY`` holds ``docs/<node id>.md``, which the frontend shows in the node's help panel), each naming
every input and output of its node's schema; the README and ``docs/`` linking every chapter; and every
relative link in ``README.md``, ``docs/`` and ``web/docs/`` resolving, anchors included."""

import ast
import re
from pathlib import Path

import pytest

from comfy_stubs import node_schemas

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "web" / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BULLET_NAME = re.compile(r"^- \*\*`([^`]+)`\*\*", re.MULTILINE)


def web_directory():
    """The value the pack's top-level ``__init__.py`` assigns to ``WEB_DIRECTORY`` (None without one)."""
    for node in ast.parse((ROOT / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEB_DIRECTORY" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


PAGES = ROOT / (web_directory() or "web") / "docs"


@pytest.fixture(scope="module")
def schemas():
    return node_schemas()


def prose(text):
    """Markdown without its fenced code blocks and inline code (what is shown as code is not a link or heading)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def section(text, title):
    """The body of the ``## title`` section of a page ('' when it has none)."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return found.group(1) if found else ""


def anchors(path):
    """The anchors GitHub gives the headings of a Markdown file (lower case, punctuation dropped, spaces
    to hyphens, repeats numbered)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(path):
    """The relative links of a Markdown file: (target path, anchor or None)."""
    found = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        found.append(((path.parent / file).resolve() if file else path, anchor or None))
    return found


def output_name(output):
    """The name ComfyUI shows on an output: its display name, else its type's."""
    return output.options.get("display_name") or output.io_type


def test_the_pack_declares_its_web_directory():
    assert web_directory() == "./web", "ComfyUI serves WEB_DIRECTORY/docs/<node id>.md as the node's help page"
    assert PAGES.is_dir()


def test_every_node_has_a_help_page_and_every_page_is_a_node(schemas):
    pages = {page.stem for page in PAGES.glob("*.md")}
    assert set(schemas) - pages == set(), "nodes without a help page"
    assert pages - set(schemas) == set(), "help pages named after no node of the pack"


def test_each_page_names_its_node_and_documents_every_input_and_output(schemas):
    problems = []
    for node_id, schema in schemas.items():
        text = (PAGES / f"{node_id}.md").read_text()
        if text.splitlines()[0] != f"# {schema.display_name}" or f"`{node_id}`" not in text:
            problems.append(f"{node_id}: the page must open with '# {schema.display_name}' and name `{node_id}`")
        inputs, outputs = section(text, "Inputs"), section(text, "Outputs")
        documented = BULLET_NAME.findall(inputs)
        declared = [inp.id for inp in schema.inputs]
        if sorted(documented) != sorted(declared):
            problems.append(f"{node_id}: inputs documented {documented}, declared {declared}")
        for output in schema.outputs:
            if f"`{output_name(output)}`" not in outputs:
                problems.append(f"{node_id}: output {output_name(output)} not under '## Outputs'")
        if not section(text, "Tips").strip():
            problems.append(f"{node_id}: no '## Tips'")
    assert not problems, "\n".join(problems)


def test_every_relative_link_resolves():
    broken = []
    for path in MARKDOWN:
        for target, anchor in links(path):
            where = f"{path.relative_to(ROOT)} -> {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}"
            if not target.exists():
                broken.append(f"{where}: no such file")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{where}#{anchor}: no such heading")
            if path.parent == PAGES and target.parent != PAGES:
                # ComfyUI serves only the web directory: a help page's link outside it is dead in the panel
                broken.append(f"{where}: a help page may link only to other help pages")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_chapter_in_docs_and_every_node_page():
    readme = {target for target, _ in links(ROOT / "README.md")}
    index = {target for target, _ in links(DOCS / "README.md")}
    chapters = set(DOCS.glob("*.md"))
    assert chapters - readme == set(), "docs/ files the README does not link"
    assert chapters - index - {DOCS / "README.md"} == set(), "docs/ files docs/README.md does not list"
    assert set(PAGES.glob("*.md")) - readme == set(), "node help pages the README does not link"


def test_the_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move the detail to docs/"
