"""Bottleneck adapters: Houlsby et al. 2019, Pfeiffer et al. 2021, He et al. 2022 (scaled parallel).

An adapter is a small residual bottleneck inserted into each transformer layer::

    f_φ(h) = s · U σ(D h)        D ∈ R^{r×D_in}, U ∈ R^{D_out×r}, r = ⌊D_in / reduction⌋
    h' = h + f_φ(h)              (a sequential adapter; h is what the adapter reads)

optionally with a new LayerNorm on h before D (``norm_before``) and on f_φ after
U (``norm_after``), and dropout on f_φ. The *placement* says which h it reads
and where f_φ is added, per architecture family (these match the configs of
AdapterHub ``adapters``; ``benchmarks/adapters_parity.py`` checks it on BERT):

* ``houlsby`` (Houlsby et al. 2019; adapters' ``DoubleSeqBnConfig``): two adapters
  per layer, on the output of the attention sub-layer and of the FFN, before the
  residual addition: sites ``attn.o`` and ``ffn.out`` (BERT ``attention.output.dense``
  and ``output.dense``, GPT-2 ``c_proj``, Llama ``o_proj``/``down_proj``, T5 ``o``/``wo``),
  h = the site's output y, Δy = f_φ(y).
* ``pfeiffer`` (Pfeiffer et al. 2021, AdapterFusion; adapters' ``SeqBnConfig``): one
  adapter after the FFN, on the residual stream z = x + FFN(x). Post-LN hosts (BERT)
  re-apply the host's own LayerNorm: the output is LN(z + f_φ(LN(z))), so the site
  is the *input* of ``layer.N.output.LayerNorm`` (an input site, see
  :mod:`polymod.inputs`), where z becomes z + f_φ(LN(z)). Pre-LN hosts (GPT-2,
  Llama, T5) have no norm there: the site is the block output, z' = z + f_φ(z).
* ``parallel`` (He et al. 2022, "Towards a unified view"; adapters' ``ParBnConfig``):
  one adapter beside the FFN, reading the FFN input x and adding s·f_φ(x) to the
  FFN output. Sites: the FFN module (GPT-2/Llama ``mlp``, T5 ``DenseReluDense``),
  reading its input. BERT splits its FFN across two modules; there the adapter
  adds s·f_φ(a) to the residual argument ``input_tensor`` a of ``layer.N.output``
  (an input site), which gives the same LN(FFN(a) + s·f_φ(a) + a).

Deliberate differences from ``adapters`` (see docs/modules/adapter.md): for
``houlsby`` the host's dropout after the projection acts on y + f_φ(y) rather than
before the adapter (identical in eval mode); pre-LN ``parallel`` reads the FFN's
normalised input (the FFN module's own input) where ``adapters`` reads the
un-normalised residual; T5 ``houlsby`` also adapts cross-attention outputs.

Defaults: reduction 16 and ReLU (``pfeiffer``) or SiLU/"swish" (``houlsby``) as in
``adapters``' configs; ``parallel`` uses reduction 2, ReLU and s = 4 (He et al.'s
best parallel adapter, adapters' ``ParBnConfig``). Initialisation ``zero``
(D Kaiming-uniform, U = 0; He et al.'s "mam" init) makes every adapter the exact
identity at initialisation; ``houlsby`` is the paper's near-identity N(0, 10⁻²)
truncated at ±2σ; ``bert`` is N(0, 0.02), adapters' default (not the identity).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import ConfigError, IncompatibleHostError
from polymod.modules.contract import register
from polymod.roles import family_of
from polymod.sites import Site

Placement = Literal["pfeiffer", "houlsby", "parallel"]
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,  # "swish" in adapters and Houlsby's code
    "tanh": torch.tanh,
}
_DEFAULTS = {  # placement -> (reduction, activation, scaling)
    "pfeiffer": (16.0, "relu", 1.0),
    "houlsby": (16.0, "silu", 1.0),
    "parallel": (2.0, "relu", 4.0),
}
INPUT = ".<input>"  # suffix of an input site (polymod.inputs): the call of a sub-module
# Post-LN (BERT-family) hosts: where the FFN's residual sum enters the LayerNorm, and BertOutput's call.
_BERT_FFN_NORM = re.compile(r"\.layer\.\d+\.output\.LayerNorm$")
_BERT_FFN_OUTPUT = re.compile(r"\.layer\.\d+\.output$")
_PARALLEL_FFN = {"gpt2": r"re:\.mlp$", "llama": r"re:\.mlp$", "t5": r"re:\.DenseReluDense$",
                 "generic": r"re:\.(mlp|feed_forward|ffn)$"}


@register
@dataclass(frozen=True)
class Adapter:
    """Configuration of a bottleneck adapter module.

    Args:
        placement: ``pfeiffer`` (after the FFN, on the residual stream), ``houlsby``
            (after attention and FFN outputs) or ``parallel`` (beside the FFN, scaled).
        reduction: the bottleneck is r = ⌊D / reduction⌋ (at least 1). None: the placement's default.
        activation: σ, one of ``relu``, ``gelu``, ``gelu_tanh``, ``silu`` (swish), ``tanh``.
            None: the placement's default.
        scaling: s multiplying f_φ. None: the placement's default (1, or 4 for ``parallel``).
        norm_before: a new trainable LayerNorm on the adapter input (adapters' ``ln_before``).
        norm_after: a new trainable LayerNorm on f_φ, before the residual (adapters' ``ln_after``).
        dropout: dropout probability on f_φ (training only).
        init: ``zero`` (exact identity at init), ``houlsby`` (near identity) or ``bert`` (N(0, 0.02)).
        sites: a site selection overriding the placement's sites; None uses the placement.
    """

    kind: ClassVar[str] = "adapter"
    placement: Placement = "pfeiffer"
    reduction: float | None = None
    activation: str | None = None
    scaling: float | None = None
    norm_before: bool = False
    norm_after: bool = False
    dropout: float = 0.0
    init: Literal["zero", "houlsby", "bert"] = "zero"
    sites: str | None = None

    def __post_init__(self) -> None:
        if self.placement not in _DEFAULTS:
            raise ConfigError(f"Adapter placement must be one of {sorted(_DEFAULTS)}, got {self.placement!r}")
        reduction, activation, scaling = _DEFAULTS[self.placement]
        for name, default in (("reduction", reduction), ("activation", activation), ("scaling", scaling)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)  # the card records the resolved value
        if not isinstance(self.reduction, (int, float)) or not self.reduction > 0:
            raise ConfigError(f"Adapter reduction must be a positive number, got {self.reduction!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"Adapter activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.scaling, (int, float)):
            raise ConfigError(f"Adapter scaling must be a number, got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Adapter dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("zero", "houlsby", "bert"):
            raise ConfigError(f"Adapter init must be 'zero', 'houlsby' or 'bert', got {self.init!r}")

    def sites_for(self, host: nn.Module) -> Any:
        """The site selection on ``host``: ``sites`` if given, else the placement's sites for its family."""
        if self.sites is not None:
            return self.sites
        family = family_of(host)
        if self.placement == "houlsby":
            return "attn.o|ffn.out"
        if family == "bert":
            pattern = _BERT_FFN_NORM if self.placement == "pfeiffer" else _BERT_FFN_OUTPUT
            return [n + INPUT for n, _ in host.named_modules() if pattern.search(n)] or "re:" + pattern.pattern
        if self.placement == "pfeiffer":
            return "block.out"
        return _PARALLEL_FFN.get(family, _PARALLEL_FFN["generic"])

    @staticmethod
    def _widths(site: Site, parallel: bool) -> tuple[int | None, int | None]:
        """(width read, width written): an input site reads and writes the call's hidden states."""
        if site.kind == "input":
            return site.in_features, site.in_features
        return (site.in_features if parallel else site.out_features), site.out_features

    def check_site(self, site: Site) -> str | None:
        if site.kind == "embedding" and self.placement == "parallel":
            return "a parallel adapter reads the site input, which is token ids at an embedding"
        if not all(self._widths(site, self.placement == "parallel")):
            return f"an adapter needs the width of the hidden states at its site, which is unknown for {site.name}"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> AdapterPart:
        reads_input = site.kind == "input" or self.placement == "parallel"
        d_in, d_out = self._widths(site, self.placement == "parallel")
        part = AdapterPart(d_in, d_out, max(1, int(d_in // self.reduction)), self.activation,
                           float(self.scaling), reads_input, self.norm_before, self.norm_after, self.dropout)
        weight = next(layer.parameters(), None) if layer is not None else None
        if weight is not None:
            part.to(device=weight.device, dtype=weight.dtype)
        part.reset_parameters(self.init)
        return part


class AdapterPart(nn.Module):
    """One adapter: D (r, D_in), U (D_out, r) with biases, optional LayerNorms; Δ = s·U σ(D h)."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int, activation: str, scaling: float,
                 reads_input: bool, norm_before: bool = False, norm_after: bool = False, dropout: float = 0.0):
        super().__init__()
        self.activation, self.scaling, self.reads_input = activation, scaling, reads_input
        self.norm_before = nn.LayerNorm(d_in) if norm_before else None
        self.down = nn.Linear(d_in, bottleneck)
        self.up = nn.Linear(bottleneck, d_out)
        self.norm_after = nn.LayerNorm(d_out) if norm_after else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._host: tuple[nn.Module, str, bool] | None = None  # (host layer, call argument, is a norm)

    def reset_parameters(self, init: str = "zero") -> None:
        """``zero``: D Kaiming-uniform, U = 0; ``houlsby``: N(0, 10⁻²) truncated at ±2σ; ``bert``: N(0, 0.02)."""
        with torch.no_grad():
            for linear in (self.down, self.up):
                if init == "zero":
                    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                elif init == "houlsby":
                    nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
                else:
                    nn.init.normal_(linear.weight, std=0.02)
                linear.bias.zero_()
            if init == "zero":
                self.up.weight.zero_()

    def attach_layer(self, layer: nn.Module) -> None:
        """Remember the host layer of an input site: which call argument to change, and whether it is a norm."""
        params = [p for p in inspect.signature(layer.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
        is_norm = "norm" in type(layer).__name__.lower()
        names = [p.name for p in params]
        argument = "input_tensor" if not is_norm and "input_tensor" in names else names[0]
        self._host = (layer, argument, is_norm)  # a tuple: nn.Module keeps it a plain attribute, never a submodule

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """f_φ(h) = norm_after(dropout(s · U σ(D norm_before(h)))), shaped (B, T, D_out)."""
        if self.norm_before is not None:
            h = self.norm_before(h)
        out = self.up(ACTIVATIONS[self.activation](self.down(h))) * self.scaling  # (B, T, r) -> (B, T, D_out)
        out = self.dropout(out)
        return self.norm_after(out) if self.norm_after is not None else out

    def forward(self, x: Any, y: Any) -> Any:
        """Δy at an output site (reading y, or x for a parallel adapter)."""
        return self.delta(x if self.reads_input else y)

    def add_into(self, x: Any, y: Any, weight: float = 1.0) -> Any:
        """y + weight·Δ at an output site; at an input site (``y`` is the call's arguments), the new call."""
        if not isinstance(y, dict):
            delta = self.forward(x, y)
            return y + delta if weight == 1.0 else y + weight * delta
        if self._host is None:
            raise IncompatibleHostError("an adapter at an input site must be attached with Modular.add first")
        layer, argument, is_norm = self._host
        z = y.get(argument)
        if not isinstance(z, torch.Tensor):
            raise IncompatibleHostError(f"{type(layer).__name__} was called without a tensor {argument!r}")
        own = next((p.dtype for p in layer.parameters() if p.is_floating_point()), z.dtype)  # the host's dtype
        read = layer.forward(z.to(own)).to(z.dtype) if is_norm else z  # forward(), not __call__: no hooks re-entered
        call = dict(y)
        call[argument] = z + weight * self.delta(read)
        return call

    def extra_repr(self) -> str:
        reads = "input" if self.reads_input else "output"
        return (f"down={tuple(self.down.weight.shape)}, up={tuple(self.up.weight.shape)}, "
                f"activation={self.activation}, scaling={self.scaling:g}, reads={reads}")
