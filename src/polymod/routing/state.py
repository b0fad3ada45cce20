"""A model's routing state: bound routers, the inputs they read, per-forward memos.

One :class:`RoutingState` lives in every :class:`~polymod.Modular` (as
``model.routing``). It

* holds the routers of the active composition as sub-modules, so their
  parameters train, move with ``.to()`` and appear in ``state_dict()``;
* holds the :class:`~polymod.routing.base.RoutingInputs` that routers read:
  the per-call inputs given to ``model.route(...)`` (scoped by :meth:`scoped`)
  and what the host is called with;
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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from polymod.errors import ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs
from polymod.sites import Site


class RoutingState(nn.Module):
    """Routing state of one model (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.routers = nn.ModuleDict()
        self.inputs = RoutingInputs()
        self.whole_call: str | None = None  # the active composition, when it acts on the whole host call
        self._in_whole_call = False
        self._forward: dict[Any, Any] = {}
        self._handles: list[Any] = []
        self.attached: tuple[nn.Module, ...] = ()  # the library's modules (a tuple: not sub-modules of this one)

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
        self.whole_call = None

    def _host_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.whole_call is not None and not self._in_whole_call:
            raise StateError(
                f"the active composition {self.whole_call} acts on the whole host call (one output per branch "
                "or an ensemble of outputs); call model(**batch) instead of the host itself"
            )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            self.inputs.attention_mask = mask
        self.begin_forward(module.training)

    def _embed_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            self.inputs.token_ids = args[0]
            self.inputs.ids_by_shape[tuple(args[0].shape)] = args[0]

    @contextmanager
    def whole_call_pass(self) -> Iterator[None]:
        """Let the host run inside a whole-call composition's own pass (Parallel, output ensembles)."""
        self._in_whole_call = True
        try:
            yield
        finally:
            self._in_whole_call = False

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
        for module in self.attached:
            if module.training != training:
                module.train(training)

    # -- routers ------------------------------------------------------------------------

    def start_compile(self, whole_call: str | None) -> None:
        """Forget the routers of the previous composition (called when a composition is compiled).

        Args:
            whole_call: a description of the new composition when it acts on the whole host
                call (the host may then only run inside :meth:`whole_call_pass`), else None.
        """
        self.routers = nn.ModuleDict()
        self.whole_call = whole_call
        self._forward = {}

    def register(self, router: Router, candidates: Sequence[str], sites: Sequence[Site],
                 like: torch.Tensor | None) -> None:
        """Bind ``router`` to a Mix's candidates and sites and hold it as a sub-module."""
        router.bind(candidates, sites, like)
        if router not in list(self.routers.values()):
            self.routers[str(len(self.routers))] = router

    def routing(self, router: Router, site: str | None, x: torch.Tensor | None, y: torch.Tensor,
                outputs: torch.Tensor | None = None) -> Any:
        """The router's weights at ``site``; computed once per forward for global routers."""
        if router.local:
            return router.weights(self.inputs, site, x, y, outputs)
        key = (id(router), router.cache_key(self.inputs, y))
        hit = self._forward.get(key)
        if hit is None:
            hit = self._forward[key] = router.weights(self.inputs, None, None, y)
        return hit

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of every bound router's auxiliary losses in the last forward (None when there are none)."""
        losses = [loss for r in self.routers.values() if (loss := r.aux_loss()) is not None]
        return sum(losses) if losses else None

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each bound router's statistics, keyed by ``"<index>: <router>"``."""
        return {f"{k}: {r}": r.stats.summary() for k, r in self.routers.items()}

    # -- per-call inputs ----------------------------------------------------------------

    @contextmanager
    def scoped(self, task: Any, names: Sequence[str | None] | None, spans: Sequence[Any] | None,
               device: torch.device | None, language: str | Sequence[str] | None = None) -> Iterator[None]:
        """Set the per-call routing inputs for a ``with`` block; the previous ones are restored after it.

        ``task`` is task ids (for task routers) or task names (for kinds that know their tasks by
        name), one for the batch or one per row.

        Raises:
            ConfigError: task ids that are not one integer or one per row; a language that is not
                a name or a list of names.
        """
        inputs = self.inputs
        saved = (inputs.task, inputs.task_names, inputs.language, inputs.names, inputs.spans)
        if task is not None:
            if _names(task):
                inputs.task, inputs.task_names = None, task if isinstance(task, str) else list(task)
            else:
                inputs.task, inputs.task_names = task_tensor(task, device), None
        if language is not None:
            if not _names(language):
                raise ConfigError(f"route(language=...) takes a language name or one per row, got {language!r}")
            inputs.language = language if isinstance(language, str) else list(language)
        if names is not None:
            inputs.names = list(names)
        if spans is not None:
            inputs.spans = list(spans)
        try:
            yield
        finally:
            inputs.task, inputs.task_names, inputs.language, inputs.names, inputs.spans = saved


def _names(value: Any) -> bool:
    """A name, or a non-empty flat list of names."""
    if isinstance(value, str):
        return True
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, str) for v in value)


def task_tensor(task: Any, device: torch.device | None) -> torch.Tensor:
    """Task ids as a (R,) long tensor: one id for the whole batch (R = 1) or one per row.

    Raises:
        ConfigError: not one integer id or a flat list of them.
    """
    t = torch.as_tensor(task, dtype=torch.long, device=device)
    if t.dim() > 1 or t.numel() == 0 or t.is_floating_point():
        raise ConfigError(f"route(task=...) takes one task id or one per row, got {task!r}")
    return t.reshape(-1)
