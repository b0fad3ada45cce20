"""What a run shows and records: a rich progress bar and a JSONL metrics log.

The log ``<output>/metrics.jsonl`` has one JSON object per line, either a
training record (``{"kind": "train", "step", "loss", "lr", "grad_norm",
"examples_per_s", "tokens_per_s", ...}``) or an evaluation record (``{"kind":
"eval", "step", "loss", "accuracy", ...}``). On resume, records after the
checkpoint's step are dropped first, so the log of a resumed run reads like the
log of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
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


class ProgressBar:
    """A rich progress bar with step, loss and throughput; silent when disabled or not on a terminal."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self._progress = None
        if not (enabled and sys.stderr.isatty()):
            return

        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, info="")
        self._progress.start()

    def update(self, step: int, loss: float, examples_per_s: float, tokens_per_s: float) -> None:
        """Show the latest step, loss and throughput."""
        if self._progress is not None:
            info = f"loss {loss:.4f} · {examples_per_s:,.1f} ex/s · {tokens_per_s:,.0f} tok/s"
            self._progress.update(self._task, completed=step, info=info)

    def close(self) -> None:
        """Stop drawing."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
