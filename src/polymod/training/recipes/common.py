"""Pieces shared by the recipes: training only some rows of a table, and a trainer call.

Few-shot adaptation (a new Polytropon task, a new hypernetwork task embedding)
trains one row of a parameter that holds every task's row. :func:`only_rows`
zeroes the other rows' gradients; with AdamW and no weight decay a zero
gradient moves nothing (its moments stay 0, so the update is exactly 0), so
every other row stays bit for bit what it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from polymod.training.config import TrainConfig
from polymod.training.trainer import Trainer, TrainResult


@contextlib.contextmanager
def only_rows(params: Sequence[nn.Parameter], rows: Sequence[int]) -> Iterator[None]:
    """Within the block, gradients of ``params`` reach only ``rows`` (along dimension 0)."""
    handles = []
    for p in params:
        keep = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)  # (rows, 1, …)
        keep[list(rows)] = 1
        handles.append(p.register_hook(lambda g, keep=keep: g * keep))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def without_decay(config: TrainConfig | None) -> TrainConfig:
    """``config`` with weight decay 0 (decay would move rows whose gradient is zero)."""
    return dataclasses.replace(config or TrainConfig(), weight_decay=0.0)


def fit(model: nn.Module, train: Any, data: Any, **trainer_args: Any) -> TrainResult:
    """``Trainer(model, train, data, **trainer_args).fit()``."""
    return Trainer(model, train, data, **trainer_args).fit()
