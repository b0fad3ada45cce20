"""Hugging Face ``transformers.Trainer`` with polymod modules.

::

    model = pm.Modular(host)
    model.add("sentiment", pm.LoRA(rank=8))
    model.use("sentiment")
    trainer = ModularTrainer(model=model, args=TrainingArguments("out"), train_dataset=train)
    trainer.train()
    trainer.save_model("out/final")          # out/final/sentiment/ — the module, not the host

A plain ``transformers.Trainer`` meets three walls with a polymod model, and
:class:`ModularTrainer` removes each:

* ``Trainer(model=host)`` optimises the host's parameters — all frozen — so the
  modules, which live outside the host, never change. ``ModularTrainer`` takes
  the :class:`~polymod.Modular` (or a host that one wraps, whose wrapper it
  uses) and refuses a bare host.
* ``Modular.forward(*args, **kwargs)`` has no named arguments, so
  ``remove_unused_columns`` would drop every column. Columns and label names are
  read from the *host's* ``forward`` instead.
* ``save_model`` would write the whole state dict, host included. Here it
  writes each trainable module in polymod's format (:func:`polymod.save`) plus
  ``composition.json`` (the active composition); checkpoints hold the same, and
  ``resume_from_checkpoint`` / ``load_best_model_at_end`` read them back.

Only module parameters are trained: ``Modular`` freezes the host, so the
optimiser's parameter groups hold the modules' (and active routers')
parameters alone. A trained module must be active (``model.use``), as with
polymod's own :class:`~polymod.training.Trainer`.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import transformers
from safetensors.torch import load_file
from transformers.utils import find_labels

from polymod.bundle import read_index, save_all
from polymod.errors import ConfigError, FormatError
from polymod.format import WEIGHTS_FILE, load_tensors
from polymod.modular import Modular, wrapper_of
from polymod.training.host import require_active


def trainable_modules(model: Modular) -> list[str]:
    """Names of the attached modules with at least one parameter that requires grad, in attach order."""
    return [n for n in model.names() if any(p.requires_grad for p in model[n].parameters())]


def save_modules(model: Modular, output_dir: str | os.PathLike) -> Path:
    """Write every trainable module and the active composition (:func:`polymod.save_all`'s layout).

    Returns:
        The directory written.
    """
    return save_all(model, output_dir, names=trainable_modules(model))


def load_modules(model: Modular, checkpoint_dir: str | os.PathLike) -> list[str]:
    """Copy the module weights saved by :func:`save_modules` into ``model``'s modules of the same names.

    Returns:
        The names restored.

    Raises:
        FormatError: the directory is not a saved model, or names a module ``model`` does not have.
    """
    root = Path(checkpoint_dir)
    names = read_index(root)["modules"]
    missing = [n for n in names if n not in model]
    if missing:
        raise FormatError(f"{root} holds modules {missing} that are not attached to this model "
                          f"(attached: {', '.join(model.names()) or 'none'}); attach them before loading")
    for name in names:
        load_tensors(model[name], load_file(str(root / name / WEIGHTS_FILE)), str(root / name))
    return names


def _as_modular(model: Any) -> Modular:
    if isinstance(model, Modular):
        return model
    wrapper = wrapper_of(model) if model is not None else None
    if wrapper is not None:
        return wrapper
    raise ConfigError(
        f"ModularTrainer trains polymod modules; got a {type(model).__name__} that no pm.Modular wraps. "
        "Wrap the host and attach a module first: model = pm.Modular(host); model.add('t', pm.LoRA()); "
        "model.use('t')")


class ModularTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains and saves polymod modules (see the module docstring).

    Args:
        model: a :class:`~polymod.Modular`, or a host that one wraps.
        *args: passed to ``transformers.Trainer``.
        **kwargs: passed to ``transformers.Trainer``.

    Raises:
        ConfigError: ``model`` is a bare host, nothing is trainable, or no trainable module is active
            (some idle next to active ones only warn).
    """

    def __init__(self, model: Any = None, *args: Any, **kwargs: Any):
        modular = _as_modular(model)
        trainable = trainable_modules(modular)
        if not trainable:
            raise ConfigError(f"no attached module has trainable parameters (attached: "
                              f"{', '.join(modular.names()) or 'none'}); add one with model.add(name, pm.LoRA())")
        require_active(modular, {n: modular[n] for n in trainable}, [None])
        super().__init__(modular, *args, **kwargs)
        if self.args.label_names is None:
            self.label_names = find_labels(type(modular.host))

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:  # the host's forward decides which dataset columns reach it
            host = self.model.host
            names = list(inspect.signature(host.forward).parameters)
            self._signature_columns = names + list({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_modules(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_modules(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_modules(self.model, self.state.best_model_checkpoint)


__all__ = ["ModularTrainer", "load_modules", "save_modules", "trainable_modules"]
