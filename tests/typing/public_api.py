"""A user's script against the public API, checked by mypy (``make typecheck``; ``tests/test_typing.py``).

It is never run: mypy reads it. Each annotated assignment must type-check, and each
``# type: ignore[...]`` must be *needed* (``warn_unused_ignores``): if a public function lost
its annotations (became ``Any``), the ignore would be unused and mypy would fail.
"""

from __future__ import annotations

from pathlib import Path

import torch

import polymod as pm


def train_and_merge(host: torch.nn.Module, out: Path) -> pm.Modular:
    model = pm.Modular(host)
    report: pm.AttachReport = model.add("a", pm.LoRA(rank=8, sites="attn.q|attn.v"))
    share: float = report.share
    model.add("b", pm.IA3())
    model.use(pm.Stack("a", "b"))
    config = pm.TrainConfig(steps=10, lr=4e-3)
    steps: int = config.steps
    merged: pm.Module = pm.merge([model["a"], model["a"]], method="ties", density=0.2)
    saved: Path = pm.save(merged, out / "ab", task="sentiment", tags=["movies"])
    loaded: pm.Module = pm.load(saved, host=host)
    model.add("ab", loaded)
    names: list[str] = pm.load_all(pm.Modular(torch.nn.Linear(2, 2)), out)
    with model.disable():
        pass
    bare: torch.nn.Module = model.merge_and_unload(["ab"])
    del share, steps, names, bare
    return pm.from_pretrained(host, out / "ab")


def model_spec() -> pm.Module:
    raise NotImplementedError


def misuse(host: torch.nn.Module) -> None:
    pm.LoRA(rank="8")  # type: ignore[arg-type]
    pm.TrainConfig(steps="10")  # type: ignore[arg-type]
    pm.Modular(host).add(3, pm.LoRA())  # type: ignore[arg-type]
    pm.merge([model_spec()], method=3)  # type: ignore[arg-type]
    pm.load(42)  # type: ignore[arg-type]
    count: int = pm.registered_kinds()  # type: ignore[assignment]
    rank: str = pm.LoRA().rank  # type: ignore[assignment]
    del count, rank
