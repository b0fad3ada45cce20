"""Hub modules and compositions as the PEFT LoRA directories vLLM loads (no vLLM import here).

vLLM runs one kind of module: a LoRA on linear layers, at most ``--max-lora-rank``,
without biases or DoRA. What polymod can hand it:

* a plain LoRA within the rank: written by :func:`polymod.interop.write_peft`, exact;
* anything whose weight change is a sum of low-rank or dense per-site changes —
  a LoRA above the rank or with per-site ranks, a ``delta`` or ``sparse`` module (a
  merge's output), a composition package that Stacks LoRAs or Mixes them with fixed
  weights (Σᵢ wᵢ ΔWᵢ, exact for LoRAs at linear sites) — materialised as one LoRA per
  site: the factors concatenated when their ranks fit, else the best rank-r factors
  (truncated SVD), with each site's relative Frobenius error recorded in
  ``polymod.json`` beside the adapter and refused beyond ``max_error``;
* nothing else: IA³, prompts, prefixes, adapters, heads, DoRA, LoRA biases, learned
  routers — :class:`NotServableError`, whose message names ``--engine native``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from polymod.compose import Mix, Stack, describe
from polymod.errors import CompositionError
from polymod.interop.peft import CONFIG_FILE, PREFIX, WEIGHTS_FILE, write_peft
from polymod.modules.contract import Module
from polymod.modules.dora import DoRAPart
from polymod.routing.fixed import Static

# the ranks vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
REPORT_FILE = "polymod.json"
NATIVE = "serve it with the native engine (polymod serve HOST --engine native), which runs every module kind"

Factors = tuple[torch.Tensor, torch.Tensor]  # (B (D_out, r), A (r, D_in)): x ↦ B A x, scaling folded into B


class NotServableError(CompositionError):
    """A module or composition vLLM cannot run (not expressible as a LoRA within the served rank)."""


@dataclass
class Materialised:
    """A PEFT LoRA directory written for vLLM and how it relates to the hub module.

    Attributes:
        path: the directory (``adapter_config.json``, ``adapter_model.safetensors``, ``polymod.json``).
        ref: the hub reference it was made from.
        rank: the adapter's rank ``r``.
        exact: True when the adapter computes the module's change exactly (up to float32 rounding).
        errors: relative Frobenius error ‖ΔW − B A‖ / ‖ΔW‖ per site (0 when exact).
        how: ``peft`` (written as it is), ``factors`` (concatenated/padded, exact) or ``svd`` (truncated).
    """

    path: Path
    ref: str
    rank: int
    exact: bool
    errors: dict[str, float] = field(default_factory=dict)
    how: str = "peft"

    @property
    def max_error(self) -> float:
        """The worst site's relative error."""
        return max(self.errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to ``polymod.json``."""
        return {"ref": self.ref, "rank": self.rank, "exact": self.exact, "how": self.how,
                "max_relative_error": self.max_error, "relative_error": self.errors}


def check_rank(max_rank: int) -> int:
    """``max_rank`` if vLLM accepts it as ``--max-lora-rank``.

    Raises:
        NotServableError: another value (the message lists the accepted ones).
    """
    if max_rank not in VLLM_RANKS:
        raise NotServableError(f"vLLM's --max-lora-rank takes one of {list(VLLM_RANKS)}, got {max_rank!r}")
    return max_rank


def _refuse(label: str, why: str) -> NotServableError:
    return NotServableError(f"{label} cannot be served by vLLM: {why}; {NATIVE}")


def module_factors(module: Module, label: str) -> dict[str, Factors | torch.Tensor]:
    """Each site's change as LoRA factors (a LoRA) or a dense ΔW in (D_out, D_in) (``delta``, ``sparse``).

    Raises:
        NotServableError: another kind, DoRA, a LoRA bias, or a site that is not a linear layer.
    """
    if module.kind not in ("lora", "delta", "sparse"):
        raise _refuse(label, f"it is a {module.kind} module and vLLM runs LoRA only (weight changes of "
                             "linear layers: lora, or delta/sparse merges turned into one)")
    out: dict[str, Factors | torch.Tensor] = {}
    for name, part in module.items():
        if part.site_kind != "linear":
            raise _refuse(label, f"site {name} is of kind {part.site_kind}, and vLLM applies LoRA to linear "
                                 "layers only")
        if isinstance(part, DoRAPart):
            raise _refuse(label, "it is a DoRA LoRA (LoRA(dora=True)), which vLLM does not run")
        if module.kind == "lora":
            if part.bias is not None:
                raise _refuse(label, "it is a LoRA with bias=True (PEFT's bias='lora_only'), which vLLM does not "
                                     "run")
            b, a = part.delta_factors()
            out[name] = (b.detach().double(), a.detach().double())
        else:
            if getattr(part, "bias", None) is not None and isinstance(part.bias, torch.Tensor) \
                    and bool(part.bias.detach().ne(0).any()):
                raise _refuse(label, "it changes the host's biases, which a vLLM LoRA cannot")
            out[name] = part.delta_weight(None).detach().double()
    return out


def composition_factors(expr: Any, leaves: Mapping[str, Module], label: str) -> dict[str, list]:
    """Per site, the weighted changes a Stack or a fixed-weight Mix of modules adds: ``[(w, change), ...]``.

    A Stack of modules at linear sites adds their changes (each reads the site's input);
    a Mix with a static router and ``aggregate='sum'`` adds them weighted.

    Raises:
        NotServableError: another composition (learned or per-token routers, output averages),
            or a leaf vLLM cannot run.
    """
    terms: list[tuple[float, str]] = []

    def walk(node: Any, weight: float) -> None:
        if isinstance(node, str):
            terms.append((weight, node))
        elif isinstance(node, Stack):
            for child in node.children:
                walk(child, weight)
        elif isinstance(node, Mix) and isinstance(node.router, Static) and node.aggregate == "sum":
            ws = node.router.fixed or [1.0 / len(node.children)] * len(node.children)
            for child, w in zip(node.children, ws):
                walk(child, weight * w)
        else:
            raise _refuse(label, f"its composition {describe(node)} is not a sum of weight changes (a Stack, or a "
                                 "Mix with fixed weights and aggregate='sum')")

    walk(expr, 1.0)
    sites: dict[str, list] = {}
    for weight, leaf in terms:
        for site, change in module_factors(leaves[leaf], f"{label} (leaf {leaf!r})").items():
            sites.setdefault(site, []).append((weight, change))
    return sites


def _combine(terms: list) -> Factors | torch.Tensor:
    """One site's Σ w·change as factors when every term is low-rank, else as a dense ΔW."""
    if all(isinstance(c, tuple) for _, c in terms):
        return torch.cat([w * c[0] for w, c in terms], dim=1), torch.cat([c[1] for _, c in terms], dim=0)
    return sum(w * (c[0] @ c[1] if isinstance(c, tuple) else c) for w, c in terms)


def fit_rank(change: Factors | torch.Tensor, rank: int) -> tuple[Factors, float]:
    """The best factors of rank ≤ ``rank`` for one site's change, and their relative Frobenius error.

    Factors within the rank are kept as they are (error 0). Otherwise the truncated SVD of
    ΔW, computed from the factors' QR decompositions (an r×r core, never the dense ΔW)
    when the change is low-rank.
    """
    if isinstance(change, tuple):
        b, a = change
        if b.shape[1] <= rank:
            return (b, a), 0.0
        qb, rb = torch.linalg.qr(b)  # B = Qb Rb
        qa, ra = torch.linalg.qr(a.t())  # Aᵀ = Qa Ra
        u, s, vh = torch.linalg.svd(rb @ ra.t())  # ΔW = Qb (U S Vᵀ) Qaᵀ
        u, vh = qb @ u, vh @ qa.t()
    else:
        u, s, vh = torch.linalg.svd(change, full_matrices=False)
    r = min(rank, s.numel())
    total = float((s * s).sum())
    err = math.sqrt(float((s[r:] * s[r:]).sum()) / total) if total > 0 else 0.0
    return (u[:, :r] * s[:r], vh[:r]), err


def write_factors(factors: Mapping[str, Factors], path: Path, base_model: str | None) -> int:
    """Write per-site factors as one PEFT LoRA directory of uniform rank (zero-padded), scaling 1.

    Returns:
        The rank written.
    """
    rank = max(b.shape[1] for b, _ in factors.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, (b, a) in factors.items():
        pad = rank - b.shape[1]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).float().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).float() \
            .contiguous()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": float(rank), "target_modules": list(factors),
              "bias": "none", "use_dora": False, "use_rslora": False, "lora_dropout": 0.0, "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": base_model, "task_type": None,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return rank


def _plain(module: Module, max_rank: int) -> bool:
    """A LoRA that write_peft can hand to vLLM as it is: one rank ≤ max_rank and one scaling everywhere."""
    spec = module.spec
    if module.kind != "lora" or spec.rslora or spec.dora or spec.bias:
        return False
    parts = [p for _, p in module.items()]
    return all(p.site_kind == "linear" and p.rank == spec.rank <= max_rank and math.isclose(p.scaling, parts[0].scaling)
               for p in parts)


def materialise(module: Module | None, path: str | os.PathLike, ref: str, *, base_model: str | None = None,
                max_rank: int = 16, max_error: float = 0.05, expr: Any = None,
                leaves: Mapping[str, Module] | None = None) -> Materialised:
    """Write the PEFT LoRA directory vLLM loads for a module, or for a composition of modules.

    The directory appears whole (written beside it, then renamed into place).

    Args:
        module: the module (None with ``expr``).
        path: the directory to create.
        ref: the hub reference (for messages and ``polymod.json``).
        base_model: recorded as ``base_model_name_or_path`` (vLLM's served model name).
        max_rank: the server's ``--max-lora-rank``.
        max_error: the largest relative Frobenius error at any site a truncation may cost.
        expr: a composition (Stack / fixed-weight Mix) whose leaves are named in ``leaves``.
        leaves: leaf name → module, with ``expr``.

    Raises:
        NotServableError: a kind or composition vLLM cannot run, or a truncation to ``max_rank``
            that costs more than ``max_error`` (the message gives the error and the rank needed).
    """
    check_rank(max_rank)
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=path.parent if path.parent.exists() else None))
    try:
        if expr is None and module is not None and _plain(module, max_rank):
            write_peft(module, tmp, base_model=base_model)
            done = Materialised(path, ref, module.spec.rank, True, {n: 0.0 for n in module.sites}, "peft")
        else:
            if expr is not None:
                sites = {s: _combine(t) for s, t in composition_factors(expr, leaves or {}, ref).items()}
            else:
                assert module is not None, "materialise needs a module or a composition"
                sites = module_factors(module, ref)
            fitted = {s: fit_rank(c, max_rank) for s, c in sites.items()}
            errors = {s: e for s, (_, e) in fitted.items()}
            worst = max(errors.values(), default=0.0)
            if worst > max_error:
                site = max(errors, key=errors.__getitem__)
                raise _refuse(ref, f"as a LoRA of rank {max_rank} (--max-lora-rank) it would be off by "
                                   f"{worst:.3g} (relative Frobenius error at {site}), above the allowed "
                                   f"{max_error:g}; raise --max-lora-rank or the allowed error")
            rank = write_factors({s: f for s, (f, _) in fitted.items()}, tmp, base_model)
            done = Materialised(path, ref, rank, worst == 0.0, errors, "svd" if worst > 0 else "factors")
        (tmp / REPORT_FILE).write_text(json.dumps(done.to_dict(), indent=2) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:  # another thread wrote the same adapter first: keep that one
            if not (path / CONFIG_FILE).is_file():
                raise
        return done
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_materialised(path: str | os.PathLike) -> Materialised | None:
    """The record of an adapter written by :func:`materialise`, or None when ``path`` holds none."""
    path = Path(path)
    try:
        data = json.loads((path / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        return None
    return Materialised(path, data["ref"], int(data["rank"]), bool(data["exact"]),
                        dict(data.get("relative_error", {})), data.get("how", "peft"))


__all__ = ["Materialised", "NotServableError", "VLLM_RANKS", "check_rank", "composition_factors", "fit_rank",
           "materialise", "module_factors", "read_materialised", "write_factors"]
