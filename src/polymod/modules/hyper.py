"""Hypernetwork LoRA (HyperFormer, Mahabadi et al. 2021, arXiv 2106.04489; Hyper-X, Üstün et al. 2022,
arXiv 2205.12148).

One shared network generates the LoRA weights of every site from learned
embeddings of the task, optionally the language, and the site::

    z_s = [e_task; e_lang; e_site]                        (e_lang only with languages)
    h_s = ReLU(W₁ z_s + b₁)                               shared trunk
    A_s = reshape(H_A^g h_s) ∈ R^{r×D_in},  B_s = reshape(H_B^g h_s) ∈ R^{D_out×r}
    y = W x + s · B_s A_s x,   s = α / r

H_A^g, H_B^g are output heads shared by every site of the same shape g =
(D_in, D_out) — HyperFormer generates all layers' adapters with one network fed
a layer embedding; sites of different shapes need their own output layer. A new
task (or language) is a new embedding row (:func:`add_task`); the trunk and
heads are shared, so tasks share what they learn (Hyper-X's zero-shot
task-language combinations come from this).

Parts: the trunk, heads and task/language embeddings live in one *hub* part at
the host's ``<input>`` site (they are saved once); each leaf site holds its own
site embedding and reaches the hub through the spec's ``link_parts``. The hub
also holds the **selection**: which task/language the live module generates
for — one for the batch or one per row (rows with different tasks in one batch,
grouped once per forward). Set it with :func:`select` / :func:`selected`; it is
shown in the hub's ``repr`` and defaults to the first task and language.
:func:`materialise` turns one selection into a plain LoRA module (saveable,
mergeable); the live module itself is not mergeable.

Defaults: rank 8 and α = r as for LoRA; H_B starts at zero so the module is the
identity at initialisation (LoRA's B = 0), and H_A so that A starts at LoRA's
scale (entries of order 1/√D_in). The embedding width 64 and trunk width 128
are our choices for small hosts, not values from the papers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from polymod.card import Card, Lineage, Parent
from polymod.errors import ConfigError, StateError
from polymod.modules.contract import Module, register, spec_to_dict
from polymod.modules.lora import LoRA, LoRAPart
from polymod.sites import INPUT, Site, SiteSelector, is_input_site

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


@register
@dataclass(frozen=True)
class HyperLoRA:
    """Configuration of a hypernetwork that generates LoRA weights.

    Args:
        tasks: task names (each gets an embedding); at least one.
        languages: language names (Hyper-X); empty for task-only conditioning (HyperFormer).
        rank: r of the generated LoRA updates.
        alpha: α; updates are scaled by α/r. None means α = r.
        embedding_dim: width e of the task, language and site embeddings.
        hidden: width of the shared trunk.
        sites: leaf sites to generate LoRA weights for; ``<input>`` (the hub) is added.
    """

    kind: ClassVar[str] = "hyper-lora"
    tasks: tuple[str, ...] = ("default",)
    languages: tuple[str, ...] = ()
    rank: int = 8
    alpha: float | None = None
    embedding_dim: int = 64
    hidden: int = 128
    sites: str = "attn.q|attn.v"

    def __post_init__(self) -> None:
        for field_name in ("tasks", "languages"):
            names = tuple(getattr(self, field_name))
            object.__setattr__(self, field_name, names)
            bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
            if bad or len(set(names)) != len(names):
                raise ConfigError(f"HyperLoRA {field_name} must be distinct names of letters, digits, '_' and '-', "
                                  f"got {names!r}")
        if not self.tasks:
            raise ConfigError("HyperLoRA needs at least one task name, e.g. tasks=('sst2', 'mnli')")
        for field_name in ("rank", "embedding_dim", "hidden"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"HyperLoRA {field_name} must be a positive integer, got {value!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"HyperLoRA alpha must be positive or None, got {self.alpha!r}")
        if not isinstance(self.sites, str):
            raise ConfigError(f"HyperLoRA sites must be a selection string such as 'attn.q|attn.v', got {self.sites!r}")
        if INPUT not in SiteSelector.parse(self.sites).patterns:
            object.__setattr__(self, "sites", f"{INPUT}|{self.sites}")

    @property
    def scaling(self) -> float:
        """s = α/r."""
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def leaf_sites(self) -> str:
        """The selection without the hub's ``<input>`` site."""
        return "|".join(p for p in SiteSelector.parse(self.sites).patterns if p != INPUT)

    def check_site(self, site: Site) -> str | None:
        if site.kind == "input":
            return None if site.name == INPUT else "the hypernetwork's hub lives at '<input>' only"
        if site.kind not in ("linear", "conv1d"):
            return "HyperLoRA generates LoRA weights for linear layers (Linear, Conv1D), not embeddings or blocks"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> nn.Module:
        if site.kind == "input":
            part: nn.Module = HyperHub(self.tasks, self.languages, self.embedding_dim, self.hidden, self.rank)
        else:
            part = HyperLoRAPart(site.kind, site.in_features, site.out_features, self.rank, self.scaling,
                                 self.embedding_dim)
        reference = getattr(layer, "weight", None) if layer is not None else None
        if reference is None and layer is not None:
            reference = next(layer.parameters(), None)
        if isinstance(reference, torch.Tensor):
            part.to(device=reference.device, dtype=reference.dtype)
        return part

    def link_parts(self, parts: dict[str, nn.Module]) -> None:
        """Give every leaf part the hub, and the hub one pair of output heads per site shape."""
        hub = parts.get(INPUT)
        if not isinstance(hub, HyperHub):
            raise ConfigError("a HyperLoRA module needs its hub at the '<input>' site")
        leaves = [p for p in parts.values() if isinstance(p, HyperLoRAPart)]
        hub.add_heads(sorted({p.shape for p in leaves}))
        for part in leaves:
            part.link(hub)


