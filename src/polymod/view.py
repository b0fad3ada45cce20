"""What is attached where: the :class:`AttachReport` of ``model.add``, ``repr(model)`` and ``model.describe()``.

Hooks are invisible in ``print(host)``, so the model says itself which modules
sit at which sites, of which kind, and whether each is merged into the host
weights, active (named by the active composition) or attached but inactive.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from polymod.modules.contract import Module


@dataclass
class AttachReport:
    """What :meth:`Modular.add` did: every site touched and the parameter budget."""

    name: str
    kind: str
    sites: list[str]
    trainable_parameters: int
    host_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Module parameters as a fraction of the host's."""
        return self.trainable_parameters / max(self.host_parameters, 1)

    def __str__(self) -> str:
        lines = [
            f"attached {self.kind} module {self.name!r} at {len(self.sites)} sites: "
            f"{self.trainable_parameters:,} parameters ({100 * self.share:.3f}% of the host's {self.host_parameters:,})"
        ]
        lines += [f"  {s}" for s in self.sites[:8]]
        if len(self.sites) > 8:
            lines.append(f"  ... and {len(self.sites) - 8} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def status(name: str, merged: Collection[str], active: Collection[str]) -> str:
    """``merged`` (acts through the host weights), ``active`` (named by the active composition) or ``inactive``."""
    return "merged" if name in merged else "active" if name in active else "inactive"


def summary(header: str, library: Mapping[str, Module], merged: Collection[str], active: Collection[str],
            composition: str) -> str:
    """One line per module: name, kind, sites, parameters and status; then the active composition."""
    lines = [header]
    width = max((len(n) for n in library), default=0)
    kinds = max((len(m.kind) for m in library.values()), default=0)
    for name, module in library.items():
        size = f"{len(module.sites)} sites, {module.num_parameters():,} params"
        lines.append(f"  {name:<{width}}  {module.kind:<{kinds}}  {size}  [{status(name, merged, active)}]")
    lines.append(f"  active: {composition}")
    return "\n".join(lines)


def per_site(library: Mapping[str, Module], merged: Collection[str], active: Collection[str],
             order: Sequence[str]) -> str:
    """Every touched site (input sites first, then host order) with the modules acting there."""
    at: dict[str, list[str]] = {}
    for name, module in library.items():
        for site in module.sites:
            at.setdefault(site, []).append(name)
    rank = {s: i for i, s in enumerate(order)}
    lines = [f"sites: {len(at)}"]
    width = max((len(n) for n in library), default=0)
    for site in sorted(at, key=lambda s: (s in rank, rank.get(s, 0), s)):
        geometry = library[at[site][0]].sites[site]
        layer = geometry.kind in ("linear", "conv1d")  # D_in -> D_out; other kinds' widths read differently
        shape = f" {geometry.in_features}->{geometry.out_features}" if layer else ""
        lines.append(f"  {site}  ({geometry.kind}{shape})")
        lines += [f"    {n:<{width}}  {library[n].kind}  {status(n, merged, active)}" for n in at[site]]
    return "\n".join(lines)
