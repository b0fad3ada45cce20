"""Input sites at call time: reading and rewriting the keyword arguments of a host call.

Finding input sites (their names, roles and geometry) is part of :mod:`polymod.sites`;
this file holds what an input op does with a call once the engine hands it over.

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

from polymod.errors import IncompatibleHostError, StateError

# Cache objects -> number of leading *virtual* entries (prefixes) written into them
# during the current call; lets a prompt tell a first step (only virtual entries)
# from a cached decode step. Weak keys: nothing outlives the cache itself.
_VIRTUAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POSITIONAL: dict[type, list[str]] = {}


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
