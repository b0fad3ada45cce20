"""The hub load benchmark's quick mode runs end to end (slow tier; no latency is asserted: the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_hub_load_quick(tmp_path):
    out = tmp_path / "hub_load.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_load.py"), "--quick", "--versions", "1000",
                          "--duration", "5", "--store", str(tmp_path / "store"), "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["versions"] == 1000 and result["searches"] > 0 and result["pages"] > 0
    assert result["health_probes"] > 0 and result["pushes"] > 0
    assert result["pushes_failed"] == 0, result["push_errors"]
    assert result["lost_versions"] == 0
    assert result["errors"] == {"search": 0, "page": 0, "health": 0}
    assert "search" in run.stdout and "/health" in run.stdout, "the table is printed"
