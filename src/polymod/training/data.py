"""Datasets, batching and a resumable, seeded order of examples.

A dataset is either *columnar* — a mapping of names to tensors sharing their
first dimension, e.g. ``{"input_ids": (N, T), "attention_mask": (N, T),
"labels": (N,)}`` — or a sequence of examples (dicts), collated by
:func:`collate`. Every key except those in :data:`NON_HOST_KEYS` is passed to
the host's ``forward``; ``labels`` makes Hugging Face models return their loss.

The training order is a stream of index batches over seeded permutations, one
per epoch, with the position ``(epoch, offset)`` as its whole state: a resumed
run reads exactly the examples the uninterrupted run would have read. A batch
that reaches the end of an epoch continues into the next one, so no example is
dropped and every batch has the same size (which data parallelism needs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polymod.errors import ConfigError

NON_HOST_KEYS = frozenset({"task"})
"""Batch keys that describe the example rather than feed the host (dropped before ``forward``)."""

_PAD = {"labels": -100}  # ignored by Hugging Face losses; every other key pads with 0


class Columns:
    """A columnar dataset: named tensors with a shared first dimension (fast batch gathers)."""

    def __init__(self, columns: Mapping[str, torch.Tensor]):
        if not columns:
            raise ConfigError("a columnar dataset needs at least one column, e.g. {'input_ids': ...}")
        sizes = {k: len(v) for k, v in columns.items()}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"dataset columns differ in length: {sizes}; every column needs one row per example")
        self.columns = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in columns.items()}
        self.size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}

    def take(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of rows ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v.index_select(0, idx.to(v.device)) for k, v in self.columns.items()}


def as_dataset(data: Any) -> Any:
    """Accept a columnar mapping or a sequence of example dicts.

    Raises:
        ConfigError: anything else, or an empty dataset.
    """
    if isinstance(data, Mapping):
        data = Columns(data)
    elif not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ConfigError(f"a dataset is a mapping of tensors or a sequence of example dicts, "
                          f"got {type(data).__name__}")
    if len(data) == 0:
        raise ConfigError("the dataset is empty")
    return data


def collate(examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, right-padding 1-D sequences of different lengths.

    ``labels`` pad with -100 (ignored by the loss), every other key with 0.
    """
    out: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [torch.as_tensor(e[key]) for e in examples]
        if values[0].dim() == 1 and len({v.shape[0] for v in values}) > 1:
            length = max(v.shape[0] for v in values)
            pad = _PAD.get(key, 0)
            values = [torch.nn.functional.pad(v, (0, length - v.shape[0]), value=pad) for v in values]
        out[key] = torch.stack(values)  # (B, ...) or (B, T)
    return out


def fetch(dataset: Any, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """The batch of ``indices`` from ``dataset`` (columnar gather or collate)."""
    take = getattr(dataset, "take", None)
    return take(indices) if take is not None else collate([dataset[i] for i in indices])


def host_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``batch`` the host's ``forward`` takes."""
    return {k: v for k, v in batch.items() if k not in NON_HOST_KEYS}


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Number of examples in a batch (first dimension of its first tensor)."""
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


def tokens_of(batch: Mapping[str, Any]) -> int:
    """Number of real tokens in a batch (attention mask sum, else input size)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else batch_size_of(batch)


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for causal LM training: the inputs, with padding set to -100 (Hugging Face shifts them)."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    return labels


def batches(dataset: Any, batch_size: int) -> list[list[int]]:
    """Consecutive index batches covering ``dataset`` once, in order (for evaluation)."""
    n = len(dataset)
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


class EpochStream:
    """An endless, seeded, resumable order of index batches over one dataset.

    Epoch ``e`` visits ``permutation(seed, e)``; a batch crossing an epoch's end
    continues into the next. The state is the position ``(epoch, offset)``.

    Args:
        size: number of examples.
        seed: fixes every epoch's permutation.
        shuffle: False visits examples in order (useful for tests).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def take(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` indices."""
        out: list[int] = []
        while len(out) < batch_size:
            n = min(batch_size - len(out), self.size - self.offset)
            out.extend(int(i) for i in self._order[self.offset:self.offset + n])
            self.offset += n
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict[str, int]:
        """The position, JSON-ready."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Move to a saved position."""
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Examples of a JSON-lines file.

    Raises:
        ConfigError: a line that is not a JSON object.
    """
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{i} is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{i} must be a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
