"""PEFT adapter directories: read them as polymod modules, write polymod modules as them.

A PEFT directory holds ``adapter_config.json`` (``peft_type``, hyper-parameters,
``target_modules``) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<qualified layer name>.<tensor>`` — the layer names are the
host's own, which are polymod's site names. Mapping (same maths, same layout):

=========== ============================================ =======================================
PEFT        tensors                                       polymod
=========== ============================================ =======================================
LORA        ``lora_A.weight`` (r, D_in), ``lora_B.weight``  :class:`~polymod.modules.lora.LoRA` A, B;
            (D_out, r); embeddings ``lora_embedding_A/B``  s = α/r or α/√r (``use_rslora``)
IA3         ``ia3_l``: (D_out, 1), or (1, D_in) for        :class:`~polymod.modules.ia3.IA3` ``scale``;
            ``feedforward_modules``                        feedforward sites scale their input
PROMPT_/    ``prompt_embeddings``                          prompt / prefix tuning; see
PREFIX_...                                                 :mod:`polymod.interop.peft_prompts`
modules_to_ ``<layer>.weight``, ``<layer>.bias`` (the copies)  a second module, a
save                                                       :class:`~polymod.modules.head.Head`
=========== ============================================ =======================================

``fan_in_fan_out`` marks transformers' ``Conv1D`` layers (GPT-2). Only the
safetensors file is read: an ``adapter_model.bin`` (pickle) is refused. Configs
are read by allow-list (:mod:`polymod.interop.peft_options`): every key is either
understood or, set to anything but its default, refused by name with the reason
— never silently dropped. Tensors are read by allow-list too: a key that is none
of the kind's tensors is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from polymod.card import Card, Lineage
from polymod.errors import ConfigError, FormatError
from polymod.format import fingerprint
from polymod.interop.options import check
from polymod.interop.peft_options import CLASS_NAMES, TABLES
from polymod.interop.peft_prompts import prompt_config, read_prompt_learning
from polymod.modules.contract import Module, ModuleSpec, spec_to_dict
from polymod.modules.dora import DoRAPart
from polymod.modules.head import Head
from polymod.modules.ia3 import IA3
from polymod.modules.lora import LoRA
from polymod.sites import Site, named_layers, site_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
SUPPORTED = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")


def exact(names: list[str]) -> str:
    """A polymod selection matching exactly these qualified names (one ``re:`` item: it takes the whole string)."""
    return "re:^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def is_peft_dir(path: Path) -> bool:
    """Whether ``path`` looks like a PEFT adapter directory."""
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        return "peft_type" in json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path / CONFIG_FILE} is not readable JSON: {exc}") from None
    if not (path / WEIGHTS_FILE).is_file():
        if (path / PICKLE_FILE).is_file():
            raise FormatError(f"{path} holds only {PICKLE_FILE}, a pickle file; polymod never loads pickle. Re-save "
                              "it with PEFT's save_pretrained(..., safe_serialization=True)")
        raise FormatError(f"{path} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises several types for malformed files
        raise FormatError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    if config.get("peft_type") not in SUPPORTED:
        raise FormatError(f"PEFT type {config.get('peft_type')!r} is not supported; polymod reads {SUPPORTED}")
    check(config, TABLES[config["peft_type"]], f"PEFT {CLASS_NAMES[config['peft_type']]}")
    return config, tensors


def _head_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any],
                  host: nn.Module | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Pop the ``modules_to_save`` copies out of ``tensors``: layer name -> {"weight": ..., "bias": ...}.

    PEFT saves each copy under the layer's own name (``base_model.model.classifier.weight``; prompt
    learning: ``base_model.classifier.weight``); ``modules_to_save`` lists names that match a layer or
    one of its parents by suffix. For prompt learning (PEFT saves the SEQ_CLS head whether trained or
    not) only copies that differ from ``host``'s own layers are taken; the others stay for the reader.
    """
    names = [n for n in (config.get("modules_to_save") or []) if n]
    prompt = config["peft_type"] in ("PROMPT_TUNING", "PREFIX_TUNING")
    own = dict(host.named_parameters()) if host is not None else {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        plain = key.replace(".modules_to_save.default", "")
        plain = plain.removeprefix(PREFIX) if plain.startswith(PREFIX) else plain.removeprefix("base_model.")
        name, _, leaf = plain.rpartition(".")
        if prompt and (host is None or torch.equal(own.get(plain, torch.empty(0)).detach().cpu(), tensors[key])):
            continue
        if leaf not in ("weight", "bias") or ".lora_" in f".{name}" or name.endswith(".base_layer"):
            continue
        parts = name.split(".")
        if any(".".join(parts[:i]) == n or ".".join(parts[:i]).endswith("." + n)
               for n in names for i in range(1, len(parts) + 1)):
            out.setdefault(name, {})[leaf] = tensors.pop(key)
    return out


def _split(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...],
           host: nn.Module | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """site -> {suffix: tensor}; raises on keys that are none of ``suffixes``.

    PEFT saves a full copy of an embedding layer it targets (``base_layer.weight``): that is
    the host's own weight, skipped (and, given the host, checked to be unchanged).
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    layers = dict(host.named_modules()) if host is not None else {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(".base_layer.weight"):
            own = getattr(layers.get(name.removesuffix(".base_layer.weight")), "weight", None)
            if own is not None and (own.shape != value.shape or not torch.equal(own.detach().cpu(), value)):
                raise FormatError(f"the PEFT adapter carries a changed copy of {name} (resized or trained "
                                  "embeddings), which a polymod LoRA does not represent")
            continue
        for suffix in suffixes:
            if name.endswith("." + suffix):
                out.setdefault(name[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            raise FormatError(f"PEFT tensor {key!r} is not one polymod can represent (e.g. trained biases of the "
                              "host's layers); re-train without them or drop them first")
    return out


def _card(kind: str, spec: ModuleSpec, sites: list[Site], host: nn.Module | None, config: dict[str, Any]) -> Card:
    if host is not None:
        geometry = fingerprint(host, {s.name: s for s in sites}, weights=kind != "head")
    else:
        geometry = {"architecture": None, "model_type": None,
                    "sites": {s.name: {"kind": s.kind, "in": s.in_features, "out": s.out_features} for s in sites}}
    geometry["base_model"] = config.get("base_model_name_or_path")
    recipe = {"method": "import", "format": "peft", "peft_type": config["peft_type"]}
    return Card(kind=kind, config=spec_to_dict(spec), host=geometry, lineage=Lineage(recipe=recipe),
                description=f"imported from a PEFT {config['peft_type']} adapter")


def _site(name: str, kind: str, d_in: int | None, d_out: int | None, host: nn.Module | None) -> Site:
    if host is None:
        return Site(name, kind, d_in, d_out)  # type: ignore[arg-type]

    layer = named_layers(host).get(name)
    if layer is None:
        raise ConfigError(f"the PEFT adapter targets {name!r}, which this {type(host).__name__} does not have")
    return site_of(name, layer)


def _lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], host: nn.Module | None) -> Module:
    per_site = _split(tensors, ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                                "lora_magnitude_vector", "base_layer.bias"), host)
    rank = int(config["r"])
    bias = config.get("bias", "none") == "lora_only"
    spec = LoRA(rank=rank, alpha=float(config.get("lora_alpha", rank)), dropout=float(config.get("lora_dropout", 0)),
                rslora=bool(config.get("use_rslora", False)), sites=exact(sorted(per_site)),
                dora=bool(config.get("use_dora", False)), bias=bias,
                rank_pattern=config.get("rank_pattern") or {}, alpha_pattern=config.get("alpha_pattern") or {})
    if bias and host is None:
        raise ConfigError("reading a PEFT LoRA with bias='lora_only' needs the host (host=...): PEFT saves the "
                          "trained biases, polymod keeps their change from the host's")
    layers = named_layers(host) if host is not None else {}
    sites, parts = [], []
    for name, t in per_site.items():
        a, b = (t.get("lora_A.weight"), t.get("lora_B.weight")) if "lora_A.weight" in t else (
            t.get("lora_embedding_A"), t.get("lora_embedding_B"))
        r = spec.rank_at(name)
        if a is None or b is None or a.shape[0] != r or b.shape[1] != r:
            raise FormatError(f"PEFT LoRA tensors at {name} are incomplete or not of rank {r} (r and rank_pattern)")
        kind = "embedding" if "lora_embedding_A" in t else "conv1d" if config.get("fan_in_fan_out") else "linear"
        site = _site(name, kind, a.shape[1], b.shape[0], host)
        reason = spec.check_site(site)
        if reason:
            raise FormatError(f"PEFT LoRA at {name}: {reason} (use_dora, bias)")
        if spec.dora and "lora_magnitude_vector" not in t:
            raise FormatError(f"the PEFT adapter sets use_dora but has no lora_magnitude_vector for {name}")
        part = spec.build_part(site, None)
        state = {"A": a, "B": b}
        if bias:
            own = getattr(layers.get(name), "bias", None)
            saved = t.get("base_layer.bias")
            state["bias"] = torch.zeros(b.shape[0]) if saved is None or own is None else saved - own.detach().cpu()
        if spec.dora:
            state = {**{f"lora.{k}": v for k, v in state.items()}, "magnitude": t["lora_magnitude_vector"]}
        part.load_state_dict(state)
        sites.append(site)
        parts.append(part)
    return Module(spec, sites, parts, card=_card("lora", spec, sites, host, config))


def _ia3(config: dict[str, Any], tensors: dict[str, torch.Tensor], host: nn.Module | None) -> Module:
    per_site = _split(tensors, ("ia3_l",))
    feedforward = [n for n in per_site if per_site[n]["ia3_l"].shape[0] == 1]
    spec = IA3(sites=exact(sorted(per_site)), feedforward=exact(sorted(feedforward)) if feedforward else "")
    sites, parts = [], []
    for name, t in per_site.items():
        vec = t["ia3_l"]
        if host is None:
            raise ConfigError("reading a PEFT IA3 adapter needs the host (host=...): its vectors give only one "
                              "side of each site's shape")
        site = _site(name, "conv1d" if config.get("fan_in_fan_out") else "linear", None, None, host)
        part = spec.build_part(site, None)
        part.load_state_dict({"scale": vec.reshape(-1)})
        sites.append(site)
        parts.append(part)
    return Module(spec, sites, parts, card=_card("ia3", spec, sites, host, config))


def _head(config: dict[str, Any], copies: dict[str, dict[str, torch.Tensor]], host: nn.Module | None) -> Module:
    """The ``modules_to_save`` copies as one head module (the host tells each layer's kind and bias)."""
    if host is None:
        raise ConfigError(f"reading a PEFT adapter's modules_to_save ({sorted(copies)}) needs the host (host=...): "
                          "a saved copy does not say whether it was a Linear, Conv1D or Embedding layer")
    spec = Head(sites=exact(sorted(copies)))
    sites, parts = [], []
    for name, t in copies.items():
        site = _site(name, "linear", None, None, host)
        reason = spec.check_site(site)
        if reason or "weight" not in t:
            raise FormatError(f"the PEFT adapter's copy of {name} cannot be read as a head: "
                              f"{reason or 'it has no weight'}")
        part = spec.build_part(site, None)
        state = {"weight": t["weight"]}
        if part.bias is not None:
            state["bias"] = t.get("bias", torch.zeros(site.out_features))
        try:
            part.load_state_dict(state)
        except RuntimeError as exc:
            raise FormatError(f"the PEFT adapter's copy of {name} does not fit the host's layer: {exc}") from None
        sites.append(site)
        parts.append(part)
    return Module(spec, sites, parts, card=_card("head", spec, sites, host, config))


def read_peft_modules(path: str | os.PathLike, host: nn.Module | None = None) -> dict[str, Module]:
    """Read a PEFT adapter directory as polymod modules: its adapter and, with ``modules_to_save``, its head.

    PEFT keeps trainable copies of whole layers (``modules_to_save``; for ``task_type="SEQ_CLS"``
    the classifier) inside the adapter; polymod holds them as a separate
    :class:`~polymod.modules.head.Head` module. Attach both and stack them::

        modules = pm.read_peft_modules(path, host=host)   # {"lora": ..., "head": ...}
        for name, module in modules.items():
            model.add(name, module)
        model.use(pm.Stack(*modules))

    Args:
        path: the directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        host: the host it was trained on (required for IA3 and for ``modules_to_save``).

    Returns:
        ``{kind: module}``: the adapter under its kind (``lora``, ``ia3``, ``prompt``, ``prefix``)
        and the head under ``head`` when the adapter has one.

    Raises:
        FormatError: not a PEFT directory, a pickle-only one, an unsupported type or feature.
        ConfigError: ``host`` lacks a targeted layer, or is missing where it is needed.
    """
    path = Path(path)
    config, tensors = _read(path)
    copies = _head_tensors(tensors, config, host)
    if config["peft_type"] in ("PROMPT_TUNING", "PREFIX_TUNING"):
        adapter = read_prompt_learning(config, tensors, host, _card)
    else:
        adapter = (_lora if config["peft_type"] == "LORA" else _ia3)(config, tensors, host)
    modules = {adapter.kind: adapter}
    if copies:
        modules["head"] = _head(config, copies, host)
    return modules


def read_peft(path: str | os.PathLike, host: nn.Module | None = None) -> Module:
    """Read a PEFT adapter directory as one polymod module (``pm.load`` calls this for PEFT directories).

    Args:
        path: the directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        host: the host it was trained on; gives the card a full host fingerprint (and is
            required for IA3, whose vectors give only one side of each site's shape).

    Raises:
        FormatError: not a PEFT directory, a pickle-only one, an unsupported type or feature,
            or an adapter with ``modules_to_save`` copies (two modules: use :func:`read_peft_modules`).
        ConfigError: ``host`` lacks a targeted layer, or IA3 without ``host``.
    """
    modules = read_peft_modules(path, host)
    if "head" in modules:
        names = sorted(modules["head"].sites)
        raise FormatError(f"this PEFT adapter has modules_to_save (trained copies of {names}), which polymod holds "
                          "as a second module, a head: read both with modules = pm.read_peft_modules(path, "
                          "host=host), add each (model.add(name, module)) and use pm.Stack(*modules)")
    return next(iter(modules.values()))


def write_peft(module: Module, path: str | os.PathLike, base_model: str | None = None,
               host: nn.Module | None = None, head: Module | None = None) -> Path:
    """Write a LoRA, IA³ or prompt-tuning module as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Args:
        module: a ``lora``, ``ia3`` or ``prompt`` module.
        path: the directory to create.
        base_model: recorded as ``base_model_name_or_path``.
        host: the host; needed for a prompt module on a sequence classifier (PEFT saves its head).
        head: a :class:`~polymod.modules.head.Head` module trained with a LoRA or IA³ module,
            written as PEFT's ``modules_to_save`` (PEFT restores it as trainable copies of those layers).

    Raises:
        ConfigError: another kind, a module mixing ``Conv1D`` and ``Linear`` sites (one PEFT
            config cannot say both), LoRA on sites PEFT cannot target, or ``head`` that is not
            a head module, or given with a prompt module.
    """
    kinds = {s.kind for s in module.sites.values()}
    if head is not None and (head.kind != "head" or module.kind == "prompt"):
        raise ConfigError(f"write_peft's head= takes a head module (pm.Head) next to a lora or ia3 module, got a "
                          f"{head.kind} module next to a {module.kind} module")
    if module.kind == "prompt":
        config, tensors = prompt_config(module, host)
        return _write(Path(path), {**config, "base_model_name_or_path": base_model}, tensors)
    if module.kind not in ("lora", "ia3"):
        raise ConfigError(f"write_peft writes lora, ia3 and prompt modules, not {module.kind}")
    if {"conv1d", "linear"} <= kinds or kinds - {"conv1d", "linear", "embedding"}:
        raise ConfigError(f"a PEFT config cannot describe sites of kinds {sorted(kinds)} together")
    names = list(module.sites)
    config: dict[str, Any] = {"peft_type": module.kind.upper(), "target_modules": names, "inference_mode": True,
                              "fan_in_fan_out": "conv1d" in kinds, "base_model_name_or_path": base_model,
                              "task_type": None, "modules_to_save": None}
    tensors: dict[str, torch.Tensor] = {}
    if module.kind == "lora":
        config.update(_lora_config(module))
        layers = named_layers(host) if host is not None else {}
        if module.spec.bias and host is None:
            raise ConfigError("write_peft of a LoRA with bias=True needs the host (host=...): PEFT saves the trained "
                              "biases, polymod holds their change from the host's")
        for name, part in module.items():
            lora = part.lora if isinstance(part, DoRAPart) else part
            a, b = ("lora_embedding_A", "lora_embedding_B") if part.site_kind == "embedding" else (
                "lora_A.weight", "lora_B.weight")
            tensors[f"{PREFIX}{name}.{a}"], tensors[f"{PREFIX}{name}.{b}"] = lora.A, lora.B
            if isinstance(part, DoRAPart):
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = part.magnitude
            own = getattr(layers.get(name), "bias", None)
            if lora.bias is not None and isinstance(own, torch.Tensor):
                tensors[f"{PREFIX}{name}.base_layer.bias"] = own.detach() + lora.bias.detach().to(own.dtype)
    else:
        config["feedforward_modules"] = [n for n, p in module.items() if p.scales_input]
        for name, part in module.items():
            shape = (1, -1) if part.scales_input else (-1, 1)
            tensors[f"{PREFIX}{name}.ia3_l"] = part.scale.reshape(shape)
    if head is not None:  # PEFT saves each modules_to_save copy under the layer's own name
        config["modules_to_save"] = list(head.sites)
        for name, part in head.items():
            tensors[f"{PREFIX}{name}.weight"] = part.weight
            if isinstance(part.bias, nn.Parameter):  # a zero buffer stands for a layer without a bias
                tensors[f"{PREFIX}{name}.bias"] = part.bias
    return _write(Path(path), config, tensors)


def _lora_config(module: Module) -> dict[str, Any]:
    """PEFT LoraConfig fields of a LoRA module: r, alpha, per-site ranks and alphas, DoRA, bias."""
    spec = module.spec
    alpha = float(spec.rank if spec.alpha is None else spec.alpha)
    rank_pattern, alpha_pattern = {}, {}
    for name, part in module.items():
        lora = part.lora if isinstance(part, DoRAPart) else part
        site_alpha = lora.scaling * (math.sqrt(lora.rank) if spec.rslora else lora.rank)
        if lora.rank != spec.rank:
            rank_pattern[re.escape(name)] = lora.rank
        if not math.isclose(site_alpha, alpha, rel_tol=1e-9):
            alpha_pattern[re.escape(name)] = site_alpha
    return {"r": spec.rank, "lora_alpha": alpha, "bias": "lora_only" if spec.bias else "none",
            "lora_dropout": spec.dropout, "use_rslora": spec.rslora, "use_dora": spec.dora,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def _write(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path
