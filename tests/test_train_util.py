"""Synthetic tasks for the training tests, and tests of the data utilities they rest on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymod.errors import ConfigError
from polymod.training.data import EpochStream, as_dataset, causal_lm_labels, collate, fetch
from polymod.training.multitask import temperature_probabilities
from polymod.training.optim import LRMultiplier
from tests.hosts import VOCAB


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny hosts train ~20x faster on one intra-op thread than on two contended ones; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def classification_data(n: int = 96, length: int = 6, classes: int = 3, seed: int = 0, key_pos: int = 0,
                        shift: int = 0):
    """Label = (the token at ``key_pos`` + ``shift``) mod ``classes``: a few LoRA steps learn it on a tiny BERT."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, key_pos] + shift) % classes}


def lm_data(n: int = 64, length: int = 8, seed: int = 0, offset: int = 1):
    """Sequences counting up by ``offset`` mod the vocabulary: a causal LM learns the rule quickly."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, VOCAB, (n, 1), generator=g)
    ids = 3 + (start - 3 + offset * torch.arange(length)) % (VOCAB - 3)  # (N, T)
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": causal_lm_labels(ids, mask)}


def seq2seq_data(n: int = 64, length: int = 6, seed: int = 0):
    """Copy task: the target is the source (T5 learns it from labels; decoder inputs are shifted for it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def no_dropout(host: torch.nn.Module) -> torch.nn.Module:
    """Turn off every dropout (for exact equivalences in train mode)."""
    for m in host.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return host


# -- tests of the utilities ---------------------------------------------------------------------


def test_epoch_stream_covers_each_epoch_and_resumes():
    s = EpochStream(10, seed=3)
    first = s.take(4) + s.take(4) + s.take(2)
    assert sorted(first) == list(range(10))
    s.take(3)
    saved = s.state_dict()
    assert saved == {"epoch": 1, "offset": 3}
    after = [s.take(5) for _ in range(3)]
    t = EpochStream(10, seed=3)
    t.load_state_dict(saved)
    assert [t.take(5) for _ in range(3)] == after
    assert EpochStream(10, seed=4).take(10) != first, "the seed decides the order"


def test_batch_crossing_an_epoch_continues_into_the_next():
    s = EpochStream(5, seed=0, shuffle=False)
    assert s.take(3) == [0, 1, 2]
    assert s.take(3) == [3, 4, 0]
    assert s.state_dict() == {"epoch": 1, "offset": 1}


def test_collate_pads_labels_with_minus_100():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    rows = as_dataset([{"x": torch.tensor(i)} for i in range(4)])
    assert fetch(rows, [3, 1])["x"].tolist() == [3, 1]


def test_dataset_errors():
    with pytest.raises(ConfigError, match="differ in length"):
        as_dataset({"input_ids": torch.zeros(3, 2), "labels": torch.zeros(4)})
    with pytest.raises(ConfigError, match="empty"):
        as_dataset([])


def test_temperature_sampling_probabilities():
    p = temperature_probabilities({"big": 900, "small": 100}, temperature=1.0)
    assert p == pytest.approx({"big": 0.9, "small": 0.1})
    p5 = temperature_probabilities({"big": 900, "small": 100}, temperature=5.0)
    expected = 100 ** 0.2 / (900 ** 0.2 + 100 ** 0.2)
    assert p5["small"] == pytest.approx(expected) and 0.1 < p5["small"] < 0.5
    assert temperature_probabilities({"a": 1, "b": 1000}, 1e9)["a"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ConfigError, match="positive"):
        temperature_probabilities({"a": 1}, 0)


def test_lr_schedule_warmup_and_decay():
    lin = LRMultiplier("linear", warmup=4, total=20)
    assert [lin(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lin(4) == 1.0 and lin(12) == pytest.approx(0.5) and lin(19) == pytest.approx(1 / 16)
    cos = LRMultiplier("cosine", warmup=0, total=10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert np.allclose([LRMultiplier("constant", 2, 10)(t) for t in (2, 9)], 1.0)
