"""MAD-X: language modules, task modules stacked on them, zero-shot transfer by swapping.

Pfeiffer, Vulić, Gurevych and Ruder (2020), *MAD-X: An Adapter-Based Framework
for Multi-Task Cross-Lingual Transfer*:

1. per language ℓ, a language adapter and an invertible embedding adapter are
   trained with masked (or causal) language modelling on unlabelled text of ℓ,
   on the frozen host with its LM head: :func:`train_language`;
2. a task adapter is trained on labelled data of a source language s, stacked
   on s's language modules, which stay frozen:
   ``Stack(s-inv, s, task)`` — :func:`train_task`;
3. zero-shot transfer to a target language t swaps the language modules:
   ``Stack(t-inv, t, task)`` — :func:`use_language`.

The LM host (e.g. ``BertForMaskedLM``) and the task host (``BertFor
SequenceClassification``) share the pretrained body, so modules trained on one
attach to the other by site name (:func:`attach_language`; the inverse of the
invertible adapter, which sits at the LM head's input, is dropped where the
task host has no such head). Masking follows BERT (Devlin et al. 2019): 15 % of
the tokens are selected, of which 80 % become the mask token, 10 % a random
token, 10 % stay; the masks are drawn once, with a seed (static masking).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from polymod.compose import Stack
from polymod.modular import Modular
from polymod.modules.contract import Module, ModuleSpec
from polymod.training.trainer import Trainer, TrainResult


def inv(language: str) -> str:
    """The name of a language's invertible embedding module."""
    return f"{language}-inv"


def masked_lm_data(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_token_id: int, vocab_size: int,
                   probability: float = 0.15, special_ids: tuple[int, ...] = (), seed: int = 0) -> dict[str, Any]:
    """A masked-LM dataset: BERT's 80/10/10 corruption of 15 % of the real tokens; labels -100 elsewhere.

    Args:
        input_ids: (N, T) token ids.
        attention_mask: (N, T), 0 on padding (never masked).
        mask_token_id: the tokenizer's mask token.
        vocab_size: for the random replacements.
        probability: share of tokens selected for prediction.
        special_ids: token ids never selected (CLS, SEP, …).
        seed: fixes the masks.
    """
    g = torch.Generator().manual_seed(seed)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))
    chosen = (torch.rand(input_ids.shape, generator=g) < probability) & eligible  # (N, T)
    roll = torch.rand(input_ids.shape, generator=g)
    corrupted = input_ids.clone()
    corrupted[chosen & (roll < 0.8)] = mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    corrupted[swap] = torch.randint(0, vocab_size, (int(swap.sum()),), generator=g, dtype=input_ids.dtype)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}


def add_language(model: Modular, language: str, adapter: ModuleSpec, invertible: ModuleSpec = None) -> list[str]:
    """Attach a language's modules (an adapter and optionally an invertible adapter); returns their names."""
    names = []
    if invertible is not None:
        model.add(inv(language), invertible)
        names.append(inv(language))
    model.add(language, adapter)
    return names + [language]


def language_modules(model: Modular, language: str) -> list[str]:
    """The attached modules of ``language``, embedding module first."""
    return [n for n in (inv(language), language) if n in model]


def train_language(lm_model: Modular, language: str, data: Any, **trainer_args: Any) -> TrainResult:
    """Train a language's modules by (masked or causal) language modelling on an LM host.

    Args:
        lm_model: a modular model over a host with an LM head; the language's modules attached
            (:func:`add_language`).
        language: the language name.
        data: LM batches: :func:`masked_lm_data` for MLM hosts, ids with ``causal_lm_labels`` for causal ones.
        trainer_args: passed to the trainer (``config``, ``eval_data``, ``output_dir``, …).
    """
    names = language_modules(lm_model, language)
    lm_model.use(Stack(*names))
    return Trainer(lm_model, names, data, **trainer_args).fit()


def attach_language(task_model: Modular, lm_model: Modular, language: str) -> list[str]:
    """Attach ``language``'s trained modules from ``lm_model`` to ``task_model`` (same weights, shared).

    Sites the task host lacks (the LM head's input of an invertible adapter) are dropped.
    """

    names = []
    for name in language_modules(lm_model, language):
        module = lm_model[name]
        layers = dict(task_model.host.named_modules())
        keep = [s for s in module.sites if s.split(".<")[0] in layers]
        if len(keep) < len(module.sites):
            spec = module.spec
            if any(f.name == "inverse" for f in dataclasses.fields(spec)):
                spec = dataclasses.replace(spec, inverse=False)
            module = Module(spec, [module.sites[s] for s in keep], [module.part(s) for s in keep],
                            card=dataclasses.replace(module.card))
        task_model.add(name, module)
        names.append(name)
    return names


def train_task(task_model: Modular, task: str, source_language: str, data: Any, **trainer_args: Any) -> TrainResult:
    """Train the task module stacked on the (frozen) source-language modules."""
    use_language(task_model, task, source_language)
    return Trainer(task_model, [task], data, **trainer_args).fit()


def use_language(task_model: Modular, task: str, language: str) -> None:
    """Activate ``Stack(<language modules>, task)``: zero-shot transfer is this call with the target language."""
    task_model.use(Stack(*language_modules(task_model, language), task))
