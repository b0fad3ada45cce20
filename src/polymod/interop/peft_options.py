"""The allow-list of PEFT's config options: one table per config class (see :mod:`polymod.interop.options`).

Each key of PEFT 0.21's ``LoraConfig``, ``IA3Config``, ``PromptTuningConfig`` and
``PrefixTuningConfig`` is classified here: read exactly, without effect on the
adapter's function, or refused (at any value but its default) with the reason
and the fix. ``tests/test_peft_options.py`` loads every field of the installed
PEFT's dataclasses with a non-default value and checks that polymod either
equals PEFT or refuses it by name, so a new PEFT option fails that test until it
is classified here. ``docs/interop-peft.md`` lists the tables.
"""

from __future__ import annotations

from typing import Any

from polymod.interop.options import Option, exact, inert, refused

_TENSORS = "the sites are read from the saved tensors' names"
_INIT_ONLY = "initialisation only; the saved tensors hold the trained values"
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")  # initialise A and B only; the host stays as it is

COMMON: dict[str, Option] = {
    "task_type": inert(None, "selects PEFT's wrapper class; what it adds to the function (a SEQ_CLS head) is "
                             "saved as modules_to_save"),
    "peft_type": exact(None, "selects the module kind"),
    "auto_mapping": inert(None, "PEFT's AutoPeftModel bookkeeping"),
    "peft_version": inert(None, "recorded by PEFT; the format is read by content"),
    "base_model_name_or_path": inert(None, "recorded on the card as the base model"),
    "revision": inert(None, "the base model's hub revision (PEFT's AutoPeftModel only)"),
    "inference_mode": inert(False, "whether PEFT freezes the adapter; polymod trains only what the user selects"),
}

_HEADS = exact(None, "each listed layer's trained copy becomes a head module (pm.Head), read with "
                     "pm.read_peft_modules next to the adapter (pm.load, which returns one module, says so)")

LORA: dict[str, Option] = {
    **COMMON,
    "r": exact(8, "LoRA rank r"),
    "target_modules": exact(None, _TENSORS),
    "exclude_modules": exact(None, _TENSORS),
    "lora_alpha": exact(8, "α: scaling α/r (α/√r with use_rslora)"),
    "lora_dropout": exact(0.0, "dropout on the LoRA input, active in training mode only"),
    "fan_in_fan_out": exact(False, "marks transformers' Conv1D layers (with host=, the host's own layer decides)"),
    "bias": exact("none", "'lora_only': each LoRA site's trained bias, held as a change Δb (LoRA(bias=True); reading "
                          "and writing need host=)", accepts=lambda v: v in ("none", "lora_only"),
                  refusal="'all' also trains the biases of layers the LoRA does not act on (norms, other linear "
                          "layers), which a LoRA module does not hold; re-train with bias='lora_only' or 'none'"),
    "use_rslora": exact(False, "rank-stabilised scaling α/√r"),
    "modules_to_save": _HEADS,
    "init_lora_weights": exact(
        True, f"{_INIT_ONLY} (True, False, 'gaussian', 'orthogonal')",
        accepts=lambda v: v in _PLAIN_INITS and type(v) in (bool, str),
        refusal="this initialisation changes the host's weights (PiSSA, OLoRA, CorDA and LoRA-GA subtract "
                "s·B₀A₀ from them, LoftQ quantises them), and PEFT rebuilds that residual host when it loads an "
                "adapter saved without conversion, which polymod does not; re-save it in PEFT with "
                "save_pretrained(dir, path_initial_model_for_weight_conversion=<the untrained adapter's dir>), "
                "which writes an equivalent plain LoRA of rank 2r on the original weights that polymod reads "
                "exactly (EVA and MiCA are refused as well: not reproduced by polymod)"),
    "layers_to_transform": exact(None, _TENSORS),
    "layers_pattern": exact(None, _TENSORS),
    "rank_pattern": exact({}, "per-site ranks, PEFT's keys and matching (LoRA(rank_pattern=...))"),
    "alpha_pattern": exact({}, "per-site alphas, PEFT's keys and matching (LoRA(alpha_pattern=...))"),
    "megatron_config": refused(None, "Megatron tensor-parallel layers; polymod acts on torch layers"),
    "megatron_core": inert("megatron.core", "used only with megatron_config"),
    "trainable_token_indices": refused(None, "PEFT's trainable tokens (trained rows of an embedding) are not "
                                             "represented; merge them into the host's embedding with PEFT or "
                                             "re-train without"),
    "loftq_config": refused({}, "configures LoftQ initialisation, which quantises the host (see init_lora_weights)"),
    "eva_config": refused(None, "configures EVA initialisation, not reproduced by polymod"),
    "corda_config": refused(None, "configures CorDA initialisation, which changes the host (see init_lora_weights)"),
    "lora_ga_config": refused(None, "configures LoRA-GA initialisation, which changes the host "
                                    "(see init_lora_weights)"),
    "use_dora": exact(False, "DoRA's magnitude vectors, on Linear and Conv1D sites (LoRA(dora=True)); DoRA on "
                             "embeddings is refused"),
    "velora_config": refused(None, "VeLoRA (compressed activations) is not reproduced by polymod"),
    "alora_invocation_tokens": refused(None, "activated LoRA (aLoRA) acts only on the tokens after its invocation "
                                             "sequence; polymod's LoRA acts on every token, so it would give other "
                                             "outputs. Run this adapter with PEFT, or train a plain LoRA"),
    "use_qalora": refused(False, "QALoRA (group-pooled input for quantised layers) is not reproduced by polymod"),
    "qalora_group_size": inert(16, "used only with use_qalora"),
    "monteclora_config": refused(None, "MonteCLoRA (sampled LoRA factors) is not reproduced by polymod"),
    "layer_replication": refused(None, "PEFT's layer replication duplicates host layers, which polymod never does"),
    "runtime_config": inert(None, "runtime-only settings (GPU offload), not saved by PEFT"),
    "lora_bias": refused(False, "a bias on LoRA's B is not represented by polymod's LoRA"),
    "target_parameters": refused(None, "LoRA on raw nn.Parameters (e.g. MoE experts) is not reproduced by polymod"),
    "use_bdlora": refused(None, "block-diagonal LoRA is not reproduced by polymod"),
    "arrow_config": refused(None, "PEFT's Arrow routing among LoRAs; load the LoRAs one by one and route them "
                                  "with polymod's routers"),
    "kasa_config": refused(None, "KaSA (singular-value adaptation) is not reproduced by polymod"),
    "ensure_weight_tying": refused(False, "ties the copies of tied layers (modules_to_save, trainable tokens), "
                                          "which polymod does not"),
}

