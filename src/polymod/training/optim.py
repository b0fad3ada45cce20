"""Optimiser, learning-rate schedule and mixed precision for a training run.

The schedule is a multiplier on the peak rate for step t = 0 … S-1: linear
warm-up over the first ``w`` steps, then ``linear`` or ``cosine`` decay
towards 0 at step S, or ``constant``. Every step, the first included, gets a
non-zero rate::

    m(t) = (t + 1) / w                            t < w
    m(t) = (S - t) / (S - w)                      linear
    m(t) = ½ (1 + cos(π (t - w) / (S - w)))       cosine
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch

from polymod.errors import ConfigError
from polymod.training.config import TrainConfig


class LRMultiplier:
    """The warm-up + decay multiplier m(step); an object (not a lambda) so the scheduler state is plain data."""

    def __init__(self, schedule: str, warmup: int, total: int):
        self.schedule, self.warmup, self.total = schedule, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        progress = min(progress, 1.0)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def build_optimizer(params: Sequence[torch.nn.Parameter] | Sequence[dict], config: TrainConfig):
    """AdamW over ``params`` (or parameter groups, each with its own ``lr``) and its LambdaLR schedule.

    Returns:
        (optimizer, scheduler).
    """
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    multiplier = LRMultiplier(config.schedule, config.warmup_steps, config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return optimizer, scheduler


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: full precision).

    Raises:
        ConfigError: fp16 without CUDA, or bf16 on a CUDA device without bf16.
    """
    cuda = device.type == "cuda"
    if precision == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    if precision == "fp32":
        return None
    if precision == "fp16":
        if not cuda:
            raise ConfigError(f"precision 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'fp32'")
        return torch.float16
    if cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("this CUDA device has no bf16 support; use precision 'fp16' or 'fp32'")
    return torch.bfloat16


def autocast_factory(dtype: torch.dtype | None,
                     device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for ``dtype`` (a null context for full precision)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
