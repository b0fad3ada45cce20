"""polymod ships type information (issue 14, item 8): py.typed, and a user's script type-checks with mypy."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_is_marked_typed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert (ROOT / "src" / "polymod" / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["polymod"]  # shipped in the wheel
    assert any(d.startswith("mypy==") for d in project["project"]["optional-dependencies"]["dev"])  # pinned


@pytest.mark.slow  # ~10-60 s: mypy reads polymod's sources
def test_public_api_usage_type_checks(tmp_path):
    api = pytest.importorskip("mypy.api")
    out, err, code = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
                              str(ROOT / "tests" / "typing" / "public_api.py")])
    assert code == 0, out + err
    # and the check has teeth: a wrong use of a public signature is an error
    bad = tmp_path / "bad.py"
    bad.write_text("import polymod as pm\npm.LoRA(rank='8')\n")
    out, _, code = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
                            str(bad)])
    assert code == 1 and 'Argument "rank" to "LoRA" has incompatible type "str"; expected "int"' in out
