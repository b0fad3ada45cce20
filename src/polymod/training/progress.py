"""What a run shows and records: a progress bar (or plain log lines) and a JSONL metrics log.

The log ``<output>/metrics.jsonl`` has one JSON object per line, either a
training record (``{"kind": "train", "step", "loss", "lr", "grad_norm",
"examples_per_s", "tokens_per_s", ...}``) or an evaluation record (``{"kind":
"eval", "step", "loss", "accuracy", ...}``). On resume, records after the
checkpoint's step are dropped first, so the log of a resumed run reads like the
log of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class MetricsLog:
    """Append-only JSONL log (no-op without a path)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records whose step is after ``step`` (the part of an interrupted run that is replayed)."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (non-finite numbers become null, which JSON can carry)."""
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


logger = logging.getLogger("polymod.training")


def in_notebook() -> bool:
    """Whether this process runs in a Jupyter kernel (where stderr is not a TTY but rich can draw)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    kernel = get() if callable(get) else None
    return kernel is not None and type(kernel).__name__ == "ZMQInteractiveShell"


class ProgressBar:
    """What a run shows while it trains.

    * On a terminal, or in a Jupyter notebook: a rich progress bar with step, loss and throughput.
    * Anywhere else (a log file, CI, a batch job): plain lines through :mod:`logging` on the
      ``polymod.training`` logger, at most one per ``interval`` seconds plus the last step, e.g.
      ``step 120/500 (24%) · loss 0.4312 · 35.1 ex/s · 2,210 tok/s · 0:01:40 left``.
    * :meth:`summary` logs one final line with the steps, time and last training loss (always).

    Args:
        total: steps of the run.
        start: the step it starts from (a resumed run).
        enabled: draw a bar / log progress lines at all (the summary is logged regardless).
        interval: least seconds between two plain progress lines.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True, interval: float = 10.0):
        self._progress: Progress | None = None
        self.total, self.start, self.interval = total, start, interval
        self._began = self._last_line = time.monotonic()
        self._lines = enabled and not (sys.stderr.isatty() or in_notebook())
        if not enabled or self._lines:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, info="")
        self._progress.start()

    def update(self, step: int, loss: float, examples_per_s: float, tokens_per_s: float) -> None:
        """Show the latest step, loss and throughput."""
        info = f"loss {loss:.4f} · {examples_per_s:,.1f} ex/s · {tokens_per_s:,.0f} tok/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
            return
        now = time.monotonic()
        if self._lines and (now - self._last_line >= self.interval or step >= self.total):
            self._last_line = now
            done = max(step - self.start, 1)
            left = (now - self._began) / done * (self.total - step)
            logger.info("step %d/%d (%d%%) · %s · %s left", step, self.total, 100 * step // max(self.total, 1), info,
                        _clock(left))

    def summary(self, step: int, last_loss: float | None, evaluation: dict[str, Any] | None) -> str:
        """Log (and return) the run's final line: steps, wall time, last training loss and evaluation."""
        parts = [f"trained {step - self.start} steps (to step {step}) in {_clock(time.monotonic() - self._began)}"]
        parts.append(f"last training loss {last_loss:.4f}" if last_loss is not None else "no training loss logged")
        if evaluation:
            parts.append("eval " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in evaluation.items()))
        line = " · ".join(parts)
        logger.info(line)
        return line

    def close(self) -> None:
        """Stop drawing."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
