"""Every field of PEFT's LoraConfig, IA3Config, PromptTuningConfig and PrefixTuningConfig, set to a non-default value.

Used by tests/test_peft_options.py (each case must end "equal to PEFT" or "refused by name", never a silent
load) and benchmarks/peft_options.py (the report of every case with its max |Δ|).

A case is ``(mode, overrides, family)``: ``build`` makes the adapter with PEFT itself (``get_peft_model`` with
the base config plus ``overrides``; falls back to ``edit`` when PEFT cannot build it), ``edit`` saves the base
adapter and writes ``overrides`` into its ``adapter_config.json`` (metadata, and options PEFT needs outside
resources to build). ``SKIP`` entries say why a field has no case.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import polymod as pm
from tests.hosts import logits, make_batch, make_host


@dataclass(frozen=True)
class Case:
    """One config with one field (or a few that go together) at a non-default value."""

    overrides: dict[str, Any]
    mode: str = "build"
    family: str = "llama"
    task: str | None = None  # overrides the base config's task_type (which the base sets for prompt learning)


@dataclass(frozen=True)
class Skip:
    """A field with no case, and why."""

    why: str


META = {
    "peft_type": Skip("the type itself: it selects the config class (other types are refused as a whole)"),
    "auto_mapping": [Case({"auto_mapping": {"base_model_class": "Other", "parent_library": "x.y"}}, "edit")],
    "peft_version": [Case({"peft_version": "0.0.1"}, "edit")],
    "base_model_name_or_path": [Case({"base_model_name_or_path": "someone/model"}, "edit")],
    "revision": [Case({"revision": "v2"}, "edit")],
    "inference_mode": [Case({"inference_mode": False}, "edit")],  # PEFT always saves True
}

LORA: dict[str, Any] = {
    **META,
    "task_type": [Case({"task_type": "CAUSAL_LM"}), Case({"task_type": "SEQ_CLS"}, family="bert")],
    "r": [Case({"r": 6})],
    "target_modules": [Case({"target_modules": ["k_proj", "down_proj"]})],
    "exclude_modules": [Case({"exclude_modules": r"model\.layers\.0\..*"})],
    "lora_alpha": [Case({"lora_alpha": 3})],
    "lora_dropout": [Case({"lora_dropout": 0.1})],
    "fan_in_fan_out": [Case({"fan_in_fan_out": True, "target_modules": ["c_attn", "c_fc"]}, family="gpt2")],
    "bias": [Case({"bias": "lora_only"}), Case({"bias": "all"})],
    "use_rslora": [Case({"use_rslora": True})],
    "modules_to_save": [Case({"modules_to_save": ["lm_head"]}), Case({"modules_to_save": ["classifier"]},
                                                                     family="bert")],
    "init_lora_weights": [Case({"init_lora_weights": v}) for v in
                          ("gaussian", False, "orthogonal", "pissa", "pissa_niter_2", "olora", "mica")]
    + [Case({"init_lora_weights": v}, "edit") for v in ("eva", "corda", "loftq", "lora_ga")],
    "layers_to_transform": [Case({"layers_to_transform": [1]})],
    "layers_pattern": [Case({"layers_pattern": "layers", "layers_to_transform": [0]})],
    "rank_pattern": [Case({"rank_pattern": {"v_proj": 2}})],
    "alpha_pattern": [Case({"alpha_pattern": {"q_proj": 2}})],
    "megatron_config": [Case({"megatron_config": {"tensor_model_parallel_size": 1}}, "edit")],
    "megatron_core": [Case({"megatron_core": "other.core"}, "edit")],
    "trainable_token_indices": [Case({"trainable_token_indices": [3, 5]})],
    "loftq_config": [Case({"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, "edit")],
    "eva_config": [Case({"eva_config": {"rho": 2.0}}, "edit")],
    "corda_config": [Case({"corda_config": {"corda_method": "kpm"}}, "edit")],
    "lora_ga_config": [Case({"lora_ga_config": {"direction": "ArB2r"}}, "edit")],
    "use_dora": [Case({"use_dora": True})],
    "velora_config": [Case({"velora_config": {"rank": 2}}, "edit")],
    "alora_invocation_tokens": [Case({"alora_invocation_tokens": [5, 6]})],
    "use_qalora": [Case({"use_qalora": True}, "edit")],
    "qalora_group_size": [Case({"qalora_group_size": 32}, "edit")],
    "monteclora_config": [Case({"monteclora_config": {"monteclora_n": 2}}, "edit")],
    "layer_replication": [Case({"layer_replication": [[0, 2], [1, 2]]})],
    "runtime_config": Skip("runtime settings (GPU offload): PEFT does not save them"),
    "lora_bias": [Case({"lora_bias": True})],
    "target_parameters": [Case({"target_parameters": ["mlp.down_proj.weight"]})],
    "use_bdlora": [Case({"use_bdlora": {"lora_a_is_blockdiagonal": True, "nblocks": 2}}, "edit")],
    "arrow_config": [Case({"arrow_config": {"top_k": 2}}, "edit")],
    "kasa_config": [Case({"kasa_config": {"top_r": 2}}, "edit")],
    "ensure_weight_tying": [Case({"ensure_weight_tying": True})],
}

IA3: dict[str, Any] = {
    **META,
    "task_type": [Case({"task_type": "CAUSAL_LM"})],
    "target_modules": [Case({"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]})],
    "exclude_modules": [Case({"exclude_modules": r"model\.layers\.0\..*"})],
    "feedforward_modules": [Case({"target_modules": ["k_proj", "up_proj"], "feedforward_modules": ["up_proj"]})],
    "fan_in_fan_out": [Case({"fan_in_fan_out": True}, family="gpt2")],
    "modules_to_save": [Case({"modules_to_save": ["lm_head"]})],
    "init_ia3_weights": [Case({"init_ia3_weights": False})],
}

_PROMPT_META = {
    **META,
    "task_type": [Case({}, task="SEQ_CLS", family="bert")],
    "num_virtual_tokens": [Case({"num_virtual_tokens": 2})],
    "num_transformer_submodules": [Case({"num_transformer_submodules": 2}, "edit"),
                                   Case({}, task="SEQ_2_SEQ_LM", family="t5")],
    "modules_to_save": [Case({"modules_to_save": ["lm_head"]})],
}

PROMPT: dict[str, Any] = {
    **_PROMPT_META,
    "token_dim": [Case({"token_dim": 16}, "edit")],
    "num_attention_heads": [Case({"num_attention_heads": 2}, "edit")],
    "num_layers": [Case({"num_layers": 5}, "edit")],
    "prompt_tuning_init": [Case({"prompt_tuning_init": "SAMPLE_VOCAB"})],
    "prompt_tuning_init_text": [Case({"prompt_tuning_init_text": "hello"}, "edit")],
    "tokenizer_name_or_path": [Case({"tokenizer_name_or_path": "gpt2"}, "edit")],
    "tokenizer_kwargs": [Case({"tokenizer_kwargs": {"use_fast": True}, "prompt_tuning_init": "TEXT",
                               "prompt_tuning_init_text": "hello", "tokenizer_name_or_path": "gpt2"}, "edit")],
}

PREFIX: dict[str, Any] = {
    **_PROMPT_META,
    "token_dim": [Case({"token_dim": 32}, "edit")],
    "num_attention_heads": [Case({"num_attention_heads": 4}, "edit")],
    "num_layers": [Case({"num_layers": 5}, "edit")],
    "init_weights": [Case({"init_weights": "zero"})],
    "encoder_hidden_size": [Case({"encoder_hidden_size": 8})],
    "prefix_projection": [Case({"prefix_projection": True, "encoder_hidden_size": 8})],
}

CASES = {"LoraConfig": LORA, "IA3Config": IA3, "PromptTuningConfig": PROMPT, "PrefixTuningConfig": PREFIX}
BASE = {"LoraConfig": {"r": 4, "lora_alpha": 8}, "IA3Config": {},
        "PromptTuningConfig": {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4},
        "PrefixTuningConfig": {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3}}


def case_ids() -> list[tuple[str, str, int]]:
    """(config class, field, case index) for every case."""
    return [(cls, key, i) for cls, table in CASES.items() for key, cases in table.items()
            if not isinstance(cases, Skip) for i in range(len(cases))]


@dataclass
class Outcome:
    """What one case gave: ``refused`` (with the message) or ``equal`` (with max |Δ| against PEFT)."""

    status: str
    detail: str = ""
    max_diff: float | None = None
    named: list[str] = field(default_factory=list)


def _randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))


def _config(peft: Any, cls: str, case: Case, with_overrides: bool) -> Any:
    kwargs = dict(BASE[cls])
    if case.task is not None:
        kwargs["task_type"] = case.task
    if with_overrides:
        kwargs.update(case.overrides)
    return getattr(peft, cls)(**kwargs)


def _save(peft: Any, cls: str, case: Case, path: Path, with_overrides: bool) -> None:
    model = peft.get_peft_model(make_host(case.family), _config(peft, cls, case, with_overrides))
    _randomize(model)
    model.eval().save_pretrained(path)


def make_dir(peft: Any, cls: str, case: Case, root: Path) -> tuple[Path, set[str]]:
    """Write the case's adapter directory; returns it and the config keys that differ from the base adapter's."""
    base, path = root / "base", root / "case"
    _save(peft, cls, case, base, with_overrides=False)
    built = False
    if case.mode == "build":
        try:
            _save(peft, cls, case, path, with_overrides=True)
            built = True
        except Exception:  # PEFT cannot build it here (needs data, GPUs or other libraries): edit the config
            built = False
    if not built:
        path.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(copy.deepcopy(case.overrides))
        (path / "adapter_config.json").write_text(json.dumps(config))
    ours = json.loads((path / "adapter_config.json").read_text())
    theirs = json.loads((base / "adapter_config.json").read_text())
    changed = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)} | set(case.overrides)
    if case.task is not None:  # the case's base has the same task: name it and what PEFT derives from it
        changed |= {"task_type", "modules_to_save", "num_transformer_submodules"} & set(ours)
    return path, changed


def run_case(peft: Any, cls: str, case: Case, root: Path) -> Outcome:
    """Load the case's adapter with polymod and with PEFT; ``refused`` needs the message to name a changed key."""
    path, changed = make_dir(peft, cls, case, root)
    host = make_host(case.family)
    try:
        module = pm.load(path, host=host)
    except pm.FormatError as exc:
        named = sorted(k for k in changed if k in str(exc))
        return Outcome("refused", str(exc), named=named)
    model = pm.Modular(host)
    model.add("m", module)
    model.use("m")
    batch = make_batch(case.family)
    theirs = peft.PeftModel.from_pretrained(make_host(case.family), path).eval()
    with torch.no_grad():
        want = theirs(**batch).logits
    ours = logits(host, batch)
    bare = logits(make_host(case.family), batch)
    acts = float((want[:, -bare.shape[1]:] - bare).abs().max())  # prompts add leading positions
    return Outcome("equal", f"adapter changes the logits by up to {acts:.3g}", float((ours - want).abs().max()))
