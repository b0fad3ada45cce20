"""The trainer: fit exactly the modules and routers the user names, on a frozen host.

::

    trainer = Trainer(model, train=["sentiment"], data=train_set, eval_data=dev_set,
                      metrics={"accuracy": accuracy}, config=TrainConfig(steps=500), output_dir="runs/s")
    result = trainer.fit()

One optimiser step = ``grad_accum`` micro-batches, each ``loss = task loss +
aux_loss_weight · Σ router auxiliary losses`` (``Modular.aux_loss()``), then
gradients averaged over data-parallel ranks (only the trained parameters'),
unscaled (fp16), clipped, AdamW, schedule. Everything else in the model —
the host and every module or router not named — has ``requires_grad`` off for
the run (flags restored afterwards), and the host's tensors are hashed before
and after: a changed host is an error, never a silent outcome.

Determinism: ``seed`` fixes the data order (:class:`~polymod.training.data.EpochStream`)
and seeds Python, NumPy and torch (``seed + rank``, so dropout differs across
ranks). ``polymod train`` applies the same seed once more *before* it builds
the host and the modules (:func:`polymod.training.build.build_run`), so a fresh
classification head and the modules' random initialisation are the same in
every run of one config. A checkpoint stores the trained weights, optimiser, schedule, loss
scaler, RNG states and data position, so resuming yields the same weights as
never stopping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polymod.errors import ConfigError
from polymod.training import checkpoint
from polymod.training import distributed as ddp
from polymod.training.config import TrainConfig
from polymod.training.data import fetch, host_inputs, tokens_of
from polymod.training.evaluate import METRICS, LossFn, Metric, host_loss
from polymod.training.host import HostGuard, require_active, resolve_trainables
from polymod.training.multitask import TaskStream, as_tasks, evaluate_tasks, routing
from polymod.training.optim import autocast_dtype, autocast_factory, build_optimizer, grad_scaler
from polymod.training.outputs import TrainResult, recipe, write_outputs
from polymod.training.progress import MetricsLog, ProgressBar

# Settings that may change between a run and its resumption without changing what is computed.
_RESUMABLE_CHANGES = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                      "patience"}


@dataclass
class _Progress:
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_loss: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "aux": 0.0, "micro": 0.0, "tokens": 0.0})


class Trainer:
    """Train named modules and routers of a :class:`~polymod.Modular` model.

    Args:
        model: the modular model; its host stays frozen.
        train: what to train: module or router names, ``nn.Module`` objects, or a mapping name → module.
            Parameters of these that already have ``requires_grad=False`` stay frozen.
        data: a dataset, a :class:`~polymod.training.multitask.Task`, or a mapping task name → Task.
        config: the hyper-parameters (default :class:`TrainConfig`).
        eval_data: evaluation dataset (single-task runs; tasks carry their own).
        metrics: name → metric, or names of built-in metrics (``accuracy``); ``loss`` is always reported.
        loss_fn: ``loss_fn(outputs, batch) -> loss``; default: the host's own loss from ``labels``.
        output_dir: where to write ``metrics.jsonl``, checkpoints, ``trained.safetensors`` and ``modules/``.
        temperature: T of multi-task sampling, p_i ∝ n_i^{1/T}.
        resume: True resumes from the latest checkpoint in ``output_dir`` (if any); a path resumes from it.
        verify_host: hash the host before and after training and raise if it changed.

    Raises:
        ConfigError: nothing to train, unknown names, a trained module that no composition runs
            (attached but not active), bad data or settings.
    """

    def __init__(self, model: nn.Module, train: Sequence[str | nn.Module] | Mapping[str, nn.Module], data: Any, *,
                 config: TrainConfig | None = None, eval_data: Any = None,
                 metrics: Mapping[str, Metric] | Sequence[str] | None = None, loss_fn: LossFn | None = None,
                 output_dir: str | Path | None = None, temperature: float = 5.0, resume: bool | str | Path = False,
                 verify_host: bool = True):
        self.model = model
        self.config = config or TrainConfig()
        self.tasks = as_tasks(data, eval_data)
        self.stream = TaskStream(self.tasks, temperature=temperature, seed=self.config.seed)
        self.trainables = resolve_trainables(model, train)
        require_active(model, self.trainables, [t.route for t in self.tasks.values()])
        self.metrics = _resolve_metrics(metrics)
        self.loss_fn: LossFn = loss_fn or host_loss
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.resume = resume
        self.guard = HostGuard(model, self.trainables, verify=verify_host)
        self.params = self.guard.trained_parameters
        self.device = self.params[0].device
        self.rank, self.world = ddp.rank_and_world()
        if self.config.checkpoint_every and self.output_dir is None:
            raise ConfigError("checkpoint_every needs an output_dir to write checkpoints into")
        if resume and self.output_dir is None and not isinstance(resume, (str, Path)):
            raise ConfigError("resume=True needs the output_dir of the run to resume")
        dtype = autocast_dtype(self.config.precision, self.device)
        self.autocast = autocast_factory(dtype, self.device)
        self.scaler = grad_scaler(dtype, self.device)

    # -- public ---------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Run the training loop to ``config.steps`` (or early stopping) and return what happened.

        Raises:
            StateError: the host changed during training.
            ConfigError: ``monitor`` is not an evaluation result; a checkpoint does not fit this run.
        """
        cfg = self.config
        seed_everything(cfg.seed + self.rank)
        optimizer, scheduler = build_optimizer(self._param_groups(), cfg)
        log = MetricsLog(self.output_dir / "metrics.jsonl" if self.output_dir and self.rank == 0 else None)
        state = _Progress()
        stopped = False
        with self.guard:
            ddp.broadcast_parameters(self.params)
            self._maybe_resume(optimizer, scheduler, state, log)
            bar = ProgressBar(cfg.steps, state.step, enabled=cfg.progress and self.rank == 0)
            was_training = self.model.training
            self.model.train()
            tick = time.perf_counter()
            try:
                while state.step < cfg.steps and not stopped:
                    grad_norm, lr = self._step(optimizer, scheduler, state)
                    state.step += 1
                    if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                        tick = self._log(state, grad_norm, lr, log, bar, tick)
                    if cfg.eval_every and state.step % cfg.eval_every == 0:
                        stopped = self._track(self.evaluate(), state, log)
                    if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                        self._checkpoint(optimizer, scheduler, state)
                evaluated = bool(state.history) and state.history[-1]["step"] == state.step
                if not evaluated and any(t.eval is not None for t in self.tasks.values()):
                    self._track(self.evaluate(), state, log)
            finally:
                bar.close()
                self.model.train(was_training)
            if cfg.restore_best and state.best_weights is not None:
                self._load_weights(state.best_weights)
        result = TrainResult(step=state.step, stopped_early=stopped,
                             metrics={k: v for k, v in (state.history[-1] if state.history else {}).items()
                                      if k not in ("kind", "step")},
                             best=None if state.best is None else {"step": state.best_step, "value": state.best},
                             history=state.history, output_dir=self.output_dir, train_loss=state.last_loss)
        if self.rank == 0:
            bar.summary(state.step, state.last_loss, result.metrics)
        if self.output_dir is not None and self.rank == 0:
            write_outputs(self.output_dir, self.weights(), result,
                          modules={n: m for n, m in getattr(self.model, "library", {}).items()
                                   if n in self.trainables},
                          recipe=recipe(self.config, self.trainables, self.tasks),
                          host=getattr(self.model, "host", None))
        return result

    def evaluate(self) -> dict[str, float]:
        """Evaluate every task that has evaluation data, under its routing (see :func:`evaluate_tasks`)."""
        return evaluate_tasks(self.model, self.tasks, metrics=self.metrics, loss_fn=self.loss_fn,
                              batch_size=self.config.eval_batch_size or self.config.batch_size,
                              device=self.device, autocast=self.autocast)

    def _param_groups(self) -> list[dict[str, Any]]:
        """One AdamW group per distinct learning rate (``config.lr_scale`` by trained name)."""
        unknown = sorted(set(self.config.lr_scale) - set(self.trainables))
        if unknown:
            raise ConfigError(f"lr_scale names {unknown}, which are not trained; trained: {', '.join(self.trainables)}")
        trained, seen = {id(p) for p in self.params}, set()
        groups: dict[float, list[nn.Parameter]] = {}
        for name, module in self.trainables.items():
            scale = float(self.config.lr_scale.get(name, 1.0))
            for p in module.parameters():
                if id(p) in trained and id(p) not in seen:
                    seen.add(id(p))
                    groups.setdefault(scale, []).append(p)
        return [{"params": ps, "lr": self.config.lr * scale} for scale, ps in groups.items()]

    # -- one step --------------------------------------------------------------------------

    def _step(self, optimizer, scheduler, state: _Progress) -> tuple[float, float]:
        cfg = self.config
        for _ in range(cfg.grad_accum):
            task, indices = self.stream.next(cfg.batch_size)
            indices = ddp.shard(indices, self.rank, self.world)
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in fetch(self.tasks[task].train, indices).items()}
            with routing(self.model, self.tasks[task].route):
                with self.autocast():
                    outputs = self.model(**host_inputs(batch))
                    loss = self.loss_fn(outputs, batch)
                    aux = _aux_loss(self.model)
                total = loss if aux is None else loss + cfg.aux_loss_weight * aux
                self.scaler.scale(total / cfg.grad_accum).backward()
            state.window["loss"] += float(loss.detach())
            state.window["aux"] += 0.0 if aux is None else float(aux.detach())
            state.window["micro"] += 1
            state.window["tokens"] += tokens_of(batch)
        ddp.all_reduce_gradients(self.params)
        self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        self.scaler.step(optimizer)
        self.scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm), lr

    def _log(self, state: _Progress, grad_norm: float, lr: float, log: MetricsLog, bar: ProgressBar,
             tick: float) -> float:
        w = state.window
        loss, aux, micro, tokens = ddp.all_reduce_sums([w["loss"], w["aux"], w["micro"], w["tokens"]])
        now = time.perf_counter()
        seconds = max(now - tick, 1e-9)
        examples = micro / self.world * self.config.batch_size  # micro-batches are counted on every rank
        record = {"kind": "train", "step": state.step, "loss": loss / max(micro, 1), "lr": lr,
                  "grad_norm": grad_norm, "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}
        if aux:
            record["aux_loss"] = aux / max(micro, 1)
        log.write(record)
        state.last_loss = record["loss"]
        bar.update(state.step, record["loss"], record["examples_per_s"], record["tokens_per_s"])
        state.window = {k: 0.0 for k in w}
        return now

    # -- evaluation and early stopping ------------------------------------------------------

    def _track(self, results: dict[str, float], state: _Progress, log: MetricsLog) -> bool:
        cfg = self.config
        record = {"kind": "eval", "step": state.step, **results}
        state.history.append(record)
        log.write(record)
        key = _monitored(cfg.monitor, results)
        if key is None:
            raise ConfigError(f"monitor {cfg.monitor!r} is not an evaluation result; "
                              f"results are: {', '.join(sorted(results))}")
        value = results[key]
        better = state.best is None or (value < state.best if cfg.mode == "min" else value > state.best)
        if better:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            if cfg.restore_best:
                state.best_weights = {k: v.detach().to("cpu").clone() for k, v in self.weights().items()}
            return False
        state.bad_evals += 1
        return cfg.patience is not None and state.bad_evals >= cfg.patience

    # -- weights and checkpoints ---------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained parameters, keyed ``<name>.<parameter>``."""
        trained = {id(p) for p in self.params}
        return {f"{name}.{pname}": p for name, module in self.trainables.items()
                for pname, p in module.named_parameters() if id(p) in trained}

    def _load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        mine = self.weights()
        if set(tensors) != set(mine) or any(tensors[k].shape != v.shape for k, v in mine.items()):
            missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
            raise ConfigError(f"the checkpoint's trained parameters do not fit this run (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, or shapes differ); resume with the same modules and train=")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(tensors[k])

    def _checkpoint(self, optimizer, scheduler, state: _Progress) -> None:
        staging = checkpoint.staging_dir(self.output_dir, state.step)
        checkpoint.write_rng(staging, self.rank)
        ddp.barrier()
        if self.rank == 0:
            meta = {"step": state.step, "stream": self.stream.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "world_size": self.world, "config": self.config.to_dict(),
                    "early": {"best": state.best, "best_step": state.best_step, "bad_evals": state.bad_evals},
                    "history": state.history, "window": state.window}
            checkpoint.commit(staging, self.output_dir, state.step, weights=self.weights(),
                              optimizer=optimizer.state_dict(), state=meta, best=state.best_weights,
                              keep=self.config.keep_checkpoints)
        ddp.barrier()

    def _maybe_resume(self, optimizer, scheduler, state: _Progress, log: MetricsLog) -> None:
        if not self.resume:
            return
        path = Path(self.resume) if isinstance(self.resume, (str, Path)) else checkpoint.latest(self.output_dir)
        if path is None:
            return  # nothing saved yet: a fresh start
        ckpt = checkpoint.read(path, self.rank)
        meta = ckpt["state"]
        if meta["world_size"] != self.world:
            raise ConfigError(f"{path} was written by {meta['world_size']} processes, this run has {self.world}; "
                              "resume with the same world size")
        saved = meta["config"]
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if k not in _RESUMABLE_CHANGES and saved.get(k) != v)
        if changed:
            raise ConfigError(f"cannot resume {path}: settings {changed} differ from the checkpoint's "
                              f"(checkpoint: {', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")
        self._load_weights(ckpt["weights"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # keep this run's schedule object (its total follows this run's steps); restore only the position
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.stream.load_state_dict(meta["stream"])
        checkpoint.restore_rng(*ckpt["rng"])
        early = meta["early"]
        state.step, state.best, state.best_step, state.bad_evals = (meta["step"], early["best"], early["best_step"],
                                                                    early["bad_evals"])
        state.history, state.window, state.best_weights = meta["history"], meta["window"], ckpt["best"]
        log.truncate_after(state.step)


def _monitored(monitor: str, results: Mapping[str, float]) -> str | None:
    """The result key ``monitor`` means: itself, else the mean over tasks, else the one task's value."""
    if monitor in results:
        return monitor
    if f"mean/{monitor}" in results:
        return f"mean/{monitor}"
    ends = [k for k in results if k.endswith(f"/{monitor}")]
    return ends[0] if len(ends) == 1 else None


def _aux_loss(model: nn.Module) -> torch.Tensor | None:
    fn: Callable[[], torch.Tensor | None] | None = getattr(model, "aux_loss", None)
    return fn() if callable(fn) else None


def _resolve_metrics(metrics: Mapping[str, Metric] | Sequence[str] | None) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return dict(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; built-in: {', '.join(METRICS)}; or pass name → callable")
    return {m: METRICS[m] for m in metrics}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA's too, through ``torch.manual_seed``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
