"""Hash routing: each token goes to the expert its id hashes to (Roller et al., 2021).

"Hash Layers for Large Sparse Models" replace a learned router by a fixed
random function of the token id: no parameters, no load-balancing loss, no
collapse. Here the hash is Knuth's multiplicative hash of the token id::

    expert(t) = ((t · 2654435761 + seed) mod 2³²) mod E

It is global: computed once per forward from the token ids the host embeds
(recorded by the input-embedding pre-hook), then reused by every site that
sees those tokens — on encoder-decoder hosts the encoder's ids at sites over
the encoder's sequence (cross-attention keys and values). Hosts called with
``inputs_embeds`` have no ids to hash.
"""

from __future__ import annotations

from typing import Any

import torch

from polymod.errors import StateError
from polymod.routing.base import Router, RoutingInputs, register_router

_KNUTH = 2654435761


@register_router
class HashRouter(Router):
    """Fixed token-id hashing to one expert per token (see the module docstring).

    Args:
        seed: changes the token → expert assignment.
    """

    name = "hash"

    def __init__(self, seed: int = 0):
        super().__init__("token")
        self.seed = int(seed)

    def expert_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The expert index of each token id (same shape as ``ids``)."""
        return ((ids.long() * _KNUTH + self.seed) % (1 << 32)) % self.num

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        if inputs.token_ids is None:
            raise StateError("HashRouter hashes token ids, but the host was called without input_ids")
        ids = inputs.ids_for(y.shape[:-1])
        if ids is None:
            raise StateError(f"HashRouter has token ids of shape {tuple(inputs.token_ids.shape)} but a site output of "
                             f"shape {tuple(y.shape)}; hash routing needs sites that see the embedded tokens")
        w = torch.nn.functional.one_hot(self.expert_of(ids), self.num).to(y.dtype)  # (B, T, E)
        self.stats.update(w)
        return w

    def cache_key(self, inputs: RoutingInputs, y: torch.Tensor) -> Any:
        return (id(inputs.ids_for(y.shape[:-1])), tuple(y.shape[:-1]))

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed}
