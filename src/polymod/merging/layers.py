"""Where a checkpoint's layers are: tensor names split into stack, layer index and the rest.

Hugging Face checkpoints name a transformer layer's tensors ``<stack>.<i>.<rest>``
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.3.attn.c_attn.weight``,
``encoder.layer.3...``, ``encoder.block.3...``). Per-layer gradients need a
tensor's position in its stack, and ``slices:`` restack layers under new
indices. Tensors outside the layers are *pre* (embeddings, before the layers)
or *post* (final norm, output head), which matters when slices take them from
different models (the first slice's sources give the pre tensors, the last
slice's the post tensors, as in mergekit).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_LAYER = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")
_POST = re.compile(r"(^|\.)(lm_head|norm|ln_f|final_layer_?norm|final_norm|score|classifier|pooler)(\.|$)")
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class LayerName:
    """A tensor inside a layer stack: ``f"{stack}.{index}.{rest}"``."""

    stack: str
    index: int
    rest: str

    def at(self, index: int) -> str:
        """The same tensor's name in layer ``index``."""
        return f"{self.stack}.{index}.{self.rest}"


def layer_of(name: str) -> LayerName | None:
    """The layer a tensor belongs to, or None for tensors outside the layers."""
    m = _LAYER.match(name)
    return LayerName(m["stack"], int(m["index"]), m["rest"]) if m else None


def is_post(name: str) -> bool:
    """Whether a tensor outside the layers comes after them (final norm, output head)."""
    return bool(_POST.search(name))


def stacks(names: Iterable[str]) -> dict[str, int]:
    """Each layer stack's number of layers (largest index + 1)."""
    out: dict[str, int] = {}
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            out[layer.stack] = max(out.get(layer.stack, 0), layer.index + 1)
    return out


def position(name: str, counts: dict[str, int]) -> float:
    """A tensor's gradient position t ∈ [0, 1]: layer i of n at i / (n − 1); 0 outside the layers."""
    layer = layer_of(name)
    if layer is None:
        return 0.0
    n = counts[layer.stack]
    return layer.index / (n - 1) if n > 1 else 1.0


def layer_tensors(names: Iterable[str]) -> dict[int, list[LayerName]]:
    """The tensors of each layer index (one stack), in the given order."""
    out: dict[int, list[LayerName]] = {}
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            out.setdefault(layer.index, []).append(layer)
    return out
