"""The allow-list of AdapterHub ``adapters`` config options (1.3): one table per config class.

``adapter_config.json`` holds the metadata of the saved adapter (:data:`META`)
and, under ``config``, the adapter's configuration: ``LoRAConfig``
(:data:`LORA`) or a bottleneck ``BnConfig`` (:data:`BOTTLENECK`: ``SeqBnConfig``,
``DoubleSeqBnConfig``, ``ParBnConfig``). Each key is read exactly, has no effect
on the adapter's function, or is refused by name unless at its default; see
:mod:`polymod.interop.options`.
"""

from __future__ import annotations

from polymod.interop.options import Option, exact, inert, refused

_INIT_ONLY = "initialisation only; the saved tensors hold the trained values"
_TENSORS = "the sites are read from the saved tensors' names"
_PHM = "used only with phm_layer (refused)"

META: dict[str, Option] = {
    "config": exact(None, "the adapter's configuration (checked against the tables below)"),
    "hidden_size": exact(None, "the host width (checked through the tensors' shapes)"),
    "model_class": inert(None, "recorded on the card when no host is given"),
    "model_name": inert(None, "the base model's name, recorded by adapters"),
    "model_type": inert(None, "recorded on the card when no host is given"),
    "name": exact(None, "the adapter's name: its tensors' key infix"),
    "version": inert(None, "the adapters version that wrote it; recorded in the lineage"),
}

LORA: dict[str, Option] = {
    "architecture": exact("lora", "selects the LoRA reader"),
    "r": exact(8, "LoRA rank r"),
    "alpha": exact(8, "α: scaling α/r"),
    "dropout": exact(0.0, "dropout on the LoRA input, active in training mode only"),
    "attn_matrices": exact(["q", "v"], _TENSORS),
    "selfattn_lora": exact(True, _TENSORS),
    "intermediate_lora": exact(False, _TENSORS),
    "output_lora": exact(False, _TENSORS),
    "leave_out": exact([], _TENSORS),
    "composition_mode": refused("add", "only 'add' (y + s·B A x) is polymod's LoRA; 'scale' multiplies the output "
                                       "(use polymod's IA3 instead)"),
    "init_weights": exact("lora", _INIT_ONLY, accepts=lambda v: v in ("lora", "bert"),
                          refusal="'ia3' and 'vera' initialisations belong to other methods polymod does not read "
                                  "from a LoRA config"),
    "init_weights_seed": inert(None, _INIT_ONLY),
    "dtype": inert(None, "the LoRA weights' dtype; polymod casts them to the host's on attach"),
    "use_gating": refused(False, "gated LoRA (a learned gate per input) is not represented by polymod's LoRA"),
    "use_dora": refused(False, "adapters' DoRA is not read (PEFT's DoRA is: use_dora in a PEFT config)"),
    "vera_d": refused(None, "VeRA (shared random factors with learned scalings) is not represented"),
    "vera_b": refused(None, "VeRA (shared random factors with learned scalings) is not represented"),
}

BOTTLENECK: dict[str, Option] = {
    "architecture": exact(None, "absent or 'bottleneck': selects the bottleneck reader"),
    "mh_adapter": exact(None, "placement flag (with output_adapter, is_parallel, original_ln_before/after, "
                              "residual_before_ln): SeqBn, DoubleSeqBn and ParBn combinations are read, others "
                              "refused"),
    "output_adapter": exact(None, "placement flag (see mh_adapter)"),
    "is_parallel": exact(False, "placement flag (see mh_adapter)"),
    "original_ln_before": exact(False, "placement flag (see mh_adapter)"),
    "original_ln_after": exact(True, "placement flag (see mh_adapter)"),
    "residual_before_ln": exact(True, "placement flag (see mh_adapter)"),
    "reduction_factor": exact(None, "bottleneck width D / reduction_factor (a number; per-layer dicts refused)"),
    "non_linearity": exact(None, "the activation σ (relu, swish/silu, gelu, gelu_new, gelu_orig, tanh)"),
    "scaling": exact(1.0, "output scaling s (a number; 'learned' and 'channel' refused)"),
    "ln_before": exact(False, "LayerNorm before the down-projection"),
    "ln_after": exact(False, "LayerNorm after the up-projection"),
    "dropout": exact(0.0, "dropout on the adapter's output, active in training mode only"),
    "leave_out": exact([], _TENSORS),
    "init_weights": inert("bert", _INIT_ONLY),
    "init_weights_seed": inert(None, _INIT_ONLY),
    "adapter_residual_before_ln": refused(False, "the residual taken before the adapter's own LayerNorm is not "
                                                 "one of polymod's placements"),
    "cross_adapter": refused(False, "adapters in cross-attention are not represented"),
    "inv_adapter": refused(None, "an invertible adapter inside a bottleneck config is not read (polymod's "
                                 "Invertible is a module of its own)"),
    "inv_adapter_reduction_factor": inert(None, "used only with inv_adapter (refused)"),
    "stochastic_depth": refused(0.0, "stochastic depth (dropping the adapter per example in training) is not "
                                     "represented"),
    "use_gating": refused(False, "gated adapters (a learned gate per input) are not represented"),
    "phm_layer": refused(False, "PHM (parameterised hypercomplex) layers are not represented"),
    "phm_dim": inert(4, _PHM),
    "phm_rank": inert(1, _PHM),
    "phm_bias": inert(True, _PHM),
    "phm_c_init": inert("normal", _PHM),
    "phm_init_range": inert(0.0001, _PHM),
    "learn_phm": inert(True, _PHM),
    "shared_W_phm": inert(False, _PHM),
    "shared_phm_rule": inert(True, _PHM),
    "factorized_phm_W": inert(True, _PHM),
    "factorized_phm_rule": inert(False, _PHM),
    "hypercomplex_nonlinearity": inert("glorot-uniform", _PHM),
}