class HyperHub(nn.Module):
    """The shared hypernetwork: embeddings, trunk, per-shape heads, and the current selection."""

    def __init__(self, tasks: Sequence[str], languages: Sequence[str], embedding_dim: int, hidden: int, rank: int):
        super().__init__()
        self.tasks, self.languages, self.rank = list(tasks), list(languages), rank
        self.task_embeddings = nn.Parameter(torch.randn(len(self.tasks), embedding_dim))  # (tasks, e)
        self.language_embeddings = nn.Parameter(torch.randn(len(self.languages), embedding_dim)) if languages else None
        width = embedding_dim * (3 if languages else 2)  # [task; language; site] or [task; site]
        self.trunk = nn.Linear(width, hidden)
        self.heads = nn.ModuleDict()
        self.select(self.tasks[0], self.languages[0] if self.languages else None)

    def add_heads(self, shapes: Sequence[tuple[int, int]]) -> None:
        """Create H_A, H_B for each (D_in, D_out) not yet present; H_B starts at zero."""
        like = self.trunk.weight
        for d_in, d_out in shapes:
            key = f"{d_in}x{d_out}"
            if key in self.heads:
                continue
            head_a = nn.Linear(self.trunk.out_features, self.rank * d_in).to(like.device, like.dtype)
            head_b = nn.Linear(self.trunk.out_features, d_out * self.rank).to(like.device, like.dtype)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(d_in * self.trunk.out_features)
                head_a.weight.uniform_(-bound, bound)
                head_a.bias.zero_()
                head_b.weight.zero_()
                head_b.bias.zero_()
            self.heads[key] = nn.ModuleList([head_a, head_b])

    def select(self, task: str | Sequence[str], language: str | Sequence[str] | None = None) -> None:
        """Set the selection: one task (and language) for the batch, or one per row.

        Raises:
            ConfigError: an unknown name, a language without languages (or none with them),
                or per-row lists of different lengths.
        """
        tasks = [task] if isinstance(task, str) else list(task)
        index = [self._index(self.tasks, t, "task") for t in tasks]
        if self.languages:
            language = self.languages[0] if language is None else language
            langs = [language] if isinstance(language, str) else list(language)
            lang_index = [self._index(self.languages, g, "language") for g in langs]
        elif language is not None:
            raise ConfigError("this hypernetwork has no languages; create it with HyperLoRA(languages=(...))")
        else:
            lang_index = [0]
        rows = max(len(index), len(lang_index))
        if {len(index), len(lang_index)} - {1, rows}:
            raise ConfigError(f"per-row selections must have one entry per row: {len(index)} tasks, "
                              f"{len(lang_index)} languages")
        pairs = list(zip(index * (rows // len(index)), lang_index * (rows // len(lang_index)), strict=True))
        combos = list(dict.fromkeys(pairs))  # distinct (task, language): weights are generated once each
        per_row = not isinstance(task, str) or _is_list(language)
        self._combos = torch.tensor(combos, dtype=torch.long)  # (U, 2)
        self._rows = torch.tensor([combos.index(p) for p in pairs], dtype=torch.long) if per_row else None  # (B,)
        self.selection = (task if isinstance(task, str) else list(task),
                          language if language is None or isinstance(language, str) else list(language))

    @staticmethod
    def _index(names: list[str], name: str, what: str) -> int:
        if name not in names:
            raise ConfigError(f"unknown {what} {name!r}; this hypernetwork knows {', '.join(names)} "
                              f"(add one with polymod.modules.hyper.add_{what}(module, {name!r}))")
        return names.index(name)

    def generate(self, site_embedding: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A (U, r, D_in) and B (U, D_out, r) for the U distinct selected combinations at one site."""
        combos = self._combos.to(site_embedding.device)
        z = [self.task_embeddings[combos[:, 0]]]  # (U, e)
        if self.language_embeddings is not None:
            z.append(self.language_embeddings[combos[:, 1]])  # (U, e)
        z.append(site_embedding.expand(combos.shape[0], -1))  # (U, e)
        h = F.relu(self.trunk(torch.cat(z, dim=-1)))  # (U, hidden)
        head_a, head_b = self.heads[f"{shape[0]}x{shape[1]}"]
        a = head_a(h).view(-1, self.rank, shape[0])  # (U, r, D_in)
        b = head_b(h).view(-1, shape[1], self.rank)  # (U, D_out, r)
        return a, b

    def forward(self, x: Any = None, y: Any = None) -> None:
        """The hub has no virtual tokens; its input site only anchors the shared parameters."""
        return None

    def add_into(self, module: nn.Module, call: dict[str, Any], weight: float = 1.0) -> dict[str, Any]:
        """The call, unchanged."""
        return call

    def extra_repr(self) -> str:
        task, language = self.selection
        chosen = f"task={task!r}" + (f", language={language!r}" if self.languages else "")
        return f"tasks={self.tasks}, languages={self.languages}, selected: {chosen}"


def _is_list(value: Any) -> bool:
    return value is not None and not isinstance(value, str)


class HyperLoRAPart(nn.Module):
    """One site: its embedding e_site; A and B come from the hub."""

    def __init__(self, site_kind: str, d_in: int, d_out: int, rank: int, scaling: float, embedding_dim: int):
        super().__init__()
        self.site_kind, self.shape, self.rank, self.scaling = site_kind, (d_in, d_out), rank, scaling
        self.site_embedding = nn.Parameter(torch.randn(embedding_dim))  # (e,)

    def link(self, hub: HyperHub) -> None:
        """Keep the hub as a plain attribute (not a submodule: it is saved once, at ``<input>``)."""
        self.__dict__["hub"] = hub

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated A (U, r, D_in) and B (U, D_out, r) for the hub's current selection."""
        if "hub" not in self.__dict__:
            raise StateError("this HyperLoRA part is not linked to its hub; build it through a Module")
        return self.__dict__["hub"].generate(self.site_embedding, self.shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = s · B A x, with one (A, B) per row under a per-row selection."""
        a, b = self.weights()
        rows = self.__dict__["hub"]._rows
        if rows is None:
            return F.linear(F.linear(x, a[0]), b[0]) * self.scaling  # (B, T, D_out)
        if x.shape[0] != rows.numel():
            raise StateError(f"the hypernetwork's per-row selection has {rows.numel()} rows but the batch at this "
                             f"site has {x.shape[0]}; select one task per row of this batch")
        rows = rows.to(x.device)
        h = torch.einsum("b...d,brd->b...r", x, a[rows])  # (B, T, r)
        return torch.einsum("b...r,bor->b...o", h, b[rows]) * self.scaling  # (B, T, D_out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, shape={self.shape}, scaling={self.scaling:g}"


def _hub(module: Module) -> HyperHub:
    if module.kind != HyperLoRA.kind:
        raise ConfigError(f"expected a {HyperLoRA.kind} module, got a {module.kind} module")
    return module.part(INPUT)


def select(module: Module, task: str | Sequence[str], language: str | Sequence[str] | None = None) -> None:
    """Choose what the live hypernetwork module generates for.

    Args:
        module: a HyperLoRA module (``model["name"]``).
        task: a task name for the whole batch, or a list with one name per row.
        language: likewise for languages (only for modules with languages; default: the first).

    Raises:
        ConfigError: not a HyperLoRA module, or an unknown or ill-shaped selection.
    """
    _hub(module).select(task, language)


@contextmanager
def selected(module: Module, task: str | Sequence[str], language: str | Sequence[str] | None = None) -> Iterator[None]:
    """Scope a selection (:func:`select`) to a ``with`` block; the previous one is restored after it."""
    hub = _hub(module)
    before = hub.selection
    hub.select(task, language)
    try:
        yield
    finally:
        hub.select(*before)


def selection(module: Module) -> tuple[Any, Any]:
    """The current (task, language) selection of a HyperLoRA module."""
    return _hub(module).selection


def _grow(module: Module, field_name: str, name: str) -> None:
    hub, spec = _hub(module), module.spec
    names = getattr(spec, field_name)
    new_spec = replace(spec, **{field_name: (*names, name)})  # validates the name
    attr = "task_embeddings" if field_name == "tasks" else "language_embeddings"
    table = getattr(hub, attr)
    if table is None:
        raise ConfigError("this hypernetwork was made without languages; languages cannot be added to it")
    with torch.no_grad():
        row = table.mean(dim=0, keepdim=True)  # (1, e): start from the average known embedding
    setattr(hub, attr, nn.Parameter(torch.cat([table.detach(), row], dim=0), requires_grad=table.requires_grad))
    getattr(hub, field_name).append(name)
    module.spec = new_spec
    module.card.config = spec_to_dict(new_spec)


def add_task(module: Module, name: str) -> None:
    """Add a task: one new embedding row (initialised to the mean of the known ones).

    The trunk and heads are shared, so training only the new row
    (``module.part('<input>').task_embeddings``, other rows' gradients ignored)
    adapts the generator to the task. The embedding table is a new Parameter:
    re-create optimizers that held the old one.

    Raises:
        ConfigError: not a HyperLoRA module, or an invalid or existing name.
    """
    _grow(module, "tasks", name)


def add_language(module: Module, name: str) -> None:
    """Add a language embedding row (see :func:`add_task`).

    Raises:
        ConfigError: not a HyperLoRA module, made without languages, or an invalid or existing name.
    """
    _grow(module, "languages", name)


def materialise(module: Module, task: str, language: str | None = None) -> Module:
    """A plain LoRA module with the weights the hypernetwork generates for ``task`` (and ``language``).

    It computes the same Δy as the live module under that selection, and, as
    any LoRA module, can be saved, merged into the host and aggregated. Its card
    records the hypernetwork and the selection in its lineage.

    Raises:
        ConfigError: not a HyperLoRA module, or an unknown task or language.
    """
    hub, spec = _hub(module), module.spec
    before = hub.selection
    hub.select(task, language)
    try:
        lora = LoRA(rank=spec.rank, alpha=spec.alpha, sites=spec.leaf_sites)
        sites: list[Site] = []
        parts: list[LoRAPart] = []
        with torch.no_grad():
            for name, part in module.items():
                if not isinstance(part, HyperLoRAPart):
                    continue
                a, b = part.weights()  # (1, r, D_in), (1, D_out, r)
                site = module.sites[name]
                out = LoRAPart(site.kind, site.in_features, site.out_features, spec.rank, lora.scaling).to(a.device,
                                                                                                             a.dtype)
                out.A.copy_(a[0])
                out.B.copy_(b[0])
                sites.append(site)
                parts.append(out)
    finally:
        hub.select(*before)
    host = dict(module.card.host or {})
    host["sites"] = {k: v for k, v in host.get("sites", {}).items() if not is_input_site(k)}
    card = Card(kind=lora.kind, config=spec_to_dict(lora), host=host, task=task, language=language,
                license=module.card.license, tags=list(module.card.tags),
                lineage=Lineage(parents=[Parent(name=module.card.name or HyperLoRA.kind, version=module.card.version)],
                                recipe={"method": "materialise", "task": task, "language": language}))
    return Module(lora, sites, parts, card=card)
