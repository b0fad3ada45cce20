"""Curves of a run: training loss and every evaluation number from ``metrics.jsonl``, drawn to a PNG.

``polymod plot runs/sentiment`` writes ``runs/sentiment/metrics.png``: the top
panel holds the training loss per logged step (and the evaluation loss, when
there is one); one panel per other evaluation number follows (``accuracy``,
``taskA/accuracy``, ...). matplotlib draws it (the ``dev`` extra, or
``pip install matplotlib``).
"""

from __future__ import annotations

import os
from pathlib import Path

from polymod.errors import ConfigError
from polymod.training.progress import read_log

METRICS_FILE = "metrics.jsonl"


def curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Series ``name -> (steps, values)``: ``train/loss`` and ``eval/<number>`` for every evaluation number."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        kind = r.get("kind")
        names = ["loss"] if kind == "train" else [k for k in r if k not in ("kind", "step")] if kind == "eval" else []
        for name in names:
            value = r.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = out.setdefault(f"{kind}/{name}", ([], []))
                steps.append(int(r["step"]))
                values.append(float(value))
    return out


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw a run's curves to a PNG.

    Args:
        run_dir: the run's ``output_dir`` (holding ``metrics.jsonl``), or the ``metrics.jsonl`` file itself.
        out: the PNG to write (default: ``metrics.png`` next to ``metrics.jsonl``).

    Returns:
        The PNG written.

    Raises:
        ConfigError: no ``metrics.jsonl``, no numbers in it, or matplotlib is not installed.
    """
    path = Path(run_dir)
    log = path if path.is_file() else path / METRICS_FILE
    if not log.is_file():
        raise ConfigError(f"{log} does not exist; give the output_dir of a `polymod train` run (or pm.Trainer's)")
    series = curves(read_log(log))
    if not series:
        raise ConfigError(f"{log} holds no training or evaluation numbers to plot")
    try:
        import matplotlib  # optional: the dev extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from exc
    losses = [k for k in ("train/loss", "eval/loss") if k in series]
    others = sorted(k for k in series if k not in losses)
    panels = ([losses] if losses else []) + [[k] for k in others]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, names in zip(axes[:, 0], panels):
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="o" if name.startswith("eval/") else None, markersize=3, label=name)
        ax.set_ylabel(names[0].split("/", 1)[1] if len(names) == 1 else "loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{log.parent.name}: {log.name}")
    fig.tight_layout()
    target = Path(out) if out is not None else log.with_name("metrics.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


__all__ = ["curves", "plot_run"]
