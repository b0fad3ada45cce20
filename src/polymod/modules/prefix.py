"""Prefix tuning (Li and Liang, 2021, arXiv 2101.00190).

Every self-attention layer ℓ attends to n trainable key/value vectors
(P_K^ℓ, P_V^ℓ ∈ R^{H_kv×n×d}) before the tokens' own::

    head_h(x) = softmax(q_h [P_K^ℓ; K_h]ᵀ / √d) [P_V^ℓ; V_h]

The survey's input composition at the attention's key/value stream. polymod
does this through transformers' own cache interface — no copied forward: at the
call that carries the self-attention cache (the ``cache`` role, see
:mod:`polymod.inputs`) the first step passes a cache pre-filled with the
prefixes (``DynamicCache.update`` per layer; for encoder-decoder hosts the
self-attention half of an ``EncoderDecoderCache``), grows the attention mask by
n attended positions and counts given ``position_ids`` after the prefix (+n).
The model then sees the prefixes exactly as cached keys and values of n earlier
tokens, including under ``generate()``: later cached steps only grow the mask
and shift positions. Grouped-query attention is native: prefixes have the
cache's H_kv heads (Llama with fewer key/value heads than query heads), and the
model repeats them like its own keys. The real tokens sit at positions n..n+T−1
(RoPE, learned positions) as in PEFT, since the model counts cached entries.

Reparametrisation (Li and Liang §4.3): with ``projection=h`` the prefixes are
P = MLP(P′), MLP = Linear(D, h) → tanh → Linear(h, L·2·H_kv·d), P′ ∈ R^{n×D}
(PEFT's ``prefix_projection`` layout). :func:`fold` computes P once and returns a
plain-prefix module for saving and serving.

Support (transformers 5.24):

* decoder-only (GPT-2, Llama incl. GQA): every layer, forward and ``generate()``.
  GPT-2 drops the cache under gradient checkpointing in training; that is refused.
* encoder-only (BERT): every layer; transformers' BERT updates a passed cache in
  its self-attention and sizes the mask from the 2-D mask we grow (masking_utils
  keeps that path for prefix tuning). BERT counts cached entries in its absolute
  positions, so tokens sit at n..n+T−1 — the same as PEFT.
* encoder-decoder (T5): the decoder's self-attention only (as PEFT does). The
  encoder stack of transformers 5 discards any cache passed to it
  (``T5Stack.forward``: "do not pass cache object down the line for encoder
  stack"), so encoder prefixes would need a copied forward; selecting
  ``encoder.<input>`` is refused at attach time with that reason.

Defaults: n = 10 (Li and Liang's table-to-text length; summarisation used 200);
no reparametrisation (PEFT's default ``prefix_projection=False``); P (or P′) drawn
from N(0, 1) and the MLP with PyTorch's default Linear init, as PEFT does.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from polymod import inputs
from polymod.card import Lineage, Parent
from polymod.errors import CompositionError, ConfigError, IncompatibleHostError, StateError
from polymod.modules.contract import Module, register, spec_to_dict
from polymod.roles import family_of
from polymod.sites import Site, kv_geometry

_ENCODER_REFUSAL = (
    "transformers 5 encoder stacks discard any key/value cache passed to them (T5Stack: 'do not pass cache object "
    "down the line for encoder stack'), so prefixes cannot reach the encoder without a copied forward; "
    "use sites='cache' (the decoder's self-attention)"
)


@register
@dataclass(frozen=True)
class PrefixTuning:
    """Configuration of a prefix-tuning module.

    Args:
        length: n, the number of prefix positions per layer (≥ 1).
        projection: hidden width h of the reparametrisation MLP; None for plain prefixes.
        sites: input sites; the ``cache`` role is the call carrying the self-attention cache.
    """

    kind: ClassVar[str] = "prefix"
    length: int = 10
    projection: int | None = None
    sites: str = "cache"

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"PrefixTuning length must be a positive integer, got {self.length!r}")
        if self.projection is not None and (not isinstance(self.projection, int) or self.projection < 1):
            raise ConfigError(f"PrefixTuning projection must be a positive integer or None, got {self.projection!r}")

    def check_site(self, site: Site) -> str | None:
        if site.kind != "input":
            return "prefix tuning acts on the call carrying the attention cache; use sites='cache' (the default)"
        if site.name.startswith("encoder."):
            return _ENCODER_REFUSAL
        if not site.out_features or not site.in_features:
            return "this call carries no self-attention cache whose geometry (layers, heads, head width) is known"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> PrefixPart:
        part = PrefixPart(self.length, site.in_features, site.out_features, self.projection)
        reference = next(layer.parameters(), None) if layer is not None else None
        if reference is not None:
            part.to(device=reference.device, dtype=reference.dtype)
        part.reset_parameters()
        return part


class PrefixPart(nn.Module):
    """Prefixes for every layer of one cache: P (n, L·2·H_kv·d), or MLP(P′) with P′ (n, D)."""

    def __init__(self, length: int, width: int, cache_width: int, projection: int | None = None):
        super().__init__()
        self.length, self.cache_width = length, cache_width
        if projection is None:
            self.prefix = nn.Parameter(torch.empty(length, cache_width))  # (n, L·2·H_kv·d)
        else:
            self.embedding = nn.Parameter(torch.empty(length, width))  # P′ (n, D)
            self.mlp = nn.Sequential(nn.Linear(width, projection), nn.Tanh(), nn.Linear(projection, cache_width))

    def reset_parameters(self) -> None:
        """P (or P′) from N(0, 1); the MLP keeps PyTorch's default Linear init."""
        with torch.no_grad():
            nn.init.normal_(self.prefix if hasattr(self, "prefix") else self.embedding)

    def forward(self, x: Any = None, y: Any = None) -> torch.Tensor:
        """The prefixes of every layer, flat per position: (n, L·2·H_kv·d), ordered (L, 2, H_kv, d)."""
        return self.prefix if hasattr(self, "prefix") else self.mlp(self.embedding)

    def add_into(self, module: nn.Module, call: dict[str, Any], weight: float = 1.0) -> dict[str, Any]:
        """The call with a cache pre-filled with the prefixes (first step) or counted after them (cached steps)."""
        if weight != 1.0:
            raise CompositionError(f"prefix tuning cannot be weighted (got weight {weight}); scaling keys and values "
                                   "does not scale a prefix's contribution. Use it unweighted or concatenate prefixes")
        n = self.length
        if not inputs.is_first_step(call):
            inputs.grow_mask(call, n)
            inputs.shift_positions(call, n, insert=False)
            return call
        if module.training and family_of(module) == "gpt2" and getattr(module, "is_activation_checkpointing", False):
            raise StateError("prefix tuning needs the key/value cache, which GPT-2 drops under gradient "
                             "checkpointing in training; call host.activation_checkpointing_disable()")
        batch, length, device = inputs.tokens(call)
        layers, heads, head_dim = self._geometry(module)
        kv = self.forward().view(n, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)  # (L, 2, H_kv, n, d)
        kv = kv.to(next((p.dtype for p in module.parameters() if p.is_floating_point()), kv.dtype))  # the host's
        key = inputs.cache_key(call)
        cache = call.get(key)
        if cache is None:
            cache = _new_cache(module, call)
        own = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: prefix the self-attention half
        for layer in range(layers):
            k = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H_kv, n, d)
            v = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H_kv, n, d)
            own.update(k, v, layer)
        inputs.mark_virtual(cache, n)
        call[key] = cache
        if call.get("attention_mask") is None:  # bidirectional hosts size their mask from it
            call["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=device)
        inputs.grow_mask(call, n)
        inputs.shift_positions(call, n, insert=False)
        return call

    def _geometry(self, module: nn.Module) -> tuple[int, int, int]:
        geometry = kv_geometry(getattr(module, "config", None))
        if geometry is None or 2 * geometry[0] * geometry[1] * geometry[2] != self.cache_width:
            raise IncompatibleHostError(f"{type(module).__name__}'s cache geometry {geometry} (layers, kv heads, "
                                        f"head width) does not give this prefix's width {self.cache_width}")
        return geometry

    def extra_repr(self) -> str:
        return f"length={self.length}, cache_width={self.cache_width}, projected={hasattr(self, 'mlp')}"


def _new_cache(module: nn.Module, call: dict[str, Any]) -> Any:
    config = getattr(module, "config", None)
    if call.get("encoder_hidden_states") is not None or getattr(config, "is_encoder_decoder", False):
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def fold(module: Module) -> Module:
    """A plain-prefix copy of a reparametrised prefix module: P = MLP(P′) computed once.

    Outputs are unchanged; the copy has n·L·2·H_kv·d parameters and no MLP, which
    is what Li and Liang keep after training. Its card records the fold in its lineage.

    Raises:
        ConfigError: ``module`` is not a prefix module.
    """
    if module.kind != PrefixTuning.kind:
        raise ConfigError(f"fold() takes a prefix module, got a {module.kind} module")
    spec = dataclasses.replace(module.spec, projection=None)
    sites = list(module.sites.values())
    parts = []
    for site in sites:
        with torch.no_grad():
            prefixes = module.part(site.name)()  # (n, L·2·H_kv·d)
        part = PrefixPart(spec.length, site.in_features, site.out_features).to(prefixes.device, prefixes.dtype)
        with torch.no_grad():
            part.prefix.copy_(prefixes)
        parts.append(part)
    card = copy.deepcopy(module.card)
    card.config = spec_to_dict(spec)
    card.lineage = Lineage(parents=[Parent(name=module.card.name or "prefix", version=module.card.version)],
                           recipe={"method": "fold", "projection": module.spec.projection})
    return Module(spec, sites, parts, card=card)
