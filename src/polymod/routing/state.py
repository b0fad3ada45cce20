"""A model's routing state: bound routers, per-call routing inputs, per-forward caches.

One :class:`RoutingState` lives in every :class:`~polymod.Modular` (as
``model.routing``). It

* holds the routers of the active composition as sub-modules, so their
  parameters train, move with ``.to()`` and appear in ``state_dict()``;
* receives the per-call inputs of routing through ``model.route(...)``: one
  composition per row, task ids, module names per example, token spans;
* starts every host forward (a forward pre-hook on the host): it forgets the
  previous forward's global routings and auxiliary losses, puts the routers and
  the attached modules in the host's train/eval mode (so ``host.eval()`` alone
  turns every module's dropout off, and ``host.train()`` on), and keeps the
  attention mask for pooling;
* records the token ids the host embeds (a pre-hook on its input embeddings),
  for token-level routers that read them (hash routing);
* computes each *global* router once per forward and hands the same weights
  (or row groups) to every site.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from polymod.aggregation.representation import StackCache
from polymod.errors import ConfigError, StateError
from polymod.routing.base import Router
from polymod.sites import Site


class RoutingState(nn.Module):
    """Routing state of one model (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.routers = nn.ModuleDict()
        self.cache = StackCache()
        self.task: torch.Tensor | None = None
        self.names: list[str | None] | None = None
        self.spans: list[Any] | None = None
        self.token_ids: torch.Tensor | None = None
        self._ids_by_shape: dict[tuple[int, ...], torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None
        self.root: Any = None  # a composition acting on the whole host call (Parallel, output Mix)
        self.in_root_pass = False
        self._forward: dict[Any, Any] = {}
        self._handles: list[Any] = []
        self._rows: OrderedDict[Any, dict] = OrderedDict()
        self._attached: tuple[nn.Module, ...] = ()  # the library's modules (a tuple: not sub-modules of this one)

    # -- hooks --------------------------------------------------------------------------

    def install(self, host: nn.Module) -> None:
        """Register the host forward pre-hook and the input-embedding pre-hooks."""
        self._handles.append(host.register_forward_pre_hook(self._host_pre_hook, with_kwargs=True))
        encoder = host.get_encoder() if hasattr(host, "get_encoder") else None
        if isinstance(encoder, nn.Module) and encoder is not host:  # generate() runs the encoder on its own
            self._handles.append(encoder.register_forward_pre_hook(self._host_pre_hook, with_kwargs=True))
        embed = host.get_input_embeddings() if hasattr(host, "get_input_embeddings") else None
        weight = getattr(embed, "weight", None)
        for layer in host.modules():
            if isinstance(layer, nn.Embedding) and weight is not None and layer.weight is weight:
                self._handles.append(layer.register_forward_pre_hook(self._embed_pre_hook))

    def uninstall(self) -> None:
        """Remove every hook (``Modular.detach``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.routers = nn.ModuleDict()
        self.root = None

    def _host_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.root is not None and not self.in_root_pass:
            from polymod.compose import describe

            raise StateError(
                f"the active composition {describe(self.root)} acts on the whole host call (one output per branch "
                "or an ensemble of outputs); call model(**batch) instead of the host itself"
            )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            self.attention_mask = mask
        self.begin_forward(module.training)

    def _embed_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            self.token_ids = args[0]
            self._ids_by_shape[tuple(args[0].shape)] = args[0]

    def ids_for(self, lead: tuple[int, ...]) -> torch.Tensor | None:
        """The most recently embedded token ids of shape ``lead`` (B, T), e.g. the encoder's at cross-attention."""
        return self._ids_by_shape.get(tuple(lead))

    def begin_forward(self, training: bool) -> None:
        """Forget the last forward's global routings and auxiliary losses; follow the host's mode.

        The host's mode decides: routers and attached modules are switched (``train(mode)``,
        recursively) only when their mode differs, so a steady state costs one flag check each.
        """
        self._forward = {}
        for router in self.routers.values():
            router.begin_forward()
            if router.training != training:
                router.train(training)
        for module in self._attached:
            if module.training != training:
                module.train(training)

    # -- routers ------------------------------------------------------------------------

    def start_compile(self, root: Any) -> None:
        """Forget the routers of the previous composition (called when a composition is compiled)."""
        self.routers = nn.ModuleDict()
        self.root = root
        self._forward = {}

    def register(self, router: Router, candidates: Sequence[str], sites: Sequence[Site],
                 like: torch.Tensor | None) -> None:
        """Bind ``router`` to a Mix's candidates and sites and hold it as a sub-module."""
        router.bind(candidates, sites, like)
        if router not in list(self.routers.values()):
            self.routers[str(len(self.routers))] = router

    def routing(self, router: Router, site: str, x: torch.Tensor | None, y: torch.Tensor,
                outputs: torch.Tensor | None = None) -> Any:
        """The router's weights at ``site``; computed once per forward for global routers."""
        if router.local:
            return router.weights(self, site, x, y, outputs)
        key = (id(router), router.cache_key(self, y))
        hit = self._forward.get(key)
        if hit is None:
            hit = self._forward[key] = router.weights(self, None, None, y)
        return hit

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of every bound router's auxiliary losses in the last forward (None when there are none)."""
        losses = [loss for r in self.routers.values() if (loss := r.aux_loss()) is not None]
        return sum(losses) if losses else None

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each bound router's statistics, keyed by ``"<index>: <router>"``."""
        return {f"{k}: {r}": r.stats.summary() for k, r in self.routers.items()}

    # -- per-call routing ---------------------------------------------------------------

    @contextmanager
    def route(self, model: Any, rows: Sequence[Any] | None, task: Any, names: Sequence[str | None] | None,
              spans: Sequence[Any] | None) -> Iterator[None]:
        """See :meth:`polymod.Modular.route`."""
        device = _device(model.host)
        saved = (self.task, self.names, self.spans, model._plan, model._active, model.names(), model.merged)
        if task is not None:
            self.task = _task_tensor(task, device)
        if names is not None:
            self.names = list(names)
        if spans is not None:
            self.spans = list(spans)
        if rows is not None:
            model._plan = self.row_plan(model, rows, device)
        try:
            yield
        finally:
            self.task, self.names, self.spans = saved[:3]
            if rows is not None:
                if (model._active, model.names(), model.merged) == saved[4:]:
                    model._plan = saved[3]
                else:
                    model._recompile()

    def row_plan(self, model: Any, rows: Sequence[Any], device: torch.device | None) -> dict:
        """The per-site ops of a per-example assignment (the last few are cached)."""
        from polymod import compose
        from polymod.plan import Env, compile_rows

        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
            raise ConfigError(f"route() takes one composition per row (a list), got {rows!r}")
        if model.merged:
            raise StateError(
                f"modules {model.merged} are merged into the host weights and act on every row; "
                "unmerge them before routing per example"
            )
        key = (tuple(compose.describe(r) for r in rows), tuple((n, id(m)) for n, m in model.library.items()), device)
        plan = self._rows.get(key)
        if plan is None:
            for r in rows:
                for leaf in compose.leaves(r) if r is not None else []:
                    if leaf not in model.library:
                        raise compose.unknown(leaf, r, model.library)
            plan = compile_rows(rows, Env(model.library, set(), model._layers, self), device)
            self._rows[key] = plan
            if len(self._rows) > 8:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(key)
        return plan

    def sync_library(self, library: Any) -> None:
        """Drop cached stacks, parts tables and row plans when the attached modules changed."""
        token = tuple((n, id(m)) for n, m in library.items())
        self._attached = tuple(library.values())
        if token != getattr(self, "_library", None):
            self._library = token
            self.cache.clear()
            self._rows.clear()
            self._parts: dict[str, dict[str, nn.Module]] = {}

    def parts_of(self, name: str, module: Any) -> dict[str, nn.Module]:
        """``{site: part}`` of an attached module, built once per library state."""
        table = self.__dict__.setdefault("_parts", {})
        if name not in table:
            table[name] = dict(module.items())
        return table[name]


def _device(host: nn.Module) -> torch.device | None:
    p = next(host.parameters(), None)
    return p.device if p is not None else None


def _task_tensor(task: Any, device: torch.device | None) -> torch.Tensor:
    """Task ids as a (R,) long tensor: one id for the whole batch (R = 1) or one per row."""
    t = torch.as_tensor(task, dtype=torch.long, device=device)
    if t.dim() > 1 or t.numel() == 0 or t.is_floating_point():
        raise ConfigError(f"route(task=...) takes one task id or one per row, got {task!r}")
    return t.reshape(-1)
