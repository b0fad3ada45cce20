"""Feedback outside a terminal (issue 14, item 7): plain log lines, notebook bars, a final summary, plots."""

from __future__ import annotations

import json
import logging

import pytest

import polymod as pm
from polymod.training import progress
from polymod.training.plot import curves
from tests.hosts import make_host
from tests.test_train_cli import _cli, _host_dir, _write
from tests.test_train_util import classification_data, one_thread  # noqa: F401


def _fit(**cfg):
    model = pm.Modular(make_host("bert"))
    model.add("t", pm.LoRA(rank=2, sites="linear"))
    model.use("t")
    config = pm.TrainConfig(**{"steps": 4, "batch_size": 8, "log_every": 1, "lr": 1e-2, **cfg})
    return pm.Trainer(model, ["t"], classification_data(32), eval_data=classification_data(16, seed=1),
                      metrics=["accuracy"], config=config).fit()


def test_plain_log_lines_and_a_summary_when_not_on_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="polymod.training"):
        result = _fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "polymod.training"]
    assert any(line.startswith("step 4/4 (100%) · loss ") and line.endswith(" left") for line in lines), lines
    summary = lines[-1]
    assert summary.startswith("trained 4 steps (to step 4) in 0:00:")
    assert f"last training loss {result.train_loss:.4f}" in summary and "eval loss " in summary
    assert "accuracy" in summary and result.train_loss is not None


def test_log_lines_are_rate_limited_and_progress_false_silences_them(caplog, monkeypatch):
    bar = progress.ProgressBar(100, enabled=True, interval=3600)
    with caplog.at_level(logging.INFO, logger="polymod.training"):
        for step in range(1, 100):
            bar.update(step, 1.0, 10.0, 100.0)
        assert not caplog.records  # within the interval nothing but the last step is logged
        bar.update(100, 0.5, 10.0, 100.0)
        assert [r.getMessage().split(" · ")[0] for r in caplog.records] == ["step 100/100 (100%)"]
        caplog.clear()
        _fit(progress=False)
    assert [r.getMessage() for r in caplog.records][0].startswith("trained 4 steps")  # only the summary


def test_a_bar_is_drawn_in_a_notebook(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    bar = progress.ProgressBar(10, enabled=True)
    try:
        assert bar._progress is not None and not bar._lines
    finally:
        bar.close()
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    bar = progress.ProgressBar(10, enabled=True)
    assert bar._progress is None and bar._lines  # pytest's stderr is not a terminal


def test_polymod_plot_draws_the_curves(tmp_path, monkeypatch, capsys):
    _host_dir(tmp_path)
    cfg = _write(tmp_path, None)
    cfg["training"].update(steps=6, eval_every=3, checkpoint_every=0, log_every=2)
    (tmp_path / "train.yaml").write_text(json.dumps(cfg))
    code, out, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "train.yaml"))
    assert code == 0, err
    assert isinstance(json.loads(out)["train_loss"], float)  # the summary carries the last training loss
    series = curves(progress.read_log(tmp_path / "run" / "metrics.jsonl"))
    assert series["train/loss"][0] == [2, 4, 6] and series["eval/accuracy"][0] == [3, 6]
    code, out, err = _cli(monkeypatch, capsys, "plot", str(tmp_path / "run"))
    assert code == 0, err
    png = tmp_path / "run" / "metrics.png"
    assert out.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    code, _, err = _cli(monkeypatch, capsys, "plot", str(tmp_path / "nowhere"))
    assert code == 1 and "metrics.jsonldoesnotexist" in "".join(err.split())


@pytest.mark.parametrize("records", [[], [{"kind": "eval", "step": 1, "note": "x"}]])
def test_plot_refuses_a_log_without_numbers(tmp_path, records):
    from polymod.training.plot import plot_run

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(pm.ConfigError, match="holds no training or evaluation numbers"):
        plot_run(tmp_path)
