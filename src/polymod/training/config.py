"""Training hyper-parameters: one frozen dataclass, validated whole.

Defaults and where they come from:

* ``lr = 3e-4``: between the 1e-4 of adapter training (Houlsby et al. 2019;
  Pfeiffer et al. 2021) and the 2e-4–5e-4 of LoRA on RoBERTa-base (Hu et al.
  2022, Table 9); modules are small, so rates well above full fine-tuning's
  ~2e-5 are the norm.
* ``warmup = 0.06`` of the steps, then linear decay to zero: the RoBERTa/LoRA
  GLUE recipe (Liu et al. 2019; Hu et al. 2022).
* ``weight_decay = 0.0``, ``max_grad_norm = 1.0``, AdamW betas (0.9, 0.999),
  eps 1e-8: the Hugging Face ``TrainingArguments`` defaults.
* ``precision = "auto"``: bf16 autocast on a CUDA device that supports it,
  fp32 otherwise (bf16 on CPU is opt-in: it is slower than fp32 on many CPUs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from polymod.errors import ConfigError

Schedule = Literal["linear", "cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
_SCHEDULES = ("linear", "cosine", "constant")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_MODES = ("min", "max")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimiser, schedule, batching, evaluation, checkpoints.

    Args:
        steps: optimiser steps to run (each takes ``grad_accum`` micro-batches).
        batch_size: examples per micro-batch (the *global* micro-batch under data parallelism).
        grad_accum: micro-batches whose gradients are summed before one optimiser step.
        lr: peak learning rate of AdamW.
        lr_scale: per trained name (as in ``train=``), a multiplier on ``lr`` (e.g. a router learning faster).
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's (β₁, β₂).
        eps: AdamW's ε.
        schedule: learning-rate decay after warm-up: ``linear`` or ``cosine`` to zero, or ``constant``.
        warmup: warm-up length: a fraction of ``steps`` when < 1, else a number of steps.
        max_grad_norm: clip the global gradient norm of the trained parameters (None: no clipping).
        precision: ``auto``, ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling, CUDA only).
        seed: seeds Python, NumPy and torch and fixes the data order.
        eval_every: evaluate every this many steps (0: only at the end).
        eval_batch_size: micro-batch size for evaluation (None: ``batch_size``).
        monitor: the evaluation number early stopping and ``restore_best`` watch (e.g. ``loss``, ``accuracy``,
            ``taskA/accuracy``); with several tasks a bare name means the mean over tasks (``mean/<name>``).
        mode: whether ``monitor`` should go down (``min``) or up (``max``).
        patience: stop after this many evaluations without improvement (None: never stop early).
        restore_best: at the end, put back the trained weights of the best evaluation.
        checkpoint_every: write a resumable checkpoint every this many steps (0: none).
        keep_checkpoints: how many recent checkpoints to keep on disk.
        log_every: write a training record to the JSONL log every this many steps.
        progress: show a progress bar (only on a terminal, only on rank 0).
        aux_loss_weight: factor on the routers' auxiliary losses, added to the task loss.
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    lr_scale: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Schedule = "linear"
    warmup: float = 0.06
    max_grad_norm: float | None = 1.0
    precision: Precision = "auto"
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int | None = None
    monitor: str = "loss"
    mode: Literal["min", "max"] = "min"
    patience: int | None = None
    restore_best: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    aux_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid field, one message each (empty when the config is valid)."""
        out: list[str] = []

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                out.append(f"{name} = {getattr(self, name)!r}; expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(is_int(self.steps) and self.steps >= 1, "steps", "an integer ≥ 1")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer ≥ 1")
        need(is_int(self.grad_accum) and self.grad_accum >= 1, "grad_accum", "an integer ≥ 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "a positive number")
        need(isinstance(self.lr_scale, dict) and all(isinstance(k, str) and is_num(v) and v > 0
                                                     for k, v in self.lr_scale.items()),
             "lr_scale", "a mapping of trained names to positive multipliers")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number ≥ 0")
        need(isinstance(self.betas, tuple) and len(self.betas) == 2 and all(is_num(b) and 0 <= b < 1
                                                                             for b in self.betas),
             "betas", "two numbers in [0, 1)")
        need(is_num(self.eps) and self.eps > 0, "eps", "a positive number")
        need(self.schedule in _SCHEDULES, "schedule", f"one of {', '.join(_SCHEDULES)}")
        need(is_num(self.warmup) and self.warmup >= 0, "warmup", "a fraction < 1 or a number of steps ≥ 1")
        need(self.max_grad_norm is None or (is_num(self.max_grad_norm) and self.max_grad_norm > 0),
             "max_grad_norm", "a positive number or null")
        need(self.precision in _PRECISIONS, "precision", f"one of {', '.join(_PRECISIONS)}")
        need(is_int(self.seed), "seed", "an integer")
        need(is_int(self.eval_every) and self.eval_every >= 0, "eval_every", "an integer ≥ 0")
        need(self.eval_batch_size is None or (is_int(self.eval_batch_size) and self.eval_batch_size >= 1),
             "eval_batch_size", "an integer ≥ 1 or null")
        need(isinstance(self.monitor, str) and bool(self.monitor), "monitor", "an evaluation metric name")
        need(self.mode in _MODES, "mode", "'min' or 'max'")
        need(self.patience is None or (is_int(self.patience) and self.patience >= 1), "patience",
             "an integer ≥ 1 or null")
        need(isinstance(self.restore_best, bool), "restore_best", "true or false")
        need(is_int(self.checkpoint_every) and self.checkpoint_every >= 0, "checkpoint_every", "an integer ≥ 0")
        need(is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "keep_checkpoints", "an integer ≥ 1")
        need(is_int(self.log_every) and self.log_every >= 1, "log_every", "an integer ≥ 1")
        need(isinstance(self.progress, bool), "progress", "true or false")
        need(is_num(self.aux_loss_weight) and self.aux_loss_weight >= 0, "aux_loss_weight", "a number ≥ 0")
        if (self.patience is not None or self.restore_best) and is_int(self.eval_every) and self.eval_every == 0:
            out.append("patience/restore_best need periodic evaluation; set eval_every ≥ 1")
        return out

    @property
    def warmup_steps(self) -> int:
        """Warm-up length in optimiser steps."""
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["lr_scale"] = dict(self.lr_scale)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, reporting unknown keys and every invalid value at once.

        Raises:
            ConfigError: unknown keys or invalid values (all of them in one message).
        """
        problems = config_problems(data)
        if problems:
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))
        return cls(**data)


def config_problems(data: Any) -> list[str]:
    """Problems of a would-be :class:`TrainConfig` dict, without raising (for whole-file validation)."""
    if not isinstance(data, dict):
        return [f"the training section must be a mapping, got {type(data).__name__}"]
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(data) - set(names))
    out = [f"unknown training setting {k!r}; known: {', '.join(names)}" for k in unknown]
    known = {k: v for k, v in data.items() if k in names}
    if isinstance(known.get("betas"), list):
        known["betas"] = tuple(known["betas"])
    probe = object.__new__(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        object.__setattr__(probe, f.name, known.get(f.name, default))
    return out + probe.problems()
