"""Modules follow the host's train/eval mode at every call, whichever object was switched.

``pm.Modular(host)`` holds the modules, not the host; yet ``host.eval()`` alone must make every
attached module deterministic (dropout off) and ``host.train()`` must turn it on again
(ISSUE 17: a PEFT LoRA with ``lora_dropout=0.05`` gave random logits through ``host(...)``).
"""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from tests.hosts import FAMILIES, logits, make_batch, make_host, randomize, zero_host_dropout
from tests.kinds import DROPOUT_KINDS

CASES = [(k, f) for k in DROPOUT_KINDS for f in FAMILIES]


def _model(kind: str, family: str) -> tuple[pm.Modular, torch.nn.Module]:
    host = zero_host_dropout(make_host(family))  # only the module's dropout can be random in training mode
    model = pm.Modular(host)
    spec = DROPOUT_KINDS[kind](family)
    model.add("m", spec)
    model.add("n", spec)
    randomize(model["m"], 0.2)
    randomize(model["n"], 0.2)
    model.use("m")
    return model, host


@pytest.mark.parametrize("kind,family", CASES)
def test_host_eval_alone_makes_modules_deterministic(kind, family):
    model, host = _model(kind, family)
    batch = make_batch(family)
    model.eval()  # the reference: every module in eval mode
    reference = logits(host, batch)
    model.train()  # as after training: host and modules in training mode
    host.eval()  # the user switches only the host
    first, second = logits(host, batch), logits(host, batch)
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=0, atol=0)
    assert not model["m"].training and not model["n"].training
    with model.route(["m", "n", None]):  # the per-row path follows too
        routed = logits(host, batch)
    with model.route(["m", "n", None]):
        torch.testing.assert_close(logits(host, batch), routed, rtol=0, atol=0)
    torch.testing.assert_close(routed[0], reference[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,family", CASES)
def test_host_train_turns_module_dropout_on(kind, family):
    model, host = _model(kind, family)
    batch = make_batch(family)
    model.eval()
    reference = logits(host, batch)
    host.train()  # only the host: the module's dropout must act (the host's own dropout is zeroed)
    first, second = logits(host, batch), logits(host, batch)
    assert model["m"].training
    assert not torch.equal(first, second), "dropout must be active after host.train()"
    assert not torch.allclose(first, reference, atol=1e-6)
    host.eval()
    torch.testing.assert_close(logits(host, batch), reference, rtol=0, atol=0)
