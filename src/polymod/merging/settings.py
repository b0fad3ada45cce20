"""Recipe parameter settings: plain values, per-layer gradients and ``filter:`` overrides, as mergekit reads them.

A setting is one of

* a scalar — ``weight: 0.5``;
* a **gradient**, a list of scalars — ``t: [0, 0.5, 1]``: the value at a layer is
  interpolated linearly between the anchors, the layer's position t ∈ [0, 1] in its
  slice (layer i of n sits at i / (n − 1); tensors outside the layers sit at 0);
* a list of **conditional values** — ``t: [{filter: self_attn, value: [0, 1]},
  {value: 0.5}]``: the first entry whose ``filter`` is a substring of the tensor's
  name (or that has no filter, or ``filter: "*"``) gives the value, itself a
  scalar or a gradient.

Settings are looked up from the most specific scope to the least (a source's
``parameters``, then its slice's, then the recipe's); the first scope whose
setting yields a value wins. This is mergekit 0.1.5's ``evaluate_setting``; the
code is polymod's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Setting = Any  # a scalar, a list of scalars, a {filter, value} mapping, or a list of them
Kind = type | tuple[type, ...]


def is_scalar(value: Any) -> bool:
    """Whether ``value`` is a scalar a recipe may give (number, bool or string)."""
    return isinstance(value, (int, float, bool, str))


def evaluate(setting: Setting, tensor: str, t: float) -> Any:
    """The value a setting gives for tensor ``tensor`` at layer position ``t`` (None: no entry applies)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if is_scalar(setting):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(is_scalar(v) for v in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]  # booleans and strings select, never interpolate
        pos = t * (len(setting) - 1)
        lo = int(pos)
        hi = min(len(setting) - 1, lo + 1)
        frac = pos - lo
        return (1 - frac) * setting[lo] + frac * setting[hi]
    for entry in setting:
        pattern = entry.get("filter") if isinstance(entry, Mapping) else None
        if pattern is None or pattern == "*" or pattern in tensor:
            return evaluate(entry["value"], tensor, t)
    return None


def resolve(name: str, scopes: Iterable[Mapping[str, Setting] | None], tensor: str, t: float) -> Any:
    """The first value that the scopes (most specific first) give for parameter ``name``."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor, t)
            if value is not None:
                return value
    return None


def check(setting: Setting, kind: Kind, where: str, problems: list[str]) -> list[Any]:
    """Validate a setting's shape and leaf types; returns every leaf value (for range checks).

    Args:
        setting: the setting as written.
        kind: the type(s) each leaf must have (bool is never taken for a number).
        where: its place in the recipe, for messages.
        problems: where problems are appended.
    """
    numbers = kind in ((int, float), float)

    def ok(v: Any) -> bool:
        return isinstance(v, kind) and not (numbers and isinstance(v, bool))

    expected = "a number" if numbers else "true or false" if kind is bool else f"one of {kind}"
    if is_scalar(setting):
        if not ok(setting):
            problems.append(f"{where} must be {expected} (or a gradient list, or filter entries), got {setting!r}")
            return []
        return [setting]
    entries = [setting] if isinstance(setting, Mapping) else setting
    if not isinstance(entries, list) or not entries:
        problems.append(f"{where} must be {expected}, a non-empty gradient list or a list of {{filter, value}} "
                        f"entries, got {setting!r}")
        return []
    if all(is_scalar(v) for v in entries):
        bad = [v for v in entries if not ok(v)]
        if bad:
            problems.append(f"{where}: every gradient anchor must be {expected}, got {bad[0]!r}")
            return []
        return list(entries)
    leaves: list[Any] = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping) or "value" not in entry:
            problems.append(f"{at} must be a {{filter: <substring of tensor names>, value: ...}} entry, got {entry!r}")
            continue
        unknown = [k for k in entry if k not in ("filter", "value")]
        if unknown:
            problems.append(f"{at}: unknown key {unknown[0]!r} (a filter entry has filter and value)")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            problems.append(f"{at}.filter must be a string (a substring of tensor names), got {entry['filter']!r}")
        value = entry["value"]
        if isinstance(value, Mapping) or (isinstance(value, list) and not all(is_scalar(v) for v in value)):
            problems.append(f"{at}.value must be a scalar or a gradient list, got {value!r}")
            continue
        leaves += check(value, kind, f"{at}.value", problems)
    return leaves
