"""The module kinds under test: one entry per kind, used by the invariant matrix.

Each entry maps a test id to ``(factory, identity_at_init)``; ``factory(family)``
returns a spec for that host family, or None where the kind does not apply.
Add a kind by adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polymod as pm
from polymod.modules.adapter import Adapter
from polymod.modules.delta import Delta
from polymod.modules.hyperlora import HyperLoRA
from polymod.modules.ia3 import IA3
from polymod.modules.invertible import Invertible
from polymod.modules.prefix import PrefixTuning
from polymod.modules.prompt import PromptTuning
from polymod.modules.sparse import SparseFT

HEADS = {"bert": "classifier", "gpt2": "lm_head", "llama": "lm_head", "t5": "lm_head"}  # each family's task head

KINDS: dict[str, tuple[Callable[[str], Any], bool]] = {
    "lora-attn": (lambda family: pm.LoRA(rank=4, sites="attn.q|attn.v"), True),
    "lora-linear-rs": (lambda family: pm.LoRA(rank=2, alpha=4, rslora=True, init="gaussian", sites="linear"), True),
    "lora-embed": (lambda family: pm.LoRA(rank=3, sites="embed|ffn.out"), True),
    "lora-dora-patterns": (
        lambda family: pm.LoRA(rank=3, dora=True, rank_pattern={"q|q_proj|query": 2},
                               alpha_pattern={"wo|c_proj|down_proj|dense": 5}, sites="attn.q|ffn.out"), True),
    "lora-bias": (  # Llama and T5 linear layers have no bias
        lambda family: pm.LoRA(rank=2, bias=True, sites="attn.v|ffn.out") if family in ("bert", "gpt2") else None,
        True),
    "ia3": (lambda family: IA3(), True),
    "sparse-random": (lambda family: SparseFT(density=0.05), True),
    "sparse-magnitude-embed": (lambda family: SparseFT(density=0.1, mask="magnitude", sites="embed|ffn.out"), True),
    "delta": (lambda family: Delta(sites="attn.q|ffn.out"), True),
    "delta-bias-embed": (  # Llama and T5 attention layers have no bias
        lambda family: Delta(bias=True, sites="embed|attn.v|attn.o") if family in ("bert", "gpt2") else None, True),
    "adapter-pfeiffer": (lambda family: Adapter(), True),
    "adapter-houlsby-norms": (lambda family: Adapter(placement="houlsby", norm_before=True, norm_after=True), True),
    "adapter-parallel": (lambda family: Adapter(placement="parallel", reduction=4), True),
    "invertible": (lambda family: Invertible(), True),
    "prompt": (lambda family: PromptTuning(length=3), False),
    "prefix": (lambda family: PrefixTuning(length=3), False),
    "head": (lambda family: pm.Head(sites=HEADS[family]), True),
    "hyper-lora": (lambda family: HyperLoRA(tasks=("t",), languages=("en",), rank=2, embedding_dim=4, hidden=8), True),
}

# Every kind that has dropout, with dropout > 0: the mode matrix (tests/test_mode.py) checks that the attached
# module follows the host's train/eval mode. ``factory(family)`` as above.
DROPOUT_KINDS: dict[str, Callable[[str], Any]] = {
    "lora-attn": lambda family: pm.LoRA(rank=4, dropout=0.3, sites="attn.q|attn.v"),
    "lora-linear-rs": lambda family: pm.LoRA(rank=2, alpha=4, rslora=True, dropout=0.3, sites="linear"),
    "lora-dora": lambda family: pm.LoRA(rank=2, dora=True, dropout=0.3, sites="attn.q|ffn.out"),
    "adapter-pfeiffer": lambda family: Adapter(dropout=0.3),
    "adapter-houlsby-norms": lambda family: Adapter(placement="houlsby", norm_before=True, norm_after=True,
                                                    dropout=0.3),
    "adapter-parallel": lambda family: Adapter(placement="parallel", reduction=4, dropout=0.3),
}
