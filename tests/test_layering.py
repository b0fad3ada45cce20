"""Imports point one way (DESIGN.md, "Layout"): no cycles, the core never imports an outer layer,
and no import hides inside a function unless it is an optional dependency."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tests.layering import OPTIONAL, SLOW, analyse, summary

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "polymod"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in {p.parent for p in root.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return root


def test_analysis_finds_cycles_through_relative_and_absolute_imports(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from . import b\n",
        "b.py": "from pkg.sub.c import thing\n",
        "sub/c.py": "def f():\n    from ..a import x\n",  # a cycle hidden in a function is still a cycle
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "e.py": "import pkg.d\n",  # d -> e only for type checking: no cycle
    })
    report = analyse(root)
    assert report.cycles == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert report.files_in_cycles == 3
    assert [(e.source, e.target) for e in report.function_other] == [("pkg.sub.c", "pkg.a")]


def test_analysis_sees_cycles_through_package_initialisation(tmp_path):
    root = _package(tmp_path, {
        "routing/__init__.py": "from pkg.routing.arrow import Arrow\n",
        "routing/base.py": "class Inputs: ...\n",
        "routing/arrow.py": "from pkg.routing.base import Inputs\nfrom pkg.modules.contract import Module\n",
        "modules/contract.py": "from pkg.routing.base import Inputs\n",  # runs routing/__init__ -> arrow -> here
    })
    assert analyse(root).cycles == [["pkg.modules.contract", "pkg.routing", "pkg.routing.arrow"]]


def test_analysis_flags_upward_imports_and_function_imports(tmp_path):
    root = _package(tmp_path, {
        "modular.py": "from pkg.hub import store\n",  # core -> outer: upward
        "hub/store.py": "import json\nfrom pkg import modular\n",  # outer -> core: fine
        "cli.py": "def main():\n    import peft\n    import json\n",
        "demo.py": "from pkg import cli\n",  # top -> outer: fine
    })
    report = analyse(root)
    assert [(e.source, e.target, e.line) for e in report.upward] == [("pkg.modular", "pkg.hub.store", 1)]
    assert [e.target for e in report.function_optional] == ["peft"]
    assert [e.target for e in report.function_other] == ["json"]
    assert "upward imports (core -> outer layers): 1" in summary(report)


def test_analysis_counts_any_parameters_and_long_files(tmp_path):
    root = _package(tmp_path, {
        "m.py": "from typing import Any\n"
                "def f(a: Any, b: int, *args: Any, c: 'Any', **kw: Any) -> Any:\n    pass\n" + "\n" * 5,
    })
    report = analyse(root, long_file=5)
    assert [what for _, _, what in report.any_params] == ["f(a)", "f(c)"]
    assert report.long_files == [("pkg.m", 8)]


def test_optional_dependencies_are_not_required_ones():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].replace("-", "_").lower() for r in required}
    assert not names & set(OPTIONAL), "a required dependency belongs at the top of a file (or in SLOW, measured)"
    assert set(SLOW) <= names, "SLOW lists required dependencies only"
    assert all(reason.strip() for reason in [*OPTIONAL.values(), *SLOW.values()])


@pytest.fixture(scope="module")
def polymod_report():
    return analyse(PACKAGE)


def test_polymod_has_no_import_cycles(polymod_report):
    assert polymod_report.cycles == [], summary(polymod_report)


def test_polymod_core_never_imports_outer_layers(polymod_report):
    assert polymod_report.upward == [], summary(polymod_report)


def test_polymod_imports_inside_functions_only_optional_dependencies(polymod_report):
    where = [f"{e.source}:{e.line} -> {e.target}" for e in polymod_report.function_other]
    assert where == [], "move these imports to the top of their file (or name the dependency in OPTIONAL)"
