"""Merging parity: polymod vs PEFT's add_weighted_adapter and vs mergekit, on the same inputs, in one run.

1. **PEFT** (``LoraModel.add_weighted_adapter``) on three LoRA adapters of a tiny
   Llama, loaded with identical A/B into PEFT and into polymod. Compared: the
   merged ΔW at every site. Mapping of definitions: PEFT ``cat`` = polymod
   ``lora="cat"``; PEFT ``svd``/``ties_svd``/``dare_linear_svd``/``magnitude_prune_svd``
   = polymod ``lora="delta", rank=r`` with the same method; PEFT ``linear``/
   ``ties``/``dare_linear``/``dare_ties``/``magnitude_prune`` (A/B-wise, weights
   √(w·s) on each factor) = polymod ``lora="ab"`` with weights √w (adapters with
   scaling 1). Where PEFT's definition differs — its TIES divides by the count of
   agreeing inputs, polymod (like mergekit) by the sum of their weights — the
   cases use unit weights, where the two agree. PEFT's DARE draws from the global
   RNG; here its ``torch.bernoulli`` returns polymod's seeded masks, in PEFT's call
   order, so both drop the same entries.
2. **mergekit**, tensor level: ``benchmarks/merge_parity_mergekit.py`` runs in
   mergekit's own venv and compares ``merge_group`` of every shared method with
   polymod's kernel (DARE with mergekit's L1 rescaling and polymod's masks).
3. **mergekit**, whole checkpoints: ``mergekit-yaml`` and ``polymod merge`` on the
   same recipe over a tiny Llama base and three fine-tunes (linear,
   task_arithmetic, ties), compared tensor by tensor.

    .venv/bin/python benchmarks/merge_parity.py     # writes benchmarks/results/merge_parity.json
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import tempfile
from collections import deque
from pathlib import Path

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

import polymod as pm
from polymod.merging.merge import merge
from polymod.merging.recipe import merge_command
from polymod.merging.sparsify import dare_mask
from polymod.sites import named_layers

ROOT = Path(__file__).resolve().parent.parent
MK_PY = ROOT / "benchmarks/.cache/mergekit-venv/bin/python"
MK_YAML = ROOT / "benchmarks/.cache/mergekit-venv/bin/mergekit-yaml"
SITES = "attn.q|attn.v"


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=96, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def adapters(alphas: list[float], rank: int = 4):
    """The same three LoRA adapters in PEFT and in polymod."""
    host = tiny_llama()
    cfgs = [LoraConfig(r=rank, lora_alpha=a, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            for a in alphas]
    peft_model = get_peft_model(copy.deepcopy(host), cfgs[0], adapter_name="m0")
    for i, cfg in enumerate(cfgs[1:], 1):
        peft_model.add_adapter(f"m{i}", cfg)
    model = pm.Modular(host)
    layers = named_layers(peft_model.base_model.model)
    for i, alpha in enumerate(alphas):
        model.add(f"m{i}", pm.LoRA(rank=rank, alpha=alpha, sites=SITES))
        with torch.no_grad():
            for site, part in model[f"m{i}"].items():
                part.A.copy_(layers[site].lora_A[f"m{i}"].weight)
                part.B.copy_(layers[site].lora_B[f"m{i}"].weight)
    return peft_model, model, layers


def peft_delta(peft_model, layers, sites, name: str, combination: str, weights, masks=None, **kw):
    real = torch.bernoulli
    if masks is not None:  # PEFT draws DARE masks from the global RNG: hand it polymod's, in its call order
        queue = deque(masks)
        torch.bernoulli = lambda p, *a, **k: queue.popleft().view(p.shape).to(p.dtype)
    try:
        peft_model.add_weighted_adapter([f"m{i}" for i in range(3)], weights, name, combination_type=combination,
                                        **kw)
    finally:
        torch.bernoulli = real
    return {s: layers[s].get_delta_weight(name).detach() for s in sites}


def compare(ours: dict, theirs: dict) -> dict:
    diff = max(float((ours[s].detach() - theirs[s]).abs().max()) for s in theirs)
    scale = max(float(theirs[s].abs().max()) for s in theirs)
    return {"max_abs_diff": diff, "max_abs_value": scale, "relative": diff / scale if scale else 0.0}


def peft_parity() -> list[dict]:
    rows = []
    density = 0.4
    # ΔW-wise families, with unequal LoRA scalings (α/r = 0.5, 2, 1).
    peft_model, model, layers = adapters([2.0, 8.0, 4.0])
    mods = {f"m{i}": model[f"m{i}"] for i in range(3)}
    sites = list(mods["m0"].sites)
    w = [0.5, 1.0, 2.0]
    cases = [("cat", w, {}, dict(lora="cat"), "linear", None),
             ("svd", w, {"svd_rank": 16}, dict(lora="delta", rank=16), "linear", None),
             ("ties_svd", [1.0] * 3, {"svd_rank": 16, "density": density},
              dict(lora="delta", rank=16, density=density), "ties", None),
             ("magnitude_prune_svd", w, {"svd_rank": 16, "density": density},
              dict(lora="delta", rank=16, density=density), "magnitude_prune", None),
             ("dare_linear_svd", w, {"svd_rank": 16, "density": density},
              dict(lora="delta", rank=16, density=density, seed=5), "dare_linear", "delta"),
             ("dare_ties_svd", [1.0] * 3, {"svd_rank": 16, "density": density},  # PEFT: disjoint mean
              dict(lora="delta", rank=16, density=density, seed=5, normalize=True), "dare_ties", "delta")]
    for combination, weights, peft_kw, ours_kw, method, dare in cases:
        masks = None
        if dare == "delta":
            masks = [dare_mask(5, f"{s}.weight", i, mods["m0"].delta()[s].numel(), density)
                     for s in sites for i in range(3)]
        theirs = peft_delta(peft_model, layers, sites, f"p_{combination}", combination, weights, masks, **peft_kw)
        ours = merge(mods, method, weights, **ours_kw).delta()
        rows.append({"peer": "peft", "peft": combination, "polymod": f"{method}, {ours_kw}", **compare(ours, theirs)})
    # A/B-wise families, scaling 1 (α = r): PEFT weighs each factor by √w.
    peft_model, model, layers = adapters([4.0, 4.0, 4.0])
    mods = {f"m{i}": model[f"m{i}"] for i in range(3)}
    for combination, weights, kw in (("linear", w, {}), ("ties", [1.0] * 3, {"density": density}),
                                     ("magnitude_prune", w, {"density": density}),
                                     ("dare_linear", w, {"density": density, "seed": 5}),
                                     ("dare_ties", [1.0] * 3, {"density": density, "seed": 5, "normalize": True})):
        masks = None
        if combination.startswith("dare"):
            masks = [dare_mask(5, f"{s}.lora_{ab}", i, mods["m0"].part(s).A.numel() if ab == "A"
                               else mods["m0"].part(s).B.numel(), density)
                     for s in sites for ab in "AB" for i in range(3)]
        peft_kw = {k: v for k, v in kw.items() if k not in ("seed", "normalize")}
        theirs = peft_delta(peft_model, layers, sites, f"p_{combination}", combination, weights, masks, **peft_kw)
        ours = merge(mods, combination, [math.sqrt(x) for x in weights], lora="ab", **kw).delta()
        rows.append({"peer": "peft", "peft": combination, "polymod": f"{combination}, lora='ab', weights √w",
                     **compare(ours, theirs)})
    return rows


def mergekit_tensor_parity() -> list[dict]:
    out = subprocess.run([str(MK_PY), str(ROOT / "benchmarks/merge_parity_mergekit.py")], capture_output=True,
                         text=True, check=True)
    return [{"peer": "mergekit (tensor)", **json.loads(line)} for line in out.stdout.splitlines() if line.strip()]


def mergekit_checkpoint_parity(work: Path) -> list[dict]:
    host = tiny_llama()
    host.save_pretrained(work / "base")
    base = {k: v.clone() for k, v in host.state_dict().items()}
    for i in range(3):
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in host.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        host.save_pretrained(work / f"ft{i}")
        host.load_state_dict(base)
    recipes = {
        "linear": "models:\n" + "".join(f"  - model: {work / f'ft{i}'}\n    parameters: {{weight: {w}}}\n"
                                         for i, w in enumerate((0.2, 0.3, 0.5))),
        "task_arithmetic": f"base_model: {work / 'base'}\nparameters: {{lambda: 0.8}}\nmodels:\n" + "".join(
            f"  - model: {work / f'ft{i}'}\n    parameters: {{weight: {w}}}\n" for i, w in enumerate((1, -0.5, 0.7))),
        "ties": f"base_model: {work / 'base'}\nmodels:\n" + "".join(
            f"  - model: {work / f'ft{i}'}\n    parameters: {{weight: {w}, density: {d}}}\n"
            for i, (w, d) in enumerate(((1.0, 0.2), (0.6, 0.5), (0.3, 0.3)))),
    }
    rows = []
    for method, body in recipes.items():
        recipe = work / f"{method}.yml"
        recipe.write_text(f"merge_method: {method}\ndtype: float32\n{body}")
        merge_command(recipe, work / f"ours-{method}", progress=False)
        subprocess.run([str(MK_YAML), str(recipe), str(work / f"mk-{method}"), "--no-copy-tokenizer", "--quiet"],
                       check=True, capture_output=True)
        ours = tf.LlamaForCausalLM.from_pretrained(work / f"ours-{method}").state_dict()
        theirs = tf.LlamaForCausalLM.from_pretrained(work / f"mk-{method}").state_dict()
        diff = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
        same = sum(int((ours[k] == theirs[k]).sum()) for k in theirs) / sum(v.numel() for v in theirs.values())
        rows.append({"peer": "mergekit (checkpoint)", "method": method, "max_abs_diff": diff,
                     "identical_fraction": same, "tensors": len(theirs)})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    tf.utils.logging.disable_progress_bar()
    rows = peft_parity()
    if MK_PY.exists():
        rows += mergekit_tensor_parity()
        with tempfile.TemporaryDirectory() as tmp:
            rows += mergekit_checkpoint_parity(Path(tmp))
    else:
        print(f"mergekit is not installed at {MK_PY}; see docs/merging.md — skipping its parity")
    out = ROOT / "benchmarks/results/merge_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2) + "\n")
    print(f"{'peer':22s} {'method':22s} {'shape/params':30s} {'max |Δ|':>10s} {'identical':>10s}")
    for r in rows:
        method = r.get("peft") or r.get("method")
        detail = str(r.get("shape", "")) if "shape" in r else ""
        same = f"{r['identical_fraction']:.7f}" if "identical_fraction" in r else f"rel {r['relative']:.1e}"
        print(f"{r['peer']:22s} {method:22s} {detail:30s} {r['max_abs_diff']:10.2e} {same:>10s}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
