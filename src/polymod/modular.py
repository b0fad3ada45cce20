"""Modular: a frozen host, a library of named modules and the active composition.

``Modular(host)`` never edits the host's classes or copies its ``forward``. It
registers one forward hook per touched site (``nn.Module.register_forward_hook``,
PyTorch's official extension point); the hook hands the site's input ``x`` and
output ``y = f_θ(x)`` to the plan compiled from the active composition, which
returns ``f'(x) = f_θ(x) + f_φ(x)``. Users keep calling the host's own
``forward`` and ``generate``.

Input-composition modules (prompt, prefix) act at *input sites* instead
(``<input>``, ``encoder.<input>``; see :mod:`polymod.inputs`): there the engine
registers a forward pre-hook with keyword arguments
(``register_forward_pre_hook(..., with_kwargs=True)``) and the plan's op maps
the call's keyword arguments to new ones, ``op(module, call) -> call'``.

Every attach returns an :class:`AttachReport`; :meth:`Modular.detach` removes
every hook, restores merged weights from their saved originals and the host's
``requires_grad`` flags, leaving the same layer objects with bit-identical
tensors.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from polymod import sites as sites_mod
from polymod import view
from polymod.aggregation.base import Env, SiteOp
from polymod.aggregation.cache import StackCache
from polymod.compose import Composition, describe, leaves, unknown
from polymod.errors import (
    ConfigError,
    InactiveModuleWarning,
    IncompatibleHostError,
    StateError,
    UnknownModuleError,
)
from polymod.format import fingerprint, require_fit
from polymod.inputs import bind_call
from polymod.merged import MergedWeights
from polymod.modules.contract import (
    CopiesLayers,
    HostDependentSites,
    Module,
    ModuleSpec,
    ReadsHostLayer,
    ReadsRoutingInputs,
)
from polymod.plan import compile_plan
from polymod.roles import FUSED_QKV_NOTE, family_of
from polymod.routing.state import RoutingState
from polymod.rows import RowPlans, run_root
from polymod.sites import input_target, is_input_site
from polymod.validation import check_tree
from polymod.view import AttachReport

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")
# host -> the Modular whose hooks are installed on it (until its detach()); a second wrapper would stack hooks
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


class Modular(nn.Module):
    """A host network with attachable, composable modules.

    Args:
        host: any ``torch.nn.Module``; Hugging Face ``transformers`` models first-class.
        freeze: set ``requires_grad=False`` on every host parameter (restored by ``detach``).

    Example:
        >>> model = Modular(host)
        >>> model.add("sentiment", LoRA(rank=8, sites="attn.q|attn.v"))
        >>> model.use("sentiment")
        >>> logits = host(**batch).logits
    """

    def __init__(self, host: nn.Module, freeze: bool = True):
        super().__init__()
        if not isinstance(host, nn.Module):
            raise ConfigError(f"Modular wraps a torch.nn.Module, got {type(host).__name__}")
        if isinstance(host, Modular):
            raise ConfigError("this is already a Modular model; use it directly (its host is model.host)")
        owner = _WRAPPERS.get(host)
        if owner is not None and owner() is not None:
            existing = owner()
            raise StateError(
                f"this host is already wrapped by a Modular (attached: {', '.join(existing.names()) or 'none'}); "
                "a second wrapper would stack its hooks on the first (every module would act twice). Keep using "
                "the first model, or call its detach() before wrapping the host again")
        self.host = host
        self.library = nn.ModuleDict()
        self._grad_flags = {n: p.requires_grad for n, p in host.named_parameters()}
        if freeze:
            host.requires_grad_(False)
        self._hooks: dict[str, Any] = {}
        self._layers = sites_mod.named_layers(host)
        self._active: Composition | None = None
        self._merged = MergedWeights()  # merged modules and the host originals that undo them
        self.routing = RoutingState()  # routers of the active composition and the inputs they read
        # Per-call engine state, owned here and nowhere else: the plan the site hooks run (swapped by
        # route()), compiled row plans, and stacked module weights reused across forwards.
        self._plan: dict[str, SiteOp] = {}
        self._row_plans = RowPlans()
        self._stacks = StackCache()
        self._library_seen = -1  # the library version the row plans and stacks were built for
        self._library_version = 0  # bumped by add/remove: ids of freed modules can be reused
        self._dtype: torch.dtype | None = None
        self._warned_inactive = False
        self.routing.install(host)
        self._inactive_check = host.register_forward_pre_hook(self._check_inactive)
        _WRAPPERS[host] = weakref.ref(self)

    # -- library ---------------------------------------------------------------------------

    def add(self, name: str, spec: ModuleSpec | Module) -> AttachReport:
        """Attach a new module built from ``spec`` (or an existing :class:`Module`) as ``name``.

        The module does not act until a composition naming it is active (:meth:`use`). Unlike PEFT's
        ``get_peft_model``, adding never activates: the active composition changes only through
        :meth:`use` (selection state is explicit). A training forward with trainable modules attached
        but none active warns (:class:`~polymod.errors.InactiveModuleWarning`), and polymod's
        ``Trainer`` refuses to start with the module to activate named.

        Args:
            name: a library name (letters, digits, ``_`` and ``-``).
            spec: a module spec such as ``LoRA(rank=8)``, or a built/loaded module.

        Returns:
            The attach report.

        Raises:
            ConfigError: bad name, or a name already in use.
            SiteNotFoundError: the spec's sites match nothing.
            IncompatibleHostError: a site cannot take this kind, or a loaded module's
                shapes do not fit the host.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"module name {name!r} is invalid; use letters, digits, '_' and '-' (at most 128)")
        if name in self.library:
            raise ConfigError(f"a module named {name!r} is already attached; remove it first or pick another name")
        notes: list[str] = []
        if isinstance(spec, Module):
            module = spec
            require_fit(module.card, self.host, f"module {name!r}", module.sites)
            weight = getattr(self._layer(next(iter(module.sites))), "weight", None) if module.sites else None
            if not isinstance(weight, torch.Tensor):  # an input site: follow the host's parameters
                weight = next(self.host.parameters(), None)
            if isinstance(weight, torch.Tensor):
                module.to(device=weight.device, dtype=module_dtype(weight.dtype))
        else:
            if not isinstance(spec, ModuleSpec):
                raise ConfigError(f"add() takes a module spec (e.g. pm.LoRA()) or a Module, got {type(spec).__name__}")
            # kinds whose default sites depend on the host (an adapter placement per family)
            selection = spec.sites_for(self.host) if isinstance(spec, HostDependentSites) else spec.sites
            chosen = sites_mod.select(self.host, selection)
            refusals = [(s.name, spec.check_site(s)) for s in chosen]
            refusals = [(n, why) for n, why in refusals if why]
            if refusals:
                listed = "; ".join(f"{n}: {why}" for n, why in refusals[:5])
                raise IncompatibleHostError(f"{spec.kind} cannot act at {len(refusals)} selected sites ({listed})")
            parts = [spec.build_part(s, self._layer(s.name)) for s in chosen]
            module = Module(spec, chosen, parts)
            module.to(dtype=module_dtype(next((p.dtype for p in module.parameters()), torch.float32)))
            module.card.host = fingerprint(self.host, module.sites, weights=not isinstance(spec, CopiesLayers))
        if family_of(self.host) == "gpt2" and any(n.endswith("attn.c_attn") for n in module.sites):
            notes.append(FUSED_QKV_NOTE)
        self.library[name] = module
        self._library_version += 1
        for site, part in module.items():
            if isinstance(part, ReadsHostLayer):  # parts whose Δy reads the host layer (IA³ scaling an input)
                part.attach_layer(self._layer(site))
            if isinstance(part, ReadsRoutingInputs):  # parts whose Δy follows route(task=..., language=...)
                part.read_routing(self.routing.inputs)
        for site in module.sites:
            self._hook(site)
        self._recompile()
        return AttachReport(
            name=name,
            kind=module.kind,
            sites=list(module.sites),
            trainable_parameters=module.num_parameters(),
            host_parameters=sum(p.numel() for p in self.host.parameters()),
            notes=notes,
        )

    def remove(self, name: str) -> Module:
        """Detach module ``name`` (unmerging it first if merged) and return it.

        Raises:
            UnknownModuleError: no such module.
            StateError: the active composition still names it.
        """
        module = self[name]
        if self._active is not None and name in leaves(self._active):
            raise StateError(f"module {name!r} is used by the active composition {describe(self._active)}; "
                             "call model.use(...) without it first")
        if name in self._merged:
            self.unmerge(name)
        del self.library[name]
        self._library_version += 1
        still_used = {s for m in self.library.values() for s in m.sites}
        for site in module.sites:
            if site not in still_used:
                self._hooks.pop(site).remove()
        self._recompile()
        return module

    def __getitem__(self, name: str) -> Module:
        if name not in self.library:
            raise UnknownModuleError(f"no module named {name!r}; attached: {', '.join(self.library) or 'none'}")
        return self.library[name]

    def __contains__(self, name: object) -> bool:
        return name in self.library

    def names(self) -> list[str]:
        """Names of the attached modules, in attach order."""
        return list(self.library)

    # -- composition -----------------------------------------------------------------------

    def use(self, expr: Composition | None) -> None:
        """Set the active composition: a module name, a composition, or None for the bare host.

        Raises:
            UnknownModuleError: the composition names a module that is not attached.
            CompositionError: the composition is malformed.
        """
        if expr is not None:
            check_tree(expr, self.library)
        self._active = expr
        self._warned_inactive = False
        self._recompile()

    @property
    def active(self) -> Composition | None:
        """The active composition (None when only the host acts)."""
        return self._active

    def _recompile(self) -> None:
        """Compile the active composition; drop cached stacks and row plans when the library changed."""
        self.routing.attached = tuple(self.library.values())  # they follow the host's train/eval mode
        self._dtype = next((p.dtype for m in self.library.values() for p in m.parameters()
                            if p.is_floating_point()), None)  # the modules' compute dtype (see at_module_dtype)
        if self._library_version != self._library_seen:
            self._library_seen = self._library_version
            self._stacks.clear()
            self._row_plans.clear()
        self._plan = compile_plan(self._active, self.library, set(self._merged.names()), self._layers, self.routing,
                                  self._stacks)

    @contextmanager
    def route(self, rows: Sequence[Any] | None = None, *, task: Any = None,
              names: Sequence[str | None] | None = None, spans: Sequence[Any] | None = None,
              language: str | Sequence[str] | None = None) -> Iterator[None]:
        """Per-call routing, as a context manager: ``with model.route([...]): host(**batch)``.

        Args:
            rows: one composition per row of the batch (a module name, a Stack of
                names, or None for the host alone); replaces the active composition
                inside the block. Rows are grouped once per call and every site
                reuses the grouping (batched gather + bmm for LoRA).
            task: task ids for task-level routers (``TaskRouter``, ``Polytropon``), or task
                names for kinds that know their tasks by name (``HyperLoRA``): one for the
                batch or one per row.
            names: module names per row for ``ExampleRouter``.
            spans: per row, ``(start, end, name)`` token spans for ``SpanRouter``.
            language: a language name, or one per row (``HyperLoRA`` with languages).

        Raises:
            UnknownModuleError: a row names a module that is not attached.
            CompositionError: a row is not a name, a Stack of names or None.
            StateError: modules are merged into the host (they would act on every row).
        """
        device = _device(self.host)
        saved = (self._plan, self._active, self.names(), self.merged)
        if rows is not None:
            self._plan = self._rows_plan(rows, device)
        try:
            with self.routing.scoped(task, names, spans, device, language):
                yield
        finally:
            if rows is not None:
                if (self._active, self.names(), self.merged) == saved[1:]:
                    self._plan = saved[0]
                else:  # the block changed the model: compile what it is now
                    self._recompile()

    def _rows_plan(self, rows: Sequence[Any], device: torch.device | None) -> dict[str, SiteOp]:
        if self.merged:
            raise StateError(
                f"modules {self.merged} are merged into the host weights and act on every row; "
                "unmerge them before routing per example"
            )
        for r in rows if isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) else ():
            for leaf in leaves(r) if r is not None else []:
                if leaf not in self.library:
                    raise unknown(leaf, r, self.library)
        env = Env(self.library, set(), self._layers, self.routing, self._stacks, compile_child=dict)
        return self._row_plans.get(rows, env, device)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the routers' auxiliary losses (load balancing, z-loss) of the last forward, or None.

        Add it to the task loss before ``backward()``; the coefficients are the routers' own.
        """
        return self.routing.aux_loss()

    def routing_stats(self) -> dict[str, dict[str, Any]]:
        """Each active router's load per module, entropy and dropped tokens (accumulated until reset)."""
        return self.routing.stats()

    def _check_inactive(self, host: nn.Module, args: tuple) -> None:
        """Warn once when a training forward runs trainable modules that nothing activates (PEFT's habit)."""
        if self._plan or self._warned_inactive or not host.training or not torch.is_grad_enabled():
            return
        idle = [n for n, m in self.library.items() if n not in self._merged
                and any(p.requires_grad for p in m.parameters())]
        if idle:
            self._warned_inactive = True
            warnings.warn(
                f"module(s) {idle} are attached and trainable but not active: this forward runs the host alone, "
                f"so they get no gradient (a backward then fails with 'does not require grad'). Modules act only "
                f"once a composition names them: call model.use({idle[0]!r}) before training",
                InactiveModuleWarning, stacklevel=_caller_level())

    def _layer(self, site: str) -> nn.Module:
        """The host module at ``site``: a layer, or for an input site the module whose call it is."""
        return input_target(self.host, site) if is_input_site(site) else self._layers[site]

    def _hook(self, site: str) -> None:
        if site in self._hooks:
            return
        model = self  # the hooks read the model's current plan at call time
        if is_input_site(site):

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                op = model._plan.get(site)
                if op is None:
                    return None
                return (), call_at_module_dtype(op, module, bind_call(module, args, kwargs), model._dtype)

            self._hooks[site] = self._layer(site).register_forward_pre_hook(pre_hook, with_kwargs=True)
            return

        def hook(layer: nn.Module, args: tuple, output: Any) -> Any:
            op = model._plan.get(site)
            if op is None:
                return None
            x = args[0] if args else None
            if isinstance(output, torch.Tensor):
                return at_module_dtype(op, x, output, model._dtype)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (at_module_dtype(op, x, output[0], model._dtype), *output[1:])
            raise StateError(f"site {site!r} returned {type(output).__name__}; expected a tensor or a tuple")

        self._hooks[site] = self._layers[site].register_forward_hook(hook)

    # -- merging ---------------------------------------------------------------------------

    def merge_into_host(self, name: str) -> None:
        """Add module ``name``'s weight delta into the host weights (inference speed of the bare host).

        The original weights are kept so that :meth:`unmerge` and :meth:`detach`
        restore them bit for bit (:class:`~polymod.merged.MergedWeights`).

        Raises:
            StateError: already merged, not a parameter-composition module, or a site's
                weight is tied to another layer (merging would change both).
        """
        self._merged.merge(name, self[name], self._layers, self.host)
        self._recompile()

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge_into_host`, restoring the saved original weights exactly.

        Raises:
            StateError: the module is not merged.
        """
        self[name]
        self._merged.unmerge(name, self._layers)
        self._recompile()

    def merge_and_unload(self, names: Sequence[str] | None = None) -> nn.Module:
        """Merge modules into the host weights for good and unwrap the host (PEFT's ``merge_and_unload``).

        Unlike :meth:`detach`, which restores the original host bit for bit, this keeps the merged
        weights: the returned host computes what the model computed with those modules active, with
        no hooks and no module objects left. Other attached modules are dropped.

        Args:
            names: modules to merge (each must have a weight delta). Default: the active composition
                when it is a single module name.

        Returns:
            The host, with merged weights and its original ``requires_grad`` flags.

        Raises:
            StateError: no names given and the active composition is not one module name, or a module
                cannot be merged (see :meth:`merge_into_host`).
        """
        if names is None:
            if not isinstance(self._active, str):
                raise StateError(f"merge_and_unload() merges the active module by default, but the active composition "
                                 f"is {describe(self._active)}; name the modules: merge_and_unload(['a', 'b'])")
            names = [self._active]
        for name in names:
            if name not in self._merged:
                self.merge_into_host(name)
        for name in names:
            self._merged.forget(name)  # detach() below keeps the merged weights
        return self.detach()

    @contextmanager
    def disable(self) -> Iterator[None]:
        """Run the bare host inside the block (PEFT's ``disable_adapter``); the active composition returns after.

        Example:
            >>> with model.disable():
            ...     reference = host(**batch).logits        # no module acts

        Raises:
            StateError: modules are merged into the host weights (unmerge them first).
        """
        if self._merged.names():
            raise StateError(f"modules {self.merged} are merged into the host weights, so disabling cannot remove "
                             "them; call model.unmerge(name) first")
        active, warned = self._active, self._warned_inactive
        self._active, self._warned_inactive = None, True
        self._recompile()
        try:
            yield
        finally:
            self._active, self._warned_inactive = active, warned
            self._recompile()

    @property
    def merged(self) -> list[str]:
        """Names of the modules currently merged into the host weights."""
        return self._merged.names()

    # -- lifecycle -------------------------------------------------------------------------

    def detach(self) -> nn.Module:
        """Remove every module and restore the host exactly; returns the host.

        Afterwards the host has the same layer objects, bit-identical tensors and
        its original ``requires_grad`` flags.
        """
        for name in self._merged.names():
            self.unmerge(name)
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.routing.uninstall()
        self._inactive_check.remove()
        if _WRAPPERS.get(self.host) is not None and _WRAPPERS[self.host]() is self:
            del _WRAPPERS[self.host]
        self._active = None
        self._plan = {}
        for name in list(self.library):
            del self.library[name]
        for n, p in self.host.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        return self.host

    def trainable_parameters(self, names: list[str] | None = None) -> Iterator[nn.Parameter]:
        """Parameters requiring grad of the named modules (default: every attached module and active router)."""
        for name in names if names is not None else list(self.library):
            yield from (p for p in self[name].parameters() if p.requires_grad)
        if names is None:
            yield from (p for p in self.routing.parameters() if p.requires_grad)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the host's own forward (hooks apply the active composition).

        With a ``Parallel`` composition active this returns one output per branch;
        with ``Mix(..., aggregate="output")`` the ensemble of the candidates' logits.
        """
        if self.routing.whole_call is not None and self._active is not None:
            return run_root(self, self._active, args, kwargs)
        return self.host(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Call the host's own ``generate``."""
        return self.host.generate(*args, **kwargs)

    def __repr__(self) -> str:
        header = f"Modular({type(self.host).__name__}, family={family_of(self.host)})"
        return view.summary(header, self.library, self._merged, self._active_names(), describe(self._active))

    def describe(self) -> str:
        """Where every module sits: ``repr(model)``, then each touched site with the modules acting there.

        Each module is ``merged`` (its ΔW is in the host weights), ``active`` (named by the active
        composition) or ``inactive`` (attached, acting nowhere until a composition names it).
        """
        return repr(self) + "\n" + view.per_site(self.library, self._merged, self._active_names(), list(self._layers))

    def _active_names(self) -> set[str]:
        return set(leaves(self._active)) if self._active is not None else set()

def module_dtype(host_dtype: torch.dtype) -> torch.dtype:
    """The dtype of module parameters on a host of ``host_dtype``: float32 for half-precision hosts, else the host's.

    As PEFT's ``autocast_adapter_dtype``: small modules keep float32 parameters (their updates and
    their contribution keep float32 precision) and :func:`at_module_dtype` casts at the site.
    """
    return torch.float32 if host_dtype in (torch.float16, torch.bfloat16) else host_dtype


def at_module_dtype(op: SiteOp, x: Any, y: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Run a site op in the modules' dtype and return the host's: a host cast after attaching (``host.half()``,
    ``host.to(torch.bfloat16)``) keeps working, its modules computing y' = y + Δy in float32."""
    if dtype is None or y.dtype == dtype or not y.is_floating_point():
        return op(x, y)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.to(dtype)
    return op(x, y.to(dtype)).to(y.dtype)


def call_at_module_dtype(op: SiteOp, module: nn.Module, call: dict[str, Any], dtype: torch.dtype | None) -> Any:
    """:func:`at_module_dtype` at an input site: the call's floating tensors enter the op in the modules' dtype
    and leave it in the dtype they came in."""
    given = {k: v.dtype for k, v in call.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if dtype is None or all(d == dtype for d in given.values()):
        return op(module, call)
    out = op(module, {k: v.to(dtype) if k in given else v for k, v in call.items()})
    return {k: v.to(given[k]) if k in given and isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in out.items()}


def wrapper_of(host: nn.Module) -> Modular | None:
    """The :class:`Modular` whose hooks are installed on ``host`` (None when no wrapper holds it)."""
    owner = _WRAPPERS.get(host)
    return owner() if owner is not None else None


def build_module(host: nn.Module, spec: ModuleSpec) -> Module:
    """Build ``spec``'s module on ``host`` exactly as :meth:`Modular.add` would, leaving the host untouched.

    For readers of foreign formats, which need the module's sites and parts before loading tensors into
    them. Works on a host that a :class:`Modular` wraps (the scratch wrapper is detached before returning).
    """
    owner = _WRAPPERS.pop(host, None)
    try:
        scratch = Modular(host, freeze=False)
        try:
            scratch.add("x", spec)
            return scratch["x"]
        finally:
            scratch.detach()
    finally:
        if owner is not None:
            _WRAPPERS[host] = owner


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside polymod, torch and transformers (the user's forward call)."""
    skip = tuple(f"{os.sep}{name}{os.sep}" for name in ("polymod", "torch", "transformers"))
    frame, level = sys._getframe(1), 1
    while frame is not None and any(s in frame.f_code.co_filename for s in skip):
        frame, level = frame.f_back, level + 1
    return level


def _device(host: nn.Module) -> torch.device | None:
    p = next(host.parameters(), None)
    return p.device if p is not None else None
