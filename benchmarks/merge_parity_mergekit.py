"""Tensor-level parity with mergekit's merge methods; run by merge_parity.py with mergekit's own Python.

    benchmarks/.cache/mergekit-venv/bin/python benchmarks/merge_parity_mergekit.py

mergekit lives in its own virtual environment (it is never imported by polymod);
that environment also sees polymod, so this script feeds the same tensors to
mergekit's ``merge_group`` and to polymod's ``merge_tensor`` and prints one JSON
object per case. For DARE, mergekit's ``torch.bernoulli`` draws are replaced by
polymod's seeded masks, so both apply the same drops and the comparison checks
the rescaling (mergekit 0.1.5: match the L1 norm) and the combination. DELLA likewise: mergekit draws
``torch.bernoulli(probabilities)`` once per input; it is handed polymod's seeded per-row-block masks, so the
comparison checks the ranking-free parts (rescaling, sign election, normalisation) exactly.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from pathlib import Path

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # polymod's source, in mergekit's venv
from polymod.merging.methods import MergeSpec, merge_tensor  # noqa: E402
from polymod.merging.sparsify import dare_mask, della_keep, della_rows  # noqa: E402

CASES = [
    ("task_arithmetic", {"weight": [1.0, -0.5, 0.7]}, {"lambda": 0.8}),
    ("ties", {"weight": [1.0, 1.0, 1.0], "density": [0.2, 0.2, 0.2]}, {}),
    ("ties", {"weight": [1.0, 0.6, 0.3], "density": [0.1, 0.5, 0.9]}, {}),
    ("ties", {"weight": [1.0, 0.6, 0.3], "density": [0.3, 0.3, 0.3]}, {"normalize": False, "lambda": 1.5}),
    ("dare_linear", {"weight": [0.5, 1.0, 1.0], "density": [0.3, 0.5, 0.7]}, {}),
    ("dare_ties", {"weight": [1.0, 1.0, 1.0], "density": [0.4, 0.4, 0.4]}, {}),
    ("dare_ties", {"weight": [1.0, 0.5, 1.0], "density": [0.4, 0.4, 0.4]}, {"rescale": False}),
    ("breadcrumbs", {"weight": [1.0, 1.0, 1.0], "density": [0.5, 0.5, 0.5], "gamma": [0.02, 0.02, 0.02]}, {}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.8, 1.0], "density": [0.3, 0.3, 0.3], "gamma": [0.01, 0.01, 0.01]}, {}),
    ("della", {"weight": [1.0, 0.5, 1.0], "density": [0.4, 0.4, 0.5], "epsilon": [0.1, 0.1, 0.2]}, {}),
    ("della", {"weight": [1.0, 1.0, 1.0], "density": [0.3, 0.3, 0.3], "epsilon": [0.15, 0.15, 0.15]},
     {"rescale": False, "lambda": 1.2}),
    ("della_linear", {"weight": [0.5, 1.0, 1.0], "density": [0.5, 0.5, 0.5], "epsilon": [0.1, 0.1, 0.1]}, {}),
]
SHAPES = [(257, 130), (1024, 1024)]  # the second is large enough for polymod's bracketed selection
SEED = 11


def mergekit_merge(method, tensors, per_input, shared, masks, seen=None):
    group = TensorGroup.from_tensors(tensors, ids=["base", "m0", "m1", "m2"], base_index=0, name="x")
    spec = registry.get(method)
    params = {p.name: p.default for p in spec.spec.parameters if p.default is not None}
    params.update({k: {f"m{i}": v for i, v in enumerate(vals)} for k, vals in per_input.items()})
    for key in ("density", "gamma", "epsilon"):
        if key in params and not isinstance(params[key], dict):
            params[key] = {f"m{i}": params[key] for i in range(3)}
    params.update(shared)
    queue, real = deque(masks), torch.bernoulli
    def bernoulli(p, *a, **k):  # polymod's drops; DELLA's probabilities kept for comparison
        if seen is not None:
            seen.append(p.detach().clone())
        return queue.popleft().view(p.shape).to(p.dtype)

    torch.bernoulli = bernoulli
    try:
        return spec.merge_group(group, **params)
    finally:
        torch.bernoulli = real


def della_masks(delta: torch.Tensor, index: int, density: float, epsilon: float) -> torch.Tensor:
    """polymod's DELLA keep-mask and keep probabilities of one input over the whole tensor, by row block."""
    rows, cols, per = della_rows(tuple(delta.shape))
    flat = delta.reshape(rows, cols)
    pairs = [della_keep(SEED, "x", index, b, flat[b * per:(b + 1) * per], density, epsilon)
             for b in range(-(-rows // per))]
    return torch.cat([m for m, _ in pairs]), torch.cat([p for _, p in pairs])


def prob_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Largest difference between polymod's and mergekit's DELLA keep probabilities."""
    return max(float((p.reshape(-1) - q.reshape(-1)).abs().max()) for p, q in zip(ours, theirs))


def main() -> None:
    for shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g) * 0.02
        models = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(3)]
        for method, per_input, shared in CASES:
            density = tuple(per_input.get("density", [1.0] * 3))
            masks, probs, seen = [], [], []
            if method.startswith("dare"):
                masks = [dare_mask(SEED, "x", i, base.numel(), d) for i, d in enumerate(density)]
            if method.startswith("della"):
                pairs = [della_masks(models[i] - base, i, d, per_input["epsilon"][i]) for i, d in enumerate(density)]
                masks, probs = [m for m, _ in pairs], [p for _, p in pairs]
            theirs = mergekit_merge(method, [base, *models], per_input, shared, masks, seen)
            spec = MergeSpec(method, tuple(per_input["weight"]), density, tuple(per_input.get("gamma", ())),
                             tuple(per_input.get("epsilon", ())), lam=shared.get("lambda", 1.0),
                             normalize=shared.get("normalize"),
                             rescale="l1" if shared.get("rescale", True) else "none", seed=SEED)
            ours = base + merge_tensor(spec, "x", [m - base for m in models])
            diff = (ours - theirs).abs()
            print(json.dumps({"method": method, "shape": list(shape), "params": {**per_input, **shared},
                              "max_abs_diff": float(diff.max()), "max_abs_value": float(theirs.abs().max()),
                              "identical_fraction": float((ours == theirs).float().mean()),
                              "differing_entries": int((ours != theirs).sum()),
                              **({"della_probability_max_abs_diff": prob_diff(probs, seen)} if probs else {})}),
                  flush=True)


if __name__ == "__main__":
    main()
