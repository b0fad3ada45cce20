"""Compositions as packages: a Stack/Mix expression whose leaves are hub modules.

A composition package is a directory with only ``module.json``: a card of kind
``composition`` whose ``config`` holds the expression (``compose.to_json``)
and, for each leaf name, the hub reference it stands for::

    {"expr": {"stack": ["en", "senti"]},
     "modules": {"en": "alice/lang-en@1.0.0", "senti": "bob/senti@2.1.0"}}

Its lineage parents are those modules with their content hashes, so the hub
draws a composition's graph and refuses to pull one whose parts changed. Its
content hash is the sha256 of its ``module.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polymod import compose
from polymod.card import Card, Lineage, Parent
from polymod.errors import CompositionError, FormatError, IntegrityError
from polymod.hub import names
from polymod.hub.api import get, show
from polymod.hub.client import HubLike
from polymod.hub.package import CARD_FILE, card_bytes, parse_card
from polymod.modular import Modular

KIND = "composition"


@dataclass
class CompositionPackage:
    """A loaded composition package: the expression, what each leaf refers to, and the card."""

    expr: Any
    modules: dict[str, names.Ref]
    card: Card = field(default_factory=lambda: Card(kind=KIND))

    def attach(self, model: Modular, hub: HubLike = None, token: str | None = None) -> None:
        """Pull every module (content hashes checked), add each under its leaf name, and ``model.use`` the expression.

        Raises:
            IntegrityError: a pulled module's content hash differs from the one the composition recorded.
            IncompatibleHostError: a module does not fit the model's host.
        """

        expected = {p.name: p.sha256 for p in self.card.lineage.parents}
        for leaf, ref in self.modules.items():
            info = show(str(ref), hub=hub)
            want = expected.get(ref.module)
            if want and info.sha256 != want:
                raise IntegrityError(f"composition leaf {leaf!r} expects {ref} with sha256 {want}, the hub has "
                                     f"{info.sha256}")
            model.add(leaf, get(str(ref), host=model.host, hub=hub, token=token))
        model.use(self.expr)


def save_composition(expr: compose.Composition, modules: dict[str, str], path: str | os.PathLike, hub: HubLike = None,
                     **card_fields: Any) -> Path:
    """Write a composition package.

    Args:
        expr: the composition (a module name, ``Stack(...)``, ...), leaves named as in ``modules``.
        modules: leaf name → hub reference ``owner/name@version`` (an exact version).
        path: the directory to create.
        hub: where to look the modules up to record their content hashes (default hub if None).
        **card_fields: card fields such as ``description``, ``task``, ``tags``.

    Raises:
        CompositionError: a leaf without a reference, or a reference without an exact version.
        NotFoundError: a referenced module is not in the hub.
    """

    refs = {leaf: names.Ref.parse(ref) for leaf, ref in modules.items()}
    missing = set(compose.leaves(expr)) - set(refs)
    if missing:
        raise CompositionError(f"composition leaves {sorted(missing)} have no module reference; give modules=")
    loose = [str(r) for r in refs.values() if r.version == names.LATEST]
    if loose:
        raise CompositionError(f"composition references {loose} need exact versions (owner/name@1.0.0)")
    parents = [Parent(r.module, r.version, show(str(r), hub=hub).sha256) for r in refs.values()]
    card = Card(kind=KIND, config={"expr": compose.to_json(expr), "modules": {k: str(v) for k, v in refs.items()}},
                lineage=Lineage(parents, {"method": "compose"}), **card_fields)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    (tmp / CARD_FILE).write_bytes(card_bytes(card))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_composition(path: str | os.PathLike) -> CompositionPackage:
    """Read a composition package written by :func:`save_composition`.

    Raises:
        FormatError: not a composition card, or a malformed expression or reference.
    """

    card = parse_card((Path(path) / CARD_FILE).read_bytes())
    config = card.config
    if card.kind != KIND or not isinstance(config.get("modules"), dict) or "expr" not in config:
        raise FormatError(f"{path} is not a composition package (kind {card.kind!r})")
    try:
        expr = compose.from_json(config["expr"])
        refs = {leaf: names.Ref.parse(ref) for leaf, ref in config["modules"].items()}
    except (CompositionError, names.InvalidNameError) as exc:
        raise FormatError(f"{path}: {exc}") from None
    return CompositionPackage(expr, refs, card)
