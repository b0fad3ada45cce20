"""Input sites: a call of the host (or of one of its stacks) as a place where modules act.

Input-composition modules (prompt tuning, prefix tuning) change what the host
is *called with* — its token embeddings, attention mask, positions, labels and
key/value cache — not the output of a leaf layer. polymod treats such a call as
a site of kind ``input``::

    "<input>"            the host's own call: ``host(**batch)`` and every step of ``generate``
    "encoder.<input>"    the call of the sub-module ``encoder`` (any qualified name + ``.<input>``)
    "input"              a role: where the token sequence enters — ``<input>``; on encoder-decoder
                         hosts ``encoder.<input>`` (which ``generate`` calls directly, bypassing the
                         host's forward) and ``decoder.<input>`` (whose cross-attention mask must
                         cover the longer encoder output)
    "cache"              a role: the call that carries the self-attention key/value cache —
                         ``<input>``; ``decoder.<input>`` on encoder-decoder hosts

The engine registers a forward pre-hook with keyword arguments on the called
module (``nn.Module.register_forward_pre_hook(hook, with_kwargs=True)``, PyTorch's
official extension point). The hook binds positional arguments to their names
(:func:`bind_call`) and hands the call's keyword arguments, a plain ``dict``, to
the active plan's op, which returns the transformed dict; ``detach()`` removes
the hook like any other.

An input site's geometry is ``in_features`` = the width D of the token
embeddings the call takes and ``out_features`` = the width of one token's keys
and values over every self-attention layer of its cache, Σ_layers 2·H_kv·d_head
(None where the call carries no cache), which is what prompt and prefix modules
need to rebuild their parameters from a card alone.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from polymod.errors import IncompatibleHostError, SiteNotFoundError, StateError
from polymod.sites import Site, block_width

INPUT = "<input>"
ROLES = ("input", "cache")

# Cache objects -> number of leading *virtual* entries (prefixes) written into them
# during the current call; lets a prompt tell a first step (only virtual entries)
# from a cached decode step. Weak keys: nothing outlives the cache itself.
_VIRTUAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POSITIONAL: dict[type, list[str]] = {}


def is_input_site(name: str) -> bool:
    """Whether ``name`` names an input site (``<input>`` or ``<module>.<input>``)."""
    return name == INPUT or name.endswith("." + INPUT)


def is_input_pattern(pattern: str) -> bool:
    """Whether a selector item selects input sites (a name or one of :data:`ROLES`)."""
    return pattern in ROLES or is_input_site(pattern)


def target(host: nn.Module, name: str) -> nn.Module:
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


def site(host: nn.Module, name: str) -> Site:
    """Describe the input site ``name`` of ``host`` (its geometry: token width, cache width)."""
    module = target(host, name)
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    width = getattr(embeddings, "embedding_dim", None) or block_width(module)  # block_width: config or layers
    kv = kv_geometry(getattr(module, "config", None))
    if name != INPUT and not getattr(getattr(module, "config", None), "is_decoder", False):
        kv = None  # a sub-module's call carries a cache only when it is a decoder stack
    return Site(name, "input", width, 2 * kv[0] * kv[1] * kv[2] if kv else None)


def select(host: nn.Module, pattern: str) -> list[Site]:
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
    return [site(host, n) for n in names]


def bind_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as one keyword dict, positional ones named by ``module.forward``'s signature.

    Raises:
        StateError: more positional arguments than the forward names, or one given twice.
    """
    call = dict(kwargs)
    if not args:
        return call
    kind = type(module)
    if kind not in _POSITIONAL:
        params = inspect.signature(module.forward).parameters.values()
        _POSITIONAL[kind] = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = _POSITIONAL[kind]
    if len(args) > len(names):
        raise StateError(f"{kind.__name__} was called with {len(args)} positional arguments; its forward names "
                         f"{len(names)} ({', '.join(names)}); pass the rest by keyword")
    for key, value in zip(names, args):
        if key in call:
            raise StateError(f"{kind.__name__} got {key!r} both positionally and by keyword")
        call[key] = value
    return call


def cache_key(call: dict[str, Any]) -> str:
    """The key under which the call passes its cache (``cache`` in transformers 5, or ``past_key_values``)."""
    return "past_key_values" if call.get("past_key_values") is not None else "cache"


def virtual_entries(cache: Any) -> int:
    """How many leading entries of ``cache`` are virtual (prefixes written by polymod in this call)."""
    return _VIRTUAL.get(cache, 0) if cache is not None else 0


def mark_virtual(cache: Any, count: int) -> None:
    """Record that ``count`` more leading entries of ``cache`` are virtual (see :func:`is_first_step`)."""
    _VIRTUAL[cache] = virtual_entries(cache) + count


def is_first_step(call: dict[str, Any]) -> bool:
    """Whether the call starts a sequence: no cache, or a cache holding only virtual entries.

    Later steps of ``generate`` (cached decoding) return False: their tokens'
    keys and values follow what is already in the cache.
    """
    cache = call.get(cache_key(call))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return True
    return int(cache.get_seq_length()) <= virtual_entries(cache)


def tokens(call: dict[str, Any]) -> tuple[int, int, torch.device]:
    """(B, T, device) of the call's tokens (``inputs_embeds`` or ``input_ids``).

    Raises:
        StateError: the call has neither.
    """
    for key in ("inputs_embeds", "input_ids"):
        value = call.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0], value.shape[1], value.device
    raise StateError("an input module needs input_ids or inputs_embeds in the call; got neither "
                     f"(keys: {', '.join(sorted(call)) or 'none'})")


def grow_mask(call: dict[str, Any], n: int, key: str = "attention_mask") -> None:
    """Prepend ``n`` attended positions to the call's 2-D mask under ``key`` (left as None when absent).

    Raises:
        IncompatibleHostError: the mask is not 2-D (a prepared 4-D mask cannot be grown safely).
    """
    mask = call.get(key)
    if mask is None:
        return
    if mask.dim() != 2:
        raise IncompatibleHostError(f"{key} has {mask.dim()} dimensions; input modules need the 2-D (B, T) "
                                    "padding mask that tokenizers return, not a prepared 4-D mask")
    call[key] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, n + T)


def shift_positions(call: dict[str, Any], n: int, insert: bool) -> None:
    """Count the call's ``position_ids`` after ``n`` virtual tokens: add n, and prepend 0..n-1 when ``insert``.

    Raises:
        IncompatibleHostError: position ids that are not 2-D (e.g. multimodal 3-D positions).
    """
    pos = call.get("position_ids")
    if pos is None:
        return
    if pos.dim() != 2:
        raise IncompatibleHostError(f"position_ids has {pos.dim()} dimensions; input modules support 2-D (B, T)")
    shifted = pos + n
    if insert:
        head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)  # (B, n)
        shifted = torch.cat([head, shifted], dim=1)  # (B, n + T)
    call["position_ids"] = shifted
