"""Roles: names for the places modules usually act, resolved per architecture family.

``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``, ``ffn.in``, ``ffn.out``, ``embed``,
``block.out`` (and ``linear``, every linear layer but the output head, resolved in
:mod:`polymod.sites`) mean the same thing in every family; the tables below say
which qualified module names they are in BERT/RoBERTa, GPT-2, Llama-style and T5
hosts, with a generic fallback by name.
"""

from __future__ import annotations

from torch import nn

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out", "embed", "block.out", "linear")

# Per family: role -> regular expression on qualified module names.
FAMILY_ROLES: dict[str, dict[str, str]] = {
    "bert": {
        "attn.q": r"\.attention\.self\.query$",
        "attn.k": r"\.attention\.self\.key$",
        "attn.v": r"\.attention\.self\.value$",
        "attn.o": r"\.attention\.output\.dense$",
        "ffn.in": r"\.intermediate\.dense$",
        "ffn.out": r"\.layer\.\d+\.output\.dense$",
        "embed": r"embeddings\.word_embeddings$",
        "block.out": r"\.layer\.\d+$",
    },
    "gpt2": {
        "attn.q": r"\.attn\.c_attn$",
        "attn.k": r"\.attn\.c_attn$",
        "attn.v": r"\.attn\.c_attn$",
        "attn.o": r"\.attn\.c_proj$",
        "ffn.in": r"\.mlp\.c_fc$",
        "ffn.out": r"\.mlp\.c_proj$",
        "embed": r"(^|\.)wte$",
        "block.out": r"\.h\.\d+$",
    },
    "llama": {
        "attn.q": r"\.self_attn\.q_proj$",
        "attn.k": r"\.self_attn\.k_proj$",
        "attn.v": r"\.self_attn\.v_proj$",
        "attn.o": r"\.self_attn\.o_proj$",
        "ffn.in": r"\.mlp\.(gate_proj|up_proj)$",
        "ffn.out": r"\.mlp\.down_proj$",
        "embed": r"(^|\.)embed_tokens$",
        "block.out": r"\.layers\.\d+$",
    },
    "t5": {
        "attn.q": r"\.(SelfAttention|EncDecAttention)\.q$",
        "attn.k": r"\.(SelfAttention|EncDecAttention)\.k$",
        "attn.v": r"\.(SelfAttention|EncDecAttention)\.v$",
        "attn.o": r"\.(SelfAttention|EncDecAttention)\.o$",
        "ffn.in": r"\.DenseReluDense\.(wi|wi_0|wi_1)$",
        "ffn.out": r"\.DenseReluDense\.wo$",
        # transformers 5 gives encoder and decoder their own embedding modules
        # (tied weights); the forward calls those, not ``shared``.
        "embed": r"(encoder|decoder)\.embed_tokens$",
        "block.out": r"\.block\.\d+$",
    },
    "generic": {
        "attn.q": r"(^|\.)(q_proj|query|q_lin|q)$",
        "attn.k": r"(^|\.)(k_proj|key|k_lin|k)$",
        "attn.v": r"(^|\.)(v_proj|value|v_lin|v)$",
        "attn.o": r"(^|\.)(o_proj|out_proj|out_lin|dense|o)$",
        "ffn.in": r"(^|\.)(fc1|lin1|up_proj|gate_proj|c_fc|wi|intermediate\.dense)$",
        "ffn.out": r"(^|\.)(fc2|lin2|down_proj|wo)$",
        "embed": r"(^|\.)(embed_tokens|word_embeddings|wte|embeddings)$",
        "block.out": r"\.(layers?|h|block|blocks)\.\d+$",
    },
}

FAMILY_OF_MODEL_TYPE = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta"), "bert"),
    **dict.fromkeys(("gpt2",), "gpt2"),
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3"), "llama"
    ),
    **dict.fromkeys(("t5", "mt5", "umt5"), "t5"),
}

FUSED_QKV_NOTE = (
    "GPT-2 fuses q, k and v into one layer (c_attn): attn.q, attn.k and attn.v all select it, "
    "so a module there acts on queries, keys and values together."
)


def family_of(host: nn.Module) -> str:
    """The architecture family used to resolve roles: bert, gpt2, llama, t5 or generic."""
    model_type = getattr(getattr(host, "config", None), "model_type", None)
    return FAMILY_OF_MODEL_TYPE.get(model_type, "generic")
