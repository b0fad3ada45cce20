"""Cards: a module's metadata, including its lineage.

A card travels with a module (``module.json``): what kind it is and how it was
configured, where it acts, which host it was made for, how well it does, under
which licence, and where it came from (its *lineage*: parent modules and the
recipe that produced it, e.g. a merge).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from polymod.errors import FormatError

FORMAT_VERSION = 1


@dataclass
class Parent:
    """A module this one was derived from."""

    name: str
    version: str | None = None
    sha256: str | None = None
    weight: float | None = None


@dataclass
class Lineage:
    """Where a module came from: its parents and the recipe applied to them.

    ``recipe`` is free-form JSON, e.g. ``{"method": "ties", "density": 0.2,
    "seed": 0}`` for a merge or ``{"data": "rotten_tomatoes", "steps": 300}`` for
    training.
    """

    parents: list[Parent] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line such as ``ties(density=0.2) of a@1.0.0, b@2.1.0``."""
        args = ", ".join(f"{k}={v}" for k, v in self.recipe.items() if k != "method")
        method = self.recipe.get("method", "derived")
        parents = ", ".join(f"{p.name}@{p.version}" if p.version else p.name for p in self.parents)
        return f"{method}({args}) of {parents}" if parents else f"{method}({args})"


@dataclass
class Card:
    """A module's metadata (serialised as ``module.json``)."""

    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    owner: str | None = None
    version: str | None = None
    sites: list[str] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    language: str | None = None
    tags: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    description: str | None = None
    lineage: Lineage = field(default_factory=Lineage)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Card:
        """Parse a card dict, rejecting unknown format versions and fields.

        Raises:
            FormatError: the dict is not a valid card.
        """
        if not isinstance(data, dict):
            raise FormatError(f"a card must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(f"card format_version {version!r} is not supported; this polymod reads {FORMAT_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise FormatError(f"card has unknown fields {sorted(unknown)}")
        if not isinstance(data.get("kind"), str):
            raise FormatError("card field 'kind' must be a string")
        values = dict(data)
        lineage = values.get("lineage") or {}
        try:
            values["lineage"] = Lineage(
                parents=[Parent(**p) for p in lineage.get("parents", [])],
                recipe=dict(lineage.get("recipe", {})),
            )
            return cls(**values)
        except (TypeError, AttributeError) as exc:
            raise FormatError(f"card is malformed: {exc}") from exc
