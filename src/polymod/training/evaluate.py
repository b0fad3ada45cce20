"""Evaluation: the mean loss plus user metrics over a dataset, without gradients.

A *metric* is a callable ``metric(outputs, batch)`` on one batch, returning
either a number (averaged over batches, weighted by their number of examples)
or a pair ``(total, count)`` (summed over batches, then divided) — the second
form makes token-level scores exact. Under data parallelism each rank
evaluates its share of the batches and the totals are summed over ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from polymod.errors import ConfigError
from polymod.training import distributed as ddp
from polymod.training.data import as_dataset, batch_size_of, batches, fetch, host_inputs

Metric = Callable[[Any, Mapping[str, torch.Tensor]], "float | tuple[float, float]"]
LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


def _predictions(outputs: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and gold labels, aligned; positions labelled -100 removed."""
    logits, labels = outputs.logits, batch["labels"]
    if logits.dim() == 3 and labels.dim() == 2 and not hasattr(outputs, "encoder_last_hidden_state"):
        logits, labels = logits[:, :-1], labels[:, 1:]  # causal LM: position t predicts token t+1
    pred = logits.argmax(-1)
    keep = labels != -100
    return pred[keep], labels[keep]


def accuracy(outputs: Any, batch: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """Share of correct predictions: per example for classification, per token for (causal or seq2seq) LMs."""
    pred, gold = _predictions(outputs, batch)
    return float((pred == gold).sum()), float(gold.numel())


def host_loss(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss the host computed from ``labels`` (Hugging Face models do).

    Raises:
        ConfigError: the host returned no loss.
    """
    loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ConfigError("the host returned no loss: put 'labels' in the batch (Hugging Face models then "
                          "compute it) or pass loss_fn=callable(outputs, batch)")
    return loss


def evaluate(model: torch.nn.Module, dataset: Any, *, metrics: Mapping[str, Metric] | None = None,
             batch_size: int = 32, loss_fn: LossFn | None = None, device: torch.device | None = None,
             autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, float]:
    """Mean loss and metrics of ``model`` on ``dataset`` (eval mode, no gradients).

    Args:
        model: the modular model (or any module whose ``forward`` takes the batch).
        dataset: a dataset (see :mod:`polymod.training.data`).
        metrics: name → metric; ``loss`` is always reported.
        batch_size: examples per forward pass.
        loss_fn: ``loss_fn(outputs, batch)``; default: the host's own loss.
        device: where to put batches (default: where the model's first parameter is).
        autocast: a factory of the mixed-precision context to evaluate under.

    Returns:
        ``{"loss": ..., <metric>: ...}``.
    """
    metrics = dict(metrics or {})
    dataset = as_dataset(dataset)
    loss_fn = loss_fn or host_loss
    device = device or next(model.parameters()).device
    rank, world = ddp.rank_and_world()
    was_training = model.training
    model.eval()
    totals = {name: [0.0, 0.0] for name in ["loss", *metrics]}
    try:
        with torch.no_grad():
            for indices in batches(dataset, batch_size)[rank::world]:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in fetch(dataset, indices).items()}
                with autocast() if autocast else contextlib.nullcontext():
                    outputs = model(**host_inputs(batch))
                n = batch_size_of(batch)
                totals["loss"][0] += float(loss_fn(outputs, batch)) * n
                totals["loss"][1] += n
                for name, metric in metrics.items():
                    value = metric(outputs, batch)
                    total, count = value if isinstance(value, tuple) else (float(value) * n, n)
                    totals[name][0] += total
                    totals[name][1] += count
    finally:
        model.train(was_training)
    flat = ddp.all_reduce_sums([x for pair in totals.values() for x in pair])
    return {name: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else float("nan")
            for i, name in enumerate(totals)}


METRICS: dict[str, Metric] = {"accuracy": accuracy}
"""Metrics known by name (for config files)."""
