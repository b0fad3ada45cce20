"""Finding sites: the places in a host where a module acts.

A *site* is a named sub-module of the host: a leaf layer (``nn.Linear``,
transformers' ``Conv1D``, ``nn.Embedding``) or a larger block whose output a
module transforms. Sites are selected with a small selector language::

    "attn.q|attn.v"                 roles, resolved per architecture family
    "*.q_proj"                      a glob on qualified module names
    "re:layers\\.[0-3]\\.mlp\\..*"   a regular expression (``re.search``); it takes the rest
                                    of the string, so its ``|`` is regex alternation
    ["attn.q", "*.dense"]           a list: the union of its items
    SiteSelector(types=nn.Linear)   by layer type
    "<input>", "input", "cache"     input sites: the host's call, where prompts and prefixes
                                    act (see :mod:`polymod.inputs`)

Roles (``attn.q``, ``attn.k``, ``attn.v``, ``attn.o``, ``ffn.in``, ``ffn.out``,
``embed``, ``block.out``, and ``linear`` for every linear layer but the output
head) are resolved per architecture family (BERT/RoBERTa, GPT-2, Llama-style,
T5) with a generic fallback by name.

GPT-2 fuses the query, key and value projections into one ``c_attn`` layer of
width 3·D. There ``attn.q``, ``attn.k`` and ``attn.v`` all resolve to that
fused layer: a module on it acts on queries, keys *and* values together. This
is stated in the attach report's ``notes`` rather than hidden.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from polymod.errors import ConfigError, SiteNotFoundError
from polymod.roles import FAMILY_ROLES, ROLES, family_of

SiteKind = Literal["linear", "conv1d", "embedding", "block", "input"]  # input: a call (polymod.inputs)

@dataclass(frozen=True)
class Site:
    """One resolved place in the host.

    Attributes:
        name: qualified module name in the host (``model.layers.0.self_attn.q_proj``).
        kind: ``linear`` (y = x Wᵀ + b), ``conv1d`` (transformers' Conv1D, y = x W + b),
            ``embedding`` or ``block``.
        in_features: input width (vocabulary size for an embedding; None for a block).
        out_features: output width (None for a block whose width is unknown).
    """

    name: str
    kind: SiteKind
    in_features: int | None
    out_features: int | None


def site_of(name: str, layer: nn.Module) -> Site:
    """Describe ``layer`` (named ``name`` in its host) as a :class:`Site`."""
    if isinstance(layer, nn.Linear):
        return Site(name, "linear", layer.in_features, layer.out_features)
    if isinstance(layer, nn.Embedding):
        return Site(name, "embedding", layer.num_embeddings, layer.embedding_dim)
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return Site(name, "conv1d", layer.weight.shape[0], layer.nf)
    width = block_width(layer)
    return Site(name, "block", width, width)


def block_width(layer: nn.Module) -> int | None:
    """The hidden width D of a block: its config's hidden size, else that of its last weighted sub-layer.

    The fallback covers config-less blocks (GPT-2 blocks and MLPs, T5 sub-layers,
    norms), whose last weighted layer, an output projection or a norm, has the
    block's output width. A linear layer's width here is its input width.
    """
    width = getattr(getattr(layer, "config", None), "hidden_size", None)
    if width is not None:
        return width
    if _is_linear_like(layer):
        return site_of("", layer).in_features
    for m in reversed(list(layer.modules())):
        if _is_linear_like(m) or isinstance(m, nn.Embedding):
            return site_of("", m).out_features
        weight = m._parameters.get("weight")
        if weight is not None and weight.dim() == 1:  # LayerNorm, RMSNorm, T5LayerNorm
            return weight.shape[0]
    return None


@dataclass(frozen=True)
class SiteSelector:
    """A site selection: patterns (roles, globs, ``re:`` regexes) and/or layer types.

    Args:
        patterns: roles, globs or ``re:`` regular expressions; a site matching any is selected.
        types: layer classes; when given, only sites of these types are kept.
    """

    patterns: tuple[str, ...] = ()
    types: tuple[type, ...] = field(default=())

    @classmethod
    def parse(cls, selection: str | Sequence[str] | SiteSelector) -> SiteSelector:
        """Build a selector from a string (``|``-separated), a list of strings or a selector."""
        if isinstance(selection, SiteSelector):
            return selection
        if isinstance(selection, str):
            items: Iterable[str] = _split(selection)
        elif isinstance(selection, Sequence):
            items = [p for s in selection for p in _split(str(s))]
        else:
            raise ConfigError(
                f"sites must be a string, a list of strings or a SiteSelector, got {type(selection).__name__}"
            )
        patterns = tuple(p.strip() for p in items if p.strip())
        if not patterns:
            raise ConfigError(f"sites selection {selection!r} is empty; give a role such as 'attn.q' or a glob")
        for p in patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise ConfigError(f"sites regex {p!r} does not compile: {exc}") from exc
        return cls(patterns=patterns)

    def __str__(self) -> str:
        parts = list(self.patterns) + [f"type={t.__name__}" for t in self.types]
        return "|".join(parts)


def _split(selection: str) -> list[str]:
    """Split on ``|``; a ``re:`` item takes the rest of the string (its ``|`` are regex alternation)."""
    items: list[str] = []
    rest = selection
    while rest:
        if rest.lstrip().startswith("re:"):
            items.append(rest.strip())
            break
        head, _, rest = rest.partition("|")
        items.append(head)
    return items


def named_layers(host: nn.Module) -> dict[str, nn.Module]:
    """Every named sub-module of ``host`` (the root excluded), deduplicated by identity."""
    return {n: m for n, m in host.named_modules() if n}


def _is_linear_like(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"))


def _role_matches(host: nn.Module, role: str, layers: dict[str, nn.Module]) -> list[str]:
    if role == "linear":
        head = host.get_output_embeddings() if hasattr(host, "get_output_embeddings") else None
        return [n for n, m in layers.items() if _is_linear_like(m) and m is not head]
    regex = re.compile(FAMILY_ROLES[family_of(host)][role])
    return [n for n in layers if regex.search(n)]


def name_matches(name: str, selection: str | Sequence[str] | SiteSelector) -> bool:
    """Whether a qualified site name matches a selection, decided from the name alone (no host).

    Kinds that treat some of their sites differently (IA³ scales the input at
    ``ffn.out`` sites, the output elsewhere) must decide it again when a module
    is loaded from disk, where only site names are known. A role matches when
    any family's naming of it does; globs and ``re:`` items match as in
    :func:`select`.

    Raises:
        ConfigError: the selection is malformed, or uses the ``linear`` role or
            layer types, which a name alone cannot decide.
    """
    selector = SiteSelector.parse(selection)
    if selector.types or "linear" in selector.patterns:
        raise ConfigError(f"selection {selector} cannot be decided from a site name; use roles, globs or 're:'")
    for pattern in selector.patterns:
        if pattern in ROLES:
            if any(re.search(roles[pattern], name) for roles in FAMILY_ROLES.values()):
                return True
        elif pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


# -- input sites: a call of the host (or of one of its stacks); see polymod.inputs ----------------

INPUT = "<input>"
INPUT_ROLES = ("input", "cache")


def is_input_site(name: str) -> bool:
    """Whether ``name`` names an input site (``<input>`` or ``<module>.<input>``)."""
    return name == INPUT or name.endswith("." + INPUT)


def is_input_pattern(pattern: str) -> bool:
    """Whether a selector item selects input sites (a name or one of :data:`INPUT_ROLES`)."""
    return pattern in INPUT_ROLES or is_input_site(pattern)


def input_target(host: nn.Module, name: str) -> nn.Module:
    """The module whose call the input site ``name`` is.

    Raises:
        SiteNotFoundError: ``name`` is not an input site of ``host``.
    """
    if name == INPUT:
        return host
    if is_input_site(name):
        try:
            return host.get_submodule(name[: -len(INPUT) - 1])
        except AttributeError:
            pass
    raise SiteNotFoundError(
        f"input site {name!r} does not exist in {type(host).__name__}; use '<input>' (the host's call) or "
        "'<sub.module>.<input>' naming one of its sub-modules, or the roles 'input' / 'cache'"
    )


def kv_geometry(config: Any) -> tuple[int, int, int] | None:
    """(layers L, key/value heads H_kv, head width d) of the self-attention cache a call with ``config`` carries.

    Encoder-decoder configs describe the decoder's cache (the encoder's calls carry none).
    Returns None when the config does not say.
    """
    if config is None:
        return None
    if getattr(config, "is_encoder_decoder", False) and not getattr(config, "is_decoder", False):
        layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    else:
        layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    width = getattr(config, "hidden_size", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or (width // heads if width else None)
    return (int(layers), int(kv_heads), int(head_dim)) if head_dim else None


def input_site(host: nn.Module, name: str) -> Site:
    """Describe the input site ``name`` of ``host`` (its geometry: token width, cache width)."""
    module = input_target(host, name)
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    width = getattr(embeddings, "embedding_dim", None) or block_width(module)  # block_width: config or layers
    kv = kv_geometry(getattr(module, "config", None))
    if name != INPUT and not getattr(getattr(module, "config", None), "is_decoder", False):
        kv = None  # a sub-module's call carries a cache only when it is a decoder stack
    return Site(name, "input", width, 2 * kv[0] * kv[1] * kv[2] if kv else None)


def input_sites(host: nn.Module, pattern: str) -> list[Site]:
    """Resolve an input-site name or role (``input``, ``cache``) to sites of ``host``.

    Raises:
        SiteNotFoundError: the name does not exist in ``host``.
    """
    encoder_decoder = bool(getattr(getattr(host, "config", None), "is_encoder_decoder", False))
    if pattern == "input":
        names = [f"encoder.{INPUT}", f"decoder.{INPUT}"] if encoder_decoder else [INPUT]
    elif pattern == "cache":
        names = [f"decoder.{INPUT}"] if encoder_decoder else [INPUT]
    else:
        names = [pattern]
    return [input_site(host, n) for n in names]


def select(host: nn.Module, selection: str | Sequence[str] | SiteSelector) -> list[Site]:
    """Resolve a selection to sites of ``host``, in the host's module order.

    Args:
        host: the pretrained network.
        selection: roles, globs, ``re:`` regexes (a ``|``-separated string or a list),
            or a :class:`SiteSelector`.

    Returns:
        The selected sites, each once, ordered as ``host.named_modules()``.

    Raises:
        ConfigError: the selection is malformed.
        SiteNotFoundError: a pattern matched nothing; the message lists close site names.
    """
    selector = SiteSelector.parse(selection)
    layers = named_layers(host)
    chosen: set[str] = set()
    calls: list[Site] = []  # input sites (the host's call, a stack's call): see polymod.inputs
    for pattern in selector.patterns:
        if is_input_pattern(pattern):
            calls += [s for s in input_sites(host, pattern) if s not in calls]
            continue
        if pattern in ROLES:
            hits = _role_matches(host, pattern, layers)
        elif pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            hits = [n for n in layers if regex.search(n)]
        else:
            hits = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SiteNotFoundError(_not_found_message(host, pattern, layers))
        chosen.update(hits)
    if not selector.patterns:
        chosen = set(layers)
    if calls and not chosen:
        return calls
    if selector.types:
        chosen = {n for n in chosen if isinstance(layers[n], selector.types)}
        if not chosen:
            raise SiteNotFoundError(
                f"no site of type {'/'.join(t.__name__ for t in selector.types)} matches {selector}; "
                f"layer types present include {sorted({type(m).__name__ for m in layers.values()})[:12]}"
            )
    return calls + [site_of(n, layers[n]) for n in layers if n in chosen]


def _bare_name_hint(pattern: str, names: list[str]) -> str | None:
    """Advice for PEFT-style bare layer names (``query``, ``query,value``): globs ``*.query`` joined by ``|``."""
    if pattern.startswith("re:") or any(c in pattern for c in "*?[."):
        return None
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    globs = [f"*.{p}" if any(n.rsplit(".", 1)[-1] == p for n in names) else None for p in parts]
    if "," not in pattern and globs[0] is None:
        return None
    found = [g for g in globs if g]
    advice = []
    if found:
        example = next(n for n in names if n.rsplit(".", 1)[-1] == found[0][2:])
        advice.append(f"Patterns match whole qualified names such as {example!r}; to match those layers in every "
                      f"block use the glob sites={'|'.join(found)!r}")
    if "," in pattern:
        advice.append("Several patterns are joined with '|' (or given as a list), not with ','")
    return ". ".join(advice) + "."


def _not_found_message(host: nn.Module, pattern: str, layers: dict[str, nn.Module]) -> str:
    names = list(layers)
    bare = _bare_name_hint(pattern, names)
    if bare is not None:
        return f"sites pattern {pattern!r} matched nothing in {type(host).__name__}. {bare}"
    probe = pattern[3:] if pattern.startswith("re:") else pattern.replace("*", "")
    close = difflib.get_close_matches(probe, names + list(ROLES), n=5, cutoff=0.3)
    if not close:  # fall back to names sharing the last component
        tail = probe.rsplit(".", 1)[-1]
        close = [n for n in names if tail and tail in n][:5]
    hint = f" Close names: {', '.join(close)}." if close else ""
    return (
        f"sites pattern {pattern!r} matched nothing in {type(host).__name__} "
        f"(family {family_of(host)!r}).{hint} Use a role ({', '.join(ROLES)}), a glob such as "
        f"'*.q_proj', or 're:<regex>' on qualified names."
    )
