"""Build a trainer from a validated run config (see :mod:`polymod.training.run_config`).

Paths in the config are relative to the config file. Hosts load from local
directories only (``local_files_only``): polymod never downloads a model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from transformers import AutoTokenizer

from polymod import assets
from polymod.compose import from_json
from polymod.errors import ConfigError, PolymodError
from polymod.format import check_fits, load, read_card
from polymod.modular import Modular
from polymod.modules.contract import HostDependentSites, spec_from_dict
from polymod.sites import SiteSelector, select
from polymod.training import distributed as ddp
from polymod.training.config import TrainConfig
from polymod.training.data import causal_lm_labels, read_records
from polymod.training.multitask import Task
from polymod.training.trainer import Trainer, seed_everything

# Pretrained models and real data shipped in PyPI packages (polymod[assets]) that a config may name instead of
# paths, so a committed config runs as-is: ``host: {asset: minilm}``, ``data: {asset: rotten_tomatoes}``.
HOST_ASSETS: dict[str, Callable[[], Path]] = {"minilm": assets.minilm_path}
DATA_ASSETS: dict[str, Callable[..., tuple[assets.TextSplit, assets.TextSplit]]] = {
    "rotten_tomatoes": assets.rotten_tomatoes, "imdb": assets.imdb}


def host_path(host: dict[str, Any], base: Path) -> Path:
    """The directory of a config's host: its ``path`` (relative to the config) or its bundled ``asset``."""
    return HOST_ASSETS[host["asset"]]() if "asset" in host else base / host["path"]


