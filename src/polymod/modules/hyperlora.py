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

Parts: every site holds its own site embedding; the :class:`Hypernetwork`
(embeddings, trunk, heads) is held — and saved — by the module's first site
and shared with the others (:meth:`HyperLoRA.link_parts`).

Which task and language the weights are generated for is routing, as for every
other kind: ``with model.route(task="mnli", language="de")`` for the batch, or
one name per row — rows with different tasks in one batch, grouped once per
forward. Without a task name the first task and language are used (task *ids*,
``route(task=1)``, are read by task-level routers such as ``TaskRouter``, whose
candidates they index, not by the hypernetwork).
:func:`materialise` turns one task (and language) into a plain LoRA module
(saveable, mergeable); the live module itself is not mergeable.

Defaults: rank 8 and α = r as for LoRA; H_B starts at zero so the module is the
identity at initialisation (LoRA's B = 0), and H_A so that A starts at LoRA's
scale (entries of order 1/√D_in). The embedding width 64 and trunk width 128
are our choices for small hosts, not values from the papers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from polymod.card import Card, Lineage, Parent
from polymod.errors import ConfigError, FormatError, StateError
from polymod.modules.contract import Borrowed, Module, register, spec_to_dict
from polymod.modules.lora import LoRA, LoRAPart
from polymod.sites import Site, SiteSelector

if TYPE_CHECKING:  # routing sits above modules (library routers read module deltas): a type, never an import
    from polymod.routing.base import RoutingInputs

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
        sites: linear sites to generate LoRA weights for.
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
        SiteSelector.parse(self.sites)

    @property
    def scaling(self) -> float:
        """s = α/r."""
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    def check_site(self, site: Site) -> str | None:
        """Linear layers only (the generated weights are LoRA's A and B)."""
        if site.kind not in ("linear", "conv1d"):
            return "HyperLoRA generates LoRA weights for linear layers (Linear, Conv1D), not embeddings or blocks"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> nn.Module:
        """A site's part: its embedding e_site (the hypernetwork joins it in :meth:`link_parts`).

        Raises:
            FormatError: a site this kind cannot act at, read from a package (packages saved before
                0.2 kept the hypernetwork at an ``<input>`` site).
        """
        why = self.check_site(site)
        if why:  # Modular.add checks sites before building; a package on disk may not have
            raise FormatError(f"a hyper-lora part cannot act at {site.name!r}: {why}. Packages saved before polymod "
                              "0.2 kept the hypernetwork at '<input>' and do not load into this layout")
        part = HyperLoRAPart(site.kind, site.in_features, site.out_features, self.rank, self.scaling,
                             self.embedding_dim)
        reference = getattr(layer, "weight", None) if layer is not None else None
        if isinstance(reference, torch.Tensor):
            part.to(device=reference.device, dtype=reference.dtype)
        return part

    def link_parts(self, parts: dict[str, nn.Module]) -> None:
        """Create the shared hypernetwork: held by the first site's part, borrowed by the others."""
        leaves = [p for p in parts.values() if isinstance(p, HyperLoRAPart)]
        if len(leaves) != len(parts) or not leaves:
            raise ConfigError("a HyperLoRA module is made of HyperLoRA parts at linear sites only")
        like = leaves[0].site_embedding
        net = Hypernetwork(self.tasks, self.languages, self.embedding_dim, self.hidden, self.rank)
        net.to(device=like.device, dtype=like.dtype)
        net.add_heads(sorted({p.shape for p in leaves}))
        leaves[0].hypernetwork = net  # a submodule here: its parameters live, and are saved, once
        for part in leaves:
            part.shared = Borrowed(net)


class Hypernetwork(nn.Module):
    """The shared generator: task (and language) embeddings, trunk, and one pair of heads per site shape."""

    def __init__(self, tasks: Sequence[str], languages: Sequence[str], embedding_dim: int, hidden: int, rank: int):
        super().__init__()
        self.tasks, self.languages, self.rank = list(tasks), list(languages), rank
        self.task_embeddings = nn.Parameter(torch.randn(len(self.tasks), embedding_dim))  # (tasks, e)
        self.language_embeddings = nn.Parameter(torch.randn(len(self.languages), embedding_dim)) if languages else None
        width = embedding_dim * (3 if languages else 2)  # [task; language; site] or [task; site]
        self.trunk = nn.Linear(width, hidden)
        self.heads = nn.ModuleDict()

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

    def selection(self, task: object = None, language: object = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The distinct (task, language) index pairs to generate for, and each row's pair.

        Args:
            task: None (the first task), a task name or id for the batch, or one per row
                (a list of names or ids, or a (R,) tensor of ids).
            language: None (the first language), a language name, or one per row.

        Returns:
            combos (U, 2) and rows (B,) indexing combos, or None when one pair serves the batch.

        Raises:
            ConfigError: an unknown name or id, a language without languages, or per-row lists of
                different lengths.
        """
        tasks = self._indices(self.tasks, 0 if task is None else task, "task")
        if self.languages:
            langs = self._indices(self.languages, 0 if language is None else language, "language")
        elif language is not None:
            raise ConfigError("this hypernetwork has no languages; create it with HyperLoRA(languages=(...))")
        else:
            langs = [0]
        rows = max(len(tasks), len(langs))
        if {len(tasks), len(langs)} - {1, rows}:
            raise ConfigError(f"per-row routing must give one entry per row: {len(tasks)} tasks, "
                              f"{len(langs)} languages")
        pairs = list(zip(tasks * (rows // len(tasks)), langs * (rows // len(langs)), strict=True))
        combos = list(dict.fromkeys(pairs))  # distinct (task, language): weights are generated once each
        per_row = _per_row(task) or _per_row(language)
        index = torch.tensor([combos.index(p) for p in pairs], dtype=torch.long) if per_row else None  # (B,)
        return torch.tensor(combos, dtype=torch.long), index  # (U, 2)

    @staticmethod
    def _indices(names: list[str], chosen: object, what: str) -> list[int]:
        if isinstance(chosen, torch.Tensor):
            chosen = chosen.tolist()
        values = chosen if isinstance(chosen, list | tuple) else [chosen]
        out = []
        for value in values:
            if isinstance(value, str) and value in names:
                out.append(names.index(value))
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
                out.append(value)
            else:
                raise ConfigError(f"unknown {what} {value!r}; this hypernetwork knows {', '.join(names)} (ids 0-"
                                  f"{len(names) - 1}); add one with polymod.modules.hyperlora.add_{what}(module, name)")
        return out

    def generate(self, site_embedding: torch.Tensor, shape: tuple[int, int],
                 combos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (U, r, D_in) and B (U, D_out, r) for U (task, language) index pairs ``combos`` (U, 2) at one site."""
        combos = combos.to(site_embedding.device)
        z = [self.task_embeddings[combos[:, 0]]]  # (U, e)
        if self.language_embeddings is not None:
            z.append(self.language_embeddings[combos[:, 1]])  # (U, e)
        z.append(site_embedding.expand(combos.shape[0], -1))  # (U, e)
        h = F.relu(self.trunk(torch.cat(z, dim=-1)))  # (U, hidden)
        head_a, head_b = self.heads[f"{shape[0]}x{shape[1]}"]
        a = head_a(h).view(-1, self.rank, shape[0])  # (U, r, D_in)
        b = head_b(h).view(-1, shape[1], self.rank)  # (U, D_out, r)
        return a, b

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, languages={self.languages}"


def _per_row(value: object) -> bool:
    return isinstance(value, list | tuple) or (isinstance(value, torch.Tensor) and value.dim() == 1)


class HyperLoRAPart(nn.Module):
    """One site: its embedding e_site; A and B come from the shared hypernetwork, for the routed task."""

    def __init__(self, site_kind: str, d_in: int, d_out: int, rank: int, scaling: float, embedding_dim: int):
        super().__init__()
        self.site_kind, self.shape, self.rank, self.scaling = site_kind, (d_in, d_out), rank, scaling
        self.site_embedding = nn.Parameter(torch.randn(embedding_dim))  # (e,)
        self.shared: Borrowed | None = None  # the module's hypernetwork (set by HyperLoRA.link_parts)
        self.inputs: RoutingInputs | None = None  # the model's routing inputs once attached (read_routing)

    def read_routing(self, inputs: RoutingInputs) -> None:
        """Read the task and language to generate for from the model's per-call routing inputs."""
        self.inputs = inputs

    @property
    def generator(self) -> Hypernetwork:
        """The module's shared hypernetwork."""
        if self.shared is None:
            raise StateError("this HyperLoRA part has no hypernetwork; build it through a Module")
        return self.shared.module

    def weights(self, task: object = None, language: object = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor | None]:
        """Generated A (U, r, D_in), B (U, D_out, r) and the row index (B,) for a task/language choice."""
        combos, rows = self.generator.selection(task, language)
        a, b = self.generator.generate(self.site_embedding, self.shape, combos)
        return a, b, rows

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = s · B A x for the routed task (and language), one (A, B) per row under per-row routing."""
        inputs = self.inputs  # task *names* only: task ids index the candidates of task-level routers
        a, b, rows = self.weights(*((None, None) if inputs is None else (inputs.task_names, inputs.language)))
        if rows is None:
            return F.linear(F.linear(x, a[0]), b[0]) * self.scaling  # (B, T, D_out)
        if x.shape[0] != rows.numel():
            raise StateError(f"route(task=..., language=...) gives {rows.numel()} rows but the batch at this "
                             f"site has {x.shape[0]}; route one task per row of this batch")
        rows = rows.to(x.device)
        h = torch.einsum("b...d,brd->b...r", x, a[rows])  # (B, T, r)
        return torch.einsum("b...r,bor->b...o", h, b[rows]) * self.scaling  # (B, T, D_out)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, shape={self.shape}, scaling={self.scaling:g}"


def hypernetwork(module: Module) -> Hypernetwork:
    """The shared :class:`Hypernetwork` of a HyperLoRA module (its embeddings, trunk and heads).

    Raises:
        ConfigError: not a HyperLoRA module.
    """
    if module.kind != HyperLoRA.kind:
        raise ConfigError(f"expected a {HyperLoRA.kind} module, got a {module.kind} module")
    return next(iter(module.parts.values())).generator


def _grow(module: Module, field_name: str, name: str) -> None:
    net, spec = hypernetwork(module), module.spec
    names = getattr(spec, field_name)
    new_spec = replace(spec, **{field_name: (*names, name)})  # validates the name
    attr = "task_embeddings" if field_name == "tasks" else "language_embeddings"
    table = getattr(net, attr)
    if table is None:
        raise ConfigError("this hypernetwork was made without languages; languages cannot be added to it")
    with torch.no_grad():
        row = table.mean(dim=0, keepdim=True)  # (1, e): start from the average known embedding
    setattr(net, attr, nn.Parameter(torch.cat([table.detach(), row], dim=0), requires_grad=table.requires_grad))
    getattr(net, field_name).append(name)
    module.spec = new_spec
    module.card.config = spec_to_dict(new_spec)


def add_task(module: Module, name: str) -> None:
    """Add a task: one new embedding row (initialised to the mean of the known ones).

    The trunk and heads are shared, so training only the new row
    (``hypernetwork(module).task_embeddings``, other rows' gradients ignored)
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

    It computes the same Δy as the live module routed to that task, and, as
    any LoRA module, can be saved, merged into the host and aggregated. Its card
    records the hypernetwork and the task in its lineage.

    Raises:
        ConfigError: not a HyperLoRA module, or an unknown task or language.
    """
    spec = module.spec
    hypernetwork(module)  # checks the kind
    lora = LoRA(rank=spec.rank, alpha=spec.alpha, sites=spec.sites)
    sites: list[Site] = []
    parts: list[LoRAPart] = []
    with torch.no_grad():
        for name, part in module.items():
            a, b, _ = part.weights(task, language)  # (1, r, D_in), (1, D_out, r)
            site = module.sites[name]
            out = LoRAPart(site.kind, site.in_features, site.out_features, spec.rank, lora.scaling).to(a.device,
                                                                                                         a.dtype)
            out.A.copy_(a[0])
            out.B.copy_(b[0])
            sites.append(site)
            parts.append(out)
    card = Card(kind=lora.kind, config=spec_to_dict(lora), host=dict(module.card.host or {}), task=task,
                language=language, license=module.card.license, tags=list(module.card.tags),
                lineage=Lineage(parents=[Parent(name=module.card.name or HyperLoRA.kind, version=module.card.version)],
                                recipe={"method": "materialise", "task": task, "language": language}))
    return Module(lora, sites, parts, card=card)
