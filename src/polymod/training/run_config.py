"""``polymod train config.yaml``: a training run described by one YAML file.

::

    host:
      path: models/minilm            # a local transformers directory (no downloads), or asset: minilm
      task: classification           # classification | causal-lm | seq2seq
      num_labels: 2                  # classification only
    modules:
      sentiment: {kind: lora, rank: 8, sites: "attn.q|attn.v"}
      en: {load: modules/en}         # a saved module (pm.save / hub pull)
    use: {stack: [en, sentiment]}    # the active composition (default: the trained module)
    train: [sentiment]
    data:                            # or `tasks:` — name → {train, eval, route} for multi-task runs;
                                     # or {asset: rotten_tomatoes | imdb, train_size, eval_size, split_seed}
      train: data/train.jsonl        # JSON lines: input_ids (+ labels), or text (+ label / target)
      eval: data/dev.jsonl
      max_length: 128
    metrics: [accuracy]
    training: {steps: 500, batch_size: 16, lr: 3.0e-4, eval_every: 100, checkpoint_every: 100}
    output_dir: runs/sentiment

The whole file is validated before anything is built and every problem is
reported at once (:func:`problems`). Under ``torchrun`` the run is data
parallel (:mod:`polymod.training.distributed`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from polymod.compose import from_json, leaves
from polymod.errors import ConfigError, PolymodError
from polymod.modules.contract import spec_from_dict
from polymod.training.build import DATA_ASSETS, HOST_ASSETS, build_run, check_sites
from polymod.training.config import TrainConfig, config_problems
from polymod.training.evaluate import METRICS

TASKS = ("classification", "causal-lm", "seq2seq")
_TOP = {"host", "modules", "use", "train", "data", "tasks", "metrics", "training", "temperature", "output_dir"}
_DATA = {"train", "eval", "max_length", "text_field", "label_field", "target_field", "tokenizer", "asset",
         "train_size", "eval_size", "split_seed"}


def _path_problems(where: str, value: Any, base: Path, *, directory: bool = False) -> list[str]:
    if not isinstance(value, str):
        return [f"{where} must be a path string, got {value!r}"]
    path = base / value
    ok = path.is_dir() if directory else path.is_file()
    return [] if ok else [f"{where}: {path} does not exist" + (" (expected a directory)" if directory else "")]


def _data_problems(where: str, spec: Any, base: Path) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where} must be a mapping with 'train' (and 'eval') files, got {spec!r}"]
    out = [f"{where}: unknown key {k!r}; known: {', '.join(sorted(_DATA | {'route'}))}"
           for k in sorted(set(spec) - _DATA - {"route"})]
    if "asset" in spec:
        if spec["asset"] not in DATA_ASSETS:
            out.append(f"{where}.asset = {spec['asset']!r}; bundled data sets: {', '.join(DATA_ASSETS)}")
        out += [f"{where}: give either 'asset' or '{k}' files, not both" for k in ("train", "eval") if k in spec]
        for key in ("train_size", "eval_size", "split_seed"):
            if key in spec and not (isinstance(spec[key], int) and spec[key] >= (0 if key == "split_seed" else 1)):
                out.append(f"{where}.{key} must be a positive integer, got {spec[key]!r}")
    elif "train" not in spec and "eval" not in spec:
        out.append(f"{where} needs a 'train' or an 'eval' file (or a bundled 'asset')")
    for key in ("train", "eval"):
        if key in spec:
            out += _path_problems(f"{where}.{key}", spec[key], base)
    if "max_length" in spec and not (isinstance(spec["max_length"], int) and spec["max_length"] > 0):
        out.append(f"{where}.max_length must be a positive integer, got {spec['max_length']!r}")
    return out


def problems(cfg: Any, base: Path) -> list[str]:
    """Every problem of a parsed config (empty when it is valid); paths are relative to ``base``."""

    if not isinstance(cfg, dict):
        return [f"the config must be a YAML mapping, got {type(cfg).__name__}"]
    out = [f"unknown top-level key {k!r}; known: {', '.join(sorted(_TOP))}" for k in sorted(set(cfg) - _TOP)]
    host = cfg.get("host")
    if not isinstance(host, dict) or ("path" in host) == ("asset" in host):
        out.append("host must be a mapping with a 'path' to a local transformers model directory "
                   f"or an 'asset' (a bundled model: {', '.join(HOST_ASSETS)})")
        host = {}
    elif "asset" in host:
        if host["asset"] not in HOST_ASSETS:
            out.append(f"host.asset = {host['asset']!r}; bundled models: {', '.join(HOST_ASSETS)}")
    else:
        out += _path_problems("host.path", host["path"], base, directory=True)
    if host.get("task", "classification") not in TASKS:
        out.append(f"host.task = {host.get('task')!r}; expected one of {', '.join(TASKS)}")
    modules = cfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        out.append("modules must map names to specs, e.g. {sentiment: {kind: lora, rank: 8}}")
        modules = {}
    for name, spec in modules.items():
        if isinstance(spec, dict) and "load" in spec:
            out += _path_problems(f"modules.{name}.load", spec["load"], base, directory=True)
        elif isinstance(spec, dict) and "kind" in spec:
            try:
                spec_from_dict(spec["kind"], {k: v for k, v in spec.items() if k != "kind"})
            except (PolymodError, TypeError) as exc:
                out.append(f"modules.{name}: {exc}")
        else:
            out.append(f"modules.{name} needs 'kind' (a module spec) or 'load' (a saved module), got {spec!r}")
    train = cfg.get("train")
    if not isinstance(train, list) or not train or not all(isinstance(t, str) for t in train):
        out.append(f"train must be a non-empty list of module names, got {train!r}")
    else:
        out += [f"train names {t!r}, which is not under modules" for t in train if t not in modules]
    compositions = [("use", cfg["use"])] if "use" in cfg else []
    if ("data" in cfg) == ("tasks" in cfg):
        out.append("give exactly one of 'data' (one task) or 'tasks' (several)")
    if "data" in cfg:
        out += _data_problems("data", cfg["data"], base)
    if "tasks" in cfg:
        if not isinstance(cfg["tasks"], dict) or not cfg["tasks"]:
            out.append("tasks must map task names to {train, eval, route}")
        else:
            for name, spec in cfg["tasks"].items():
                out += _data_problems(f"tasks.{name}", spec, base)
                if isinstance(spec, dict) and "route" in spec:
                    compositions.append((f"tasks.{name}.route", spec["route"]))
    for where, value in compositions:
        try:
            missing = [n for n in leaves(from_json(value)) if n not in modules]
            out += [f"{where} names module {n!r}, which is not under modules" for n in missing]
        except PolymodError as exc:
            out.append(f"{where}: {exc}")
    metrics = cfg.get("metrics", [])
    if not isinstance(metrics, list) or any(m not in METRICS for m in metrics):
        out.append(f"metrics = {metrics!r}; expected a list of {', '.join(METRICS)}")
    out += config_problems(cfg.get("training", {}))
    if not isinstance(cfg.get("output_dir"), str):
        out.append("output_dir must be a directory path for logs, checkpoints and trained modules")
    temperature = cfg.get("temperature", 5.0)
    if not (isinstance(temperature, int | float) and temperature > 0):
        out.append(f"temperature must be a positive number, got {temperature!r}")
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's floats without a dot (``4e-3``), which YAML 1.1 reads as strings."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9]*[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """Parse YAML safely, reading ``lr: 4e-3`` as the float 0.004 (YAML 1.2) rather than a string (YAML 1.1).

    Raises:
        yaml.YAMLError: the text is not YAML.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a training config file.

    Numbers such as ``4e-3`` are floats (YAML 1.2), not the strings YAML 1.1 makes of them.

    Raises:
        ConfigError: unreadable YAML or any invalid setting (all of them in one message).
    """
    path = Path(path)
    try:
        cfg = read_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read training config {path}: {exc}") from exc
    found = problems(cfg, path.parent)
    if found:
        raise ConfigError(f"{path} has {len(found)} problem(s):\n  " + "\n  ".join(found))
    return cfg


def run_file(path: str | Path, *, resume: bool = False, check_only: bool = False) -> dict[str, Any]:
    """Validate, build and run the training described by ``path``.

    With ``check_only`` nothing is trained: the config is validated, the host is loaded and every module's
    ``sites`` are resolved against it (each ``|``-joined pattern on its own), and loaded modules are checked
    for fit.

    Returns:
        A summary: steps, best and final evaluation, last training loss, output directory (or, with ``check_only``,
        ``{"valid": True, "sites": {module: number of sites}}``).

    Raises:
        ConfigError: the config (every problem listed) or its data is invalid; with ``check_only``, site
            patterns that match nothing in the host or loaded modules that do not fit it (all listed).
    """
    cfg = load_config(path)
    if check_only:
        found, sites = check_sites(cfg, Path(path).parent)
        if found:
            raise ConfigError(f"{path} has {len(found)} problem(s) on its host:\n  " + "\n  ".join(found))
        return {"valid": True, "sites": sites}

    trainer = build_run(cfg, Path(path).parent, resume=resume)
    result = trainer.fit()
    return {"step": result.step, "stopped_early": result.stopped_early, "best": result.best,
            "metrics": result.metrics, "train_loss": result.train_loss, "output_dir": str(result.output_dir)}


__all__ = ["TrainConfig", "load_config", "problems", "run_file"]
