"""PEFT's prompt learning formats: prompt tuning (read and write) and prefix tuning (read).

PEFT stores both as one tensor, ``prompt_embeddings``:

* ``PROMPT_TUNING``: the soft tokens P, (n · submodules, D). polymod's
  :class:`~polymod.modules.prompt.PromptTuning` prompts the encoder only, so
  ``num_transformer_submodules`` must be 1 (PEFT's default of 2 for
  encoder-decoder hosts also prompts the decoder, which polymod does not).
* ``PREFIX_TUNING``: the key/value prefixes, (n, L · 2 · H_kv · d) — with
  ``prefix_projection`` already materialised through PEFT's MLP. This is
  :class:`~polymod.modules.prefix.PrefixTuning` without projection, its
  ``prefix`` parameter in the same layout. Encoder-decoder hosts are refused:
  PEFT 0.21 lays out their decoder prefixes differently from Li and Liang
  (see tests/test_prompt_prefix_peft.py).

Both act at host-dependent sites (the input call, the attention cache), so the
host is required to read them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polymod.card import Card
from polymod.errors import ConfigError, FormatError
from polymod.modular import build_module
from polymod.modules.contract import Module, ModuleSpec
from polymod.modules.prefix import PrefixTuning
from polymod.modules.prompt import PromptTuning
from polymod.sites import kv_geometry

KEY = "prompt_embeddings"
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"))


def _scratch(host: nn.Module, spec: ModuleSpec) -> Module:
    """Build ``spec``'s module on ``host`` exactly as ``Modular.add`` would, leaving the host untouched."""
    return build_module(host, spec)


def _check_saved_host_copies(host: nn.Module, extra: dict[str, torch.Tensor]) -> None:
    """PEFT saves ``modules_to_save`` (e.g. the classifier for SEQ_CLS) next to the prompt. Copies equal to the
    host's own weights are skipped; a trained copy is refused, since a prompt module cannot carry it."""
    own = dict(host.named_parameters())
    for key, value in extra.items():
        name = key.removeprefix("base_model.").removeprefix("model.").replace(".modules_to_save.default", "")
        have = own.get(name)
        if have is None or have.shape != value.shape or not torch.equal(have.detach().cpu(), value):
            raise FormatError(f"the PEFT adapter carries {key!r}, a trained copy of a host layer "
                              "(modules_to_save), which polymod's prompt module does not represent")


def _check_geometry(config: dict[str, Any], host_values: dict[str, int | None]) -> None:
    """Refuse, by name, config values that contradict the host (PEFT fills them in from the host's config)."""
    wrong = [f"{k}={config[k]!r} (the host has {v})" for k, v in host_values.items()
             if config.get(k) is not None and v is not None and int(config[k]) != v]
    if wrong:
        raise FormatError(f"this PEFT {config['peft_type']} adapter was made for another host geometry: "
                          f"{', '.join(wrong)}; load it onto the model it was trained on")


def read_prompt_learning(config: dict[str, Any], tensors: dict[str, torch.Tensor], host: nn.Module | None,
                         card: Card) -> Module:
    """Build a prompt or prefix module from a PEFT prompt-learning adapter.

    Raises:
        ConfigError: no host.
        FormatError: an unexpected tensor layout, decoder prompts, or an encoder-decoder prefix.
    """
    peft_type = config["peft_type"]
    if host is None:
        raise ConfigError(f"reading a PEFT {peft_type} adapter needs the host (host=...): its sites depend on it")
    if KEY not in tensors:
        raise FormatError(f"a PEFT {peft_type} adapter holds a tensor {KEY!r}, found {sorted(tensors)[:4]}")
    _check_saved_host_copies(host, {k: v for k, v in tensors.items() if k != KEY})
    weights, n = tensors[KEY], int(config["num_virtual_tokens"])
    is_seq2seq = bool(getattr(getattr(host, "config", None), "is_encoder_decoder", False))
    if peft_type == "PROMPT_TUNING":
        if int(config.get("num_transformer_submodules") or 1) != 1 or weights.shape[0] != n:
            raise FormatError("this PEFT prompt also prompts the decoder (num_transformer_submodules=2); polymod's "
                              "prompt tuning prompts the encoder only")
        module = _scratch(host, PromptTuning(length=n))
        name = "prompt"
        width = next(iter(module.sites.values())).in_features
        _check_geometry(config, {"token_dim": width})
    else:
        if is_seq2seq:
            raise FormatError("PEFT prefix tuning on encoder-decoder hosts lays out decoder prefixes differently "
                              "from polymod (Li and Liang); only decoder-only and encoder-only hosts are read")
        module = _scratch(host, PrefixTuning(length=n))
        name = "prefix"
        layers, heads, head_dim = kv_geometry(host.config) or (None, None, None)
        _check_geometry(config, {"num_layers": layers, "num_attention_heads": heads,
                                 "token_dim": heads * head_dim if heads and head_dim else None})
    part = next(p for p in module.parts.values() if name in dict(p.named_parameters()))
    target = dict(part.named_parameters())[name]
    if target.shape != weights.shape:
        raise FormatError(f"PEFT {KEY} has shape {tuple(weights.shape)}; this host needs {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(weights)
    sites = list(module.sites.values())
    parts = [module.part(s.name) for s in sites]
    return Module(module.spec, sites, parts, card=card(module.kind, module.spec, sites, host, config))


def prompt_config(module: Module, host: nn.Module | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The PEFT config and tensors of a polymod prompt-tuning module.

    PEFT's sequence-classification models always save and load the classification head
    (``classifier``/``score``) with the prompt, so for those the host's own head is written too.

    Raises:
        ConfigError: the module has no single soft prompt, its host's task is unknown, or a
            sequence-classification host was not given.
    """
    prompts = [p.prompt for p in module.parts.values() if hasattr(p, "prompt")]
    if len(prompts) != 1:
        raise ConfigError(f"write_peft writes a prompt module with one soft prompt, this one has {len(prompts)}")
    arch = (module.card.host or {}).get("architecture") or ""
    task = next((t for suffix, t in _TASKS if arch.endswith(suffix)), None)
    if task is None:
        raise ConfigError(f"cannot tell PEFT's task_type for host architecture {arch!r}")
    n, width = prompts[0].shape
    config = {"peft_type": "PROMPT_TUNING", "task_type": task, "num_virtual_tokens": n, "token_dim": width,
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", "inference_mode": True}
    tensors = {KEY: prompts[0]}
    if task == "SEQ_CLS":
        if host is None:
            raise ConfigError("PEFT stores the classification head with a SEQ_CLS prompt: pass host=")
        tensors.update({f"base_model.{n}": p for n, p in host.named_parameters()
                        if n.split(".")[0] in ("classifier", "score")})
    return config, tensors
