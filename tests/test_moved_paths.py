"""Import paths that moved in the engine refactor keep working where the docs once showed them."""

import importlib

import pytest


@pytest.mark.parametrize(("old", "new", "name"), [
    ("polymod.aggregation.merge", "polymod.merging.merge", "merge"),
    ("polymod.aggregation.checkpoint", "polymod.merging.streaming", "task_vector"),
    ("polymod.aggregation.lorahub", "polymod.merging.lorahub", "lorahub"),
    ("polymod.hub.errors", "polymod.errors", "HubError"),
    ("polymod.hub.errors", "polymod.errors", "IntegrityError"),
    ("polymod.modules.hyper", "polymod.modules.hyperlora", "HyperLoRA"),
    ("polymod.training.recipes.polytropon", "polymod.training.recipes.skills", "train_polytropon"),
    ("polymod.training.recipes.hyper", "polymod.training.recipes.hypernetwork", "train_tasks"),
    ("polymod.training.recipes.lt_sft", "polymod.training.lt_sft", "train_lt_sft"),
])
def test_documented_old_paths_alias_the_moved_modules(old, new, name):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)
