"""What a run trains, and the guarantee that the host is not touched.

:func:`resolve_trainables` turns the user's ``train=`` into named modules.
:class:`HostGuard` is the context of a run: inside it only those modules'
parameters require gradients, and on exit every flag is restored and the host's
tensors are compared, by sha256, with what they were on entry.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polymod.compose import leaves
from polymod.errors import ConfigError, InactiveModuleWarning, StateError


def _routers(model: nn.Module) -> Mapping[str, nn.Module]:
    routers = getattr(model, "routers", None)
    if callable(routers) and not isinstance(routers, nn.Module):
        routers = routers()
    return routers if isinstance(routers, Mapping | nn.ModuleDict) else {}


def require_active(model: nn.Module, trainables: Mapping[str, nn.Module], routes: Sequence[Any]) -> None:
    """Refuse to train when no trained library module is run by any composition (nothing would get a gradient).

    Some idle modules next to active ones only warn (:class:`~polymod.errors.InactiveModuleWarning`): they are
    left unchanged, which multi-task and continual runs may intend.

    Args:
        model: the modular model (anything without a ``library`` is not checked).
        trainables: what the run trains, by name.
        routes: each task's route (None: the active composition; a callable: not checkable, so no check).

    Raises:
        ConfigError: every trained module is attached but neither in the active composition nor in any
            task's route, and nothing else (a router) is trained.
    """
    library = getattr(model, "library", None)
    if library is None or any(callable(r) and not isinstance(r, str) for r in routes):
        return
    active = getattr(model, "active", None)
    used: set[str] = set()
    for composition in [active, *routes]:
        if composition is not None:
            used |= set(leaves(composition))
    idle = [name for name in trainables if name in library and name not in used]
    if not idle:
        return
    advice = (f"(active composition: {active!r}). Activate before training: model.use({idle[0]!r}) "
              "(or a Stack/Mix naming it), or give each task a route= that names it")
    if len(idle) == len(trainables):
        raise ConfigError(f"module(s) {idle} are attached but not active, so training would give them no "
                          f"gradient {advice}")
    warnings.warn(f"module(s) {idle} are trained but not active, so they will not change {advice}",
                  InactiveModuleWarning, stacklevel=3)


def _holder(param: nn.Parameter) -> nn.Module:
    """A module holding one existing parameter (the same object, not a copy)."""
    holder = nn.Module()
    holder.register_parameter("value", param)
    return holder


def resolve_trainables(model: nn.Module, train: Any) -> dict[str, nn.Module]:
    """Named modules to train from ``train``.

    Args:
        model: the modular model.
        train: a name, module or parameter, a sequence of them, or a mapping name → module/parameter.
            A name is an attached module (``model[name]``) or a router the model exposes in ``routers``.

    Raises:
        ConfigError: empty, an unknown name, or an unsupported item.
    """
    if isinstance(train, str | nn.Module):
        train = [train]
    if isinstance(train, Mapping):
        items = list(train.items())
    elif isinstance(train, Sequence):
        items = [(None, t) for t in train]
    else:
        raise ConfigError(f"train= takes module names, modules or a mapping name → module, got {type(train).__name__}")
    if not items:
        raise ConfigError("train= is empty; name the modules (and routers) to train, e.g. train=['sentiment']")
    routers = _routers(model)
    library = getattr(model, "library", {})
    out: dict[str, nn.Module] = {}
    for i, (key, item) in enumerate(items):
        if isinstance(item, str):
            if item in library:
                module = library[item]
            elif item in routers:
                module = routers[item]
            else:
                known = ", ".join([*library, *routers]) or "none"
                raise ConfigError(f"train= names {item!r}, which is neither an attached module nor a router; "
                                  f"known: {known}")
            name = key or item
        elif isinstance(item, nn.Parameter):
            module, name = _holder(item), key or f"param{i}"
        elif isinstance(item, nn.Module):
            module, name = item, key or f"{type(item).__name__.lower()}{i}"
        else:
            raise ConfigError(f"train= item {item!r} is not a name, an nn.Module or an nn.Parameter")
        if name in out:
            raise ConfigError(f"train= names {name!r} twice")
        out[name] = module
    return out


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, read in place for contiguous CPU tensors (no copy, so no memory peak)."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (bytes,)
    return hashlib.sha256(raw.numpy()).hexdigest()


def host_digests(host: nn.Module) -> dict[str, str]:
    """sha256 of every parameter and buffer of ``host`` (each tied tensor once per name)."""
    return {name: tensor_digest(t) for name, t in host.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor)}


class HostGuard:
    """Freeze everything but the trained parameters for a run; check the host is unchanged afterwards.

    Args:
        model: the modular model (its ``host`` attribute is verified).
        trainables: name → module to train.
        verify: hash the host on entry and exit.

    Raises:
        ConfigError: a named module has nothing to train, is merged into the host, or shares a host parameter.
    """

    def __init__(self, model: nn.Module, trainables: Mapping[str, nn.Module], verify: bool = True):
        self.model, self.verify = model, verify
        self.host: nn.Module | None = getattr(model, "host", None)
        merged = set(getattr(model, "merged", []))
        params: dict[int, nn.Parameter] = {}
        for name, module in trainables.items():
            if name in merged:
                raise ConfigError(f"module {name!r} is merged into the host; model.unmerge({name!r}) before training")
            own = [p for p in module.parameters() if p.requires_grad]
            if not own:
                raise ConfigError(f"{name!r} has no parameters that require grad: nothing to train "
                                  "(a frozen module stays frozen; set requires_grad on the parts to train)")
            params.update((id(p), p) for p in own)
        if self.host is not None:
            shared = [n for n, p in self.host.named_parameters() if id(p) in params]
            if shared:
                raise ConfigError(f"train= includes host parameters ({shared[:3]}); the host stays frozen")
        self.trained_parameters: list[nn.Parameter] = list(params.values())
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self._digests: dict[str, str] = {}

    def __enter__(self) -> HostGuard:
        everything = {id(p): p for p in self.model.parameters()}
        everything.update((id(p), p) for p in self.trained_parameters)
        self._flags = [(p, p.requires_grad) for p in everything.values()]
        for p in everything.values():
            p.requires_grad_(False)
        for p in self.trained_parameters:
            p.requires_grad_(True)
        if self.verify and self.host is not None:
            self._digests = host_digests(self.host)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)
        if exc_type is None and self._digests:
            now = host_digests(self.host)
            changed = [k for k, v in self._digests.items() if now.get(k) != v]
            if changed or set(now) != set(self._digests):
                raise StateError(f"the host changed during training ({len(changed)} tensors, first: "
                                 f"{(changed or sorted(set(now) ^ set(self._digests)))[0]}); only modules may train. "
                                 "Check for host layers updated in train mode (e.g. batch-norm statistics) or "
                                 "code that writes host weights")