def asset_records(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval records ``{"text", "label"}`` of a bundled data set, split with ``split_seed``."""
    train, test = DATA_ASSETS[spec["asset"]](train=spec.get("train_size", 2000), test=spec.get("eval_size", 500),
                                             seed=spec.get("split_seed", 0))
    return ([{"text": t, "label": y} for t, y in zip(train.texts, train.labels)],
            [{"text": t, "label": y} for t, y in zip(test.texts, test.labels)])


def load_host(host: dict[str, Any], base: Path) -> torch.nn.Module:
    """The host model of a config's ``host`` section, on its device."""

    task = host.get("task", "classification")
    cls = {"classification": tf.AutoModelForSequenceClassification, "causal-lm": tf.AutoModelForCausalLM,
           "seq2seq": tf.AutoModelForSeq2SeqLM}[task]
    kwargs = {"num_labels": host["num_labels"]} if task == "classification" and "num_labels" in host else {}
    model = cls.from_pretrained(host_path(host, base), local_files_only=True, **kwargs)
    device = host.get("device", "auto")
    if device == "auto":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return model.to(device)


def check_sites(cfg: dict[str, Any], base: Path) -> tuple[list[str], dict[str, int]]:
    """Resolve every module's sites against the config's host without building anything else.

    Each ``|``-joined pattern is resolved on its own, so a pattern that matches nothing is reported even
    when its siblings match. Modules given by ``load`` are checked for fit (:func:`polymod.format.check_fits`).

    Returns:
        The problems (empty when every pattern matches) and the number of sites per module.
    """
    host = load_host({**cfg["host"], "device": "cpu"}, base)
    problems: list[str] = []
    counts: dict[str, int] = {}
    for name, spec in cfg["modules"].items():
        if "load" in spec:
            card = read_card(base / spec["load"]) if (base / spec["load"] / "module.json").is_file() else None
            errors = check_fits(card, host).errors if card is not None else []
            problems += [f"modules.{name}.load: {e}" for e in errors]
            counts[name] = len(card.sites) if card is not None else 0
            continue
        module_spec = spec_from_dict(spec["kind"], {k: v for k, v in spec.items() if k != "kind"})
        selection = module_spec.sites_for(host) if isinstance(module_spec, HostDependentSites) else module_spec.sites
        selector = SiteSelector.parse(selection)
        for pattern in selector.patterns:
            try:
                select(host, SiteSelector(patterns=(pattern,), types=selector.types))
            except PolymodError as exc:
                problems.append(f"modules.{name}.sites: {exc}")
        if not any(p.startswith(f"modules.{name}.sites") for p in problems):
            counts[name] = len(select(host, selector))
    return problems, counts


class _Examples:
    """Turns JSON-lines records into model inputs for one host task, tokenizing text when needed."""

    def __init__(self, task: str, spec: dict[str, Any], base: Path, host_dir: Path):
        self.task, self.spec = task, spec
        self.tokenizer_path = base / spec["tokenizer"] if "tokenizer" in spec else host_dir
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=self.spec.get("max_length", 512))["input_ids"]

    def example(self, record: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        text_field = self.spec.get("text_field", "text")
        if "input_ids" in record:
            ids = record["input_ids"][: self.spec.get("max_length", None)]
        elif text_field in record:
            ids = self.encode(record[text_field])
        else:
            raise ConfigError(f"{where} has neither 'input_ids' nor the text field {text_field!r}")
        ids = torch.as_tensor(ids, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.task == "causal-lm":
            out["labels"] = torch.as_tensor(record["labels"]) if "labels" in record else causal_lm_labels(ids)
        elif self.task == "seq2seq":
            target = self.spec.get("target_field", "target")
            if "labels" in record:
                out["labels"] = torch.as_tensor(record["labels"], dtype=torch.long)
            elif target in record:
                out["labels"] = torch.as_tensor(self.encode(record[target]), dtype=torch.long)
            else:
                raise ConfigError(f"{where} has neither 'labels' nor the target field {target!r}")
        else:
            label = self.spec.get("label_field", "label")
            key = "labels" if "labels" in record else label
            if key not in record:
                raise ConfigError(f"{where} has neither 'labels' nor the label field {label!r}")
            out["labels"] = torch.as_tensor(int(record[key]))
        return out

    def dataset(self, file: str | None, base: Path) -> list[dict[str, torch.Tensor]] | None:
        if file is None:
            return None
        path = base / file
        return [self.example(r, f"{path}:{i}") for i, r in enumerate(read_records(path), 1)]

    def datasets(self, base: Path) -> tuple[list[dict[str, torch.Tensor]] | None, list[dict[str, torch.Tensor]] | None]:
        """The train and eval sets: files, or a bundled data set's seeded split."""
        if "asset" not in self.spec:
            return self.dataset(self.spec.get("train"), base), self.dataset(self.spec.get("eval"), base)
        train, dev = asset_records(self.spec)
        where = f"asset {self.spec['asset']}"
        return ([self.example(r, f"{where} train {i}") for i, r in enumerate(train)],
                [self.example(r, f"{where} eval {i}") for i, r in enumerate(dev)])


def build_run(cfg: dict[str, Any], base: Path, *, resume: bool = False) -> Trainer:
    """A :class:`~polymod.training.trainer.Trainer` for a validated config (joins ``torchrun``'s group first).

    The training seed is applied before the host is loaded and the modules are built, so a fresh task head
    and the modules' random initial weights are the same in every run of the config (and on every rank).
    """

    ddp.init_from_env()
    config = TrainConfig.from_dict(cfg.get("training", {}))
    # Seed before anything random is built (a fresh task head, the modules' initial weights): the same
    # config gives the same run, and a resumed run rebuilds the exact host it checkpointed against.
    # Every rank draws the same initial weights; the trainer re-seeds with seed + rank for dropout.
    seed_everything(config.seed)
    host_cfg = cfg["host"]
    model = Modular(load_host(host_cfg, base))
    for name, spec in cfg["modules"].items():
        if "load" in spec:
            model.add(name, load(base / spec["load"]))
        else:
            model.add(name, spec_from_dict(spec["kind"], {k: v for k, v in spec.items() if k != "kind"}))
    task = host_cfg.get("task", "classification")
    if "data" in cfg:
        model.use(from_json(cfg.get("use", cfg["train"][0])))
        examples = _Examples(task, cfg["data"], base, host_path(host_cfg, base))
        data, eval_data = examples.datasets(base)
    else:
        if "use" in cfg:
            model.use(from_json(cfg["use"]))
        data, eval_data = {}, None
        for name, spec in cfg["tasks"].items():
            examples = _Examples(task, spec, base, host_path(host_cfg, base))
            route = from_json(spec["route"]) if "route" in spec else None
            train, dev = examples.datasets(base)
            data[name] = Task(train=train, eval=dev, route=route)
    return Trainer(model, cfg["train"], data, eval_data=eval_data, metrics=cfg.get("metrics", []),
                   config=config, output_dir=base / cfg["output_dir"],
                   temperature=cfg.get("temperature", 5.0), resume=resume)