IA3: dict[str, Option] = {
    **COMMON,
    "target_modules": exact(None, _TENSORS),
    "exclude_modules": exact(None, _TENSORS),
    "feedforward_modules": exact(None, "sites that scale their input, read from the vectors' shapes (1, D_in)"),
    "fan_in_fan_out": exact(False, "marks transformers' Conv1D layers (the host's own layer decides)"),
    "modules_to_save": _HEADS,
    "init_ia3_weights": inert(True, _INIT_ONLY),
}


def _submodules(value: Any) -> bool:
    return value in (1, None)


_PROMPT_SHARED: dict[str, Option] = {
    **COMMON,
    "num_virtual_tokens": exact(None, "the prompt length n"),
    "num_transformer_submodules": exact(
        None, "1 (the encoder or decoder-only stack)", accepts=_submodules,
        refusal="2 also prompts the decoder of an encoder-decoder host, which polymod's prompt and prefix do not"),
    "modules_to_save": exact(None, "PEFT saves these copies (the SEQ_CLS head): copies equal to the host's own "
                                   "layers are skipped, trained copies become a head module (pm.read_peft_modules; "
                                   "pm.load, which returns one module, says so)"),
}

PROMPT_TUNING: dict[str, Option] = {
    **_PROMPT_SHARED,
    "token_dim": exact(None, "must equal the host's embedding width (checked)"),
    "num_attention_heads": inert(None, "filled in by PEFT from the host config; prompt tuning does not use it"),
    "num_layers": inert(None, "filled in by PEFT from the host config; prompt tuning does not use it"),
    "prompt_tuning_init": inert("RANDOM", _INIT_ONLY),
    "prompt_tuning_init_text": inert(None, _INIT_ONLY),
    "tokenizer_name_or_path": inert(None, _INIT_ONLY),
    "tokenizer_kwargs": inert(None, _INIT_ONLY),
}

PREFIX_TUNING: dict[str, Option] = {
    **_PROMPT_SHARED,
    "token_dim": exact(None, "must equal the host's width (checked through the prefix's shape)"),
    "num_attention_heads": exact(None, "must equal the host's (checked through the prefix's shape)"),
    "num_layers": exact(None, "must equal the host's (checked through the prefix's shape)"),
    "init_weights": inert(None, _INIT_ONLY),
    "encoder_hidden_size": inert(None, "width of PEFT's projection MLP, which it applies before saving"),
    "prefix_projection": exact(False, "PEFT saves the projected prefixes, which polymod reads as they are"),
}

TABLES: dict[str, dict[str, Option]] = {"LORA": LORA, "IA3": IA3, "PROMPT_TUNING": PROMPT_TUNING,
                                        "PREFIX_TUNING": PREFIX_TUNING}
CLASS_NAMES = {"LORA": "LoraConfig", "IA3": "IA3Config", "PROMPT_TUNING": "PromptTuningConfig",
               "PREFIX_TUNING": "PrefixTuningConfig"}
