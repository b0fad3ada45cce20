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
import os
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
from polymod.merging.shards import Checkpoint
from polymod.merging.sparsify import dare_mask
from polymod.sites import named_layers

ROOT = Path(__file__).resolve().parent.parent
MK_PY = ROOT / "benchmarks/.cache/mergekit-venv/bin/python"
MK_YAML = ROOT / "benchmarks/.cache/mergekit-venv/bin/mergekit-yaml"
SITES = "attn.q|attn.v"


def tiny_llama(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
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


def save_family(work: Path, layers: int, names: tuple[str, ...], dtype: torch.dtype = torch.float32) -> None:
    """A tiny Llama base and fine-tunes of it (every tensor moved), saved under ``work/<name>``."""
    host = tiny_llama(layers=layers).to(dtype)
    host.save_pretrained(work / names[0])
    base = {k: v.clone() for k, v in host.state_dict().items()}
    for i, name in enumerate(names[1:]):
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in host.parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.01).to(dtype))
        host.save_pretrained(work / name)
        host.load_state_dict(base)


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ck:
        return {n: ck.read(n).clone() for n in ck.names}


def both(work: Path, name: str, recipe_text: str) -> tuple[dict, dict, dict, dict]:
    """Run one recipe through polymod merge and mergekit-yaml; return both outputs' tensors and configs."""
    recipe = work / f"{name}.yml"
    recipe.write_text(recipe_text)
    here = os.getcwd()
    os.chdir(work)  # relative model paths resolve against the working directory, in both tools
    try:
        merge_command(recipe, work / f"ours-{name}", progress=False)
    finally:
        os.chdir(here)
    subprocess.run([str(MK_YAML), str(recipe), str(work / f"mk-{name}"), "--no-copy-tokenizer", "--quiet",
                    "--no-write-model-card"], check=True, capture_output=True, cwd=work,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cfg = [json.loads((work / f"{who}-{name}" / "config.json").read_text()) for who in ("ours", "mk")]
    return read_all(work / f"ours-{name}"), read_all(work / f"mk-{name}"), cfg[0], cfg[1]


def compare_checkpoints(ours: dict, theirs: dict) -> dict:
    if set(ours) != set(theirs):
        return {"max_abs_diff": None, "tensor_names_differ": sorted(set(ours) ^ set(theirs))[:5]}
    diff = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in theirs)
    differing = sum(int((ours[k] != theirs[k]).sum()) for k in theirs)
    total = sum(v.numel() for v in theirs.values())
    return {"max_abs_diff": diff, "identical_fraction": 1 - differing / total, "differing_entries": differing,
            "entries": total, "tensors": len(theirs)}


def models(*entries: tuple[str, str]) -> str:
    return "models:\n" + "".join(f"  - model: {m}\n" + (f"    parameters: {p}\n" if p else "") for m, p in entries)


SLERP_T = """parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""
# Deterministic recipes, float32: every added method and recipe feature, tensor for tensor.
RECIPES = {
    "linear": models(("ft0", "{weight: 0.2}"), ("ft1", "{weight: 0.3}"), ("ft2", "{weight: 0.5}")),
    "task_arithmetic": "base_model: base\nparameters: {lambda: 0.8}\n" + models(
        ("ft0", "{weight: 1}"), ("ft1", "{weight: -0.5}"), ("ft2", "{weight: 0.7}")),
    "ties": "base_model: base\n" + models(("ft0", "{weight: 1.0, density: 0.2}"),
                                           ("ft1", "{weight: 0.6, density: 0.5}"),
                                           ("ft2", "{weight: 0.3, density: 0.3}")),
    "ties gradient + filter": "base_model: base\nparameters: {normalize: true, int8_mask: true}\n" + models(
        ("ft0", "{density: [1, 0.7, 0.1], weight: 1.0}"), ("ft1", "{density: 0.5, weight: [0, 0.3, 0.7, 1]}"),
        ("ft2", "{density: 0.33, weight: [{filter: mlp, value: 0.5}, {value: 0}]}")),
    "slerp gradient + filter": "base_model: base\n" + models(("base", ""), ("ft0", "")) + SLERP_T,
    "slerp slices": "base_model: base\nslices:\n  - sources:\n      - {model: base, layer_range: [0, 6]}\n"
                    "      - {model: ft0, layer_range: [0, 6]}\n" + SLERP_T,
    "nuslerp (base, flatten)": "base_model: base\n" + models(("ft0", "{weight: 1.0}"), ("ft1", "{weight: 3.0}")),
    "nuslerp (no base, rows)": "parameters: {nuslerp_flatten: false}\n" + models(
        ("ft0", "{weight: 2.0}"), ("ft1", "{weight: 1.0}")),
    "nuslerp (base, row_wise)": "base_model: base\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n"
                                + models(("ft0", "{weight: 1.0}"), ("ft1", "{weight: 1.0}")),
    "model_stock": "base_model: base\n" + models(("ft0", ""), ("ft1", ""), ("ft2", "")),
    "model_stock filter_wise": "base_model: base\nparameters: {filter_wise: true}\n" + models(
        ("ft0", ""), ("ft1", ""), ("ft2", "")),
    "nearswap": "base_model: base\nparameters: {t: 0.005}\n" + models(("base", ""), ("ft0", "")),
    "ram": "base_model: base\nparameters: {epsilon: 0.01}\n" + models(("ft0", ""), ("ft1", ""), ("ft2", "")),
    "multislerp (base)": "base_model: base\n" + models(("ft0", "{weight: 1.0}"), ("ft1", "{weight: 2.0}"),
                                                       ("ft2", "{weight: 0.5}")),
    "multislerp (no base)": "parameters: {normalize_weights: false}\n" + models(("ft0", "{weight: 0.3}"),
                                                                                  ("ft1", "{weight: 0.7}")),
    "passthrough frankenmerge": "slices:\n  - sources: [{model: ft0, layer_range: [0, 4]}]\n"
                                "  - sources:\n      - model: ft1\n        layer_range: [2, 6]\n"
                                "        parameters: {scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]}\n",
}


def mergekit_checkpoint_parity(work: Path) -> list[dict]:
    """``polymod merge`` vs ``mergekit-yaml`` on the same recipes over a 6-layer tiny Llama base and 3 fine-tunes."""
    save_family(work, 6, ("base", "ft0", "ft1", "ft2"))
    rows = []
    for name, body in RECIPES.items():
        method = {"ties gradient + filter": "ties", "slerp slices": "slerp"}.get(name, name.split(" ")[0])
        ours, theirs, cfg, mk_cfg = both(work, name.replace(" ", "_").replace("(", "").replace(")", "")
                                         .replace(",", "").replace("+", "and"),
                                         f"merge_method: {method}\ndtype: float32\n{body}")
        rows.append({"peer": "mergekit (checkpoint)", "method": name, **compare_checkpoints(ours, theirs),
                     "config_same": {k: cfg.get(k) == mk_cfg.get(k) for k in ("dtype", "num_hidden_layers")},
                     "layers": cfg.get("num_hidden_layers")})
    # DELLA's masks are random in both tools (different generators): equal statistics, not equal entries.
    ours, theirs, _, _ = both(work, "della", "merge_method: della\nbase_model: base\ndtype: float32\n" + models(
        ("ft0", "{weight: 1.0, density: 0.4, epsilon: 0.1}"), ("ft1", "{weight: 1.0, density: 0.4, epsilon: 0.1}")))
    base = read_all(work / "base")
    stats = {}
    for who, out in (("polymod", ours), ("mergekit", theirs)):
        moved = sum(int((out[k] != base[k]).sum()) for k in base) / sum(v.numel() for v in base.values())
        l1 = sum(float((out[k] - base[k]).abs().sum()) for k in base)
        stats[who] = {"fraction_changed": moved, "delta_l1": l1}
    rows.append({"peer": "mergekit (checkpoint)", "method": "della (statistics)", "max_abs_diff": None, **stats})
    # bfloat16 TIES: the same recipe on bfloat16 checkpoints, merged in bfloat16.
    save_family(work / "bf16", 6, ("base", "ft0", "ft1", "ft2"), torch.bfloat16)
    ours, theirs, _, _ = both(work / "bf16", "ties", "merge_method: ties\ndtype: bfloat16\n" + RECIPES["ties"])
    rows.append({"peer": "mergekit (checkpoint)", "method": "ties, bfloat16", **compare_checkpoints(ours, theirs),
                 "why": bf16_differences(work / "bf16", ours, theirs, (0.2, 0.5, 0.3))})
    return rows


def bf16_differences(work: Path, ours: dict, theirs: dict, density: tuple[float, ...]) -> dict:
    """Classify the entries where a bfloat16 TIES merge differs from mergekit's.

    *tie*: for some input, the entry's |τ| (τ in bfloat16, as mergekit computes it) equals that
    input's trim threshold, so which tied entries survive is the tools' choice (mergekit's argsort
    order, polymod's lowest index); *rounding*: not a tie, and at most 2 bfloat16 units in the last
    place apart (polymod computes in float32, mergekit in bfloat16); *other*: anything else.
    """
    base = read_all(work / "base")
    fts = [read_all(work / f"ft{i}") for i in range(3)]
    counts = {"tie": 0, "rounding": 0, "other": 0}
    for name, mine in ours.items():
        differ = (mine != theirs[name]).reshape(-1)
        if not differ.any():
            continue
        tie = torch.zeros_like(differ)
        for ft, d in zip(fts, density):
            a = (ft[name] - base[name]).abs().float().reshape(-1)  # bfloat16 subtraction, as mergekit
            k = max(1, int(d * a.numel()))
            tie |= a == a.topk(k).values.min()
        x, y = mine.float().reshape(-1), theirs[name].float().reshape(-1)
        ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(x.abs(), y.abs()).clamp_min(1e-30))) - 7)
        rounding = ~tie & ((x - y).abs() <= 2 * ulp)
        counts["tie"] += int((differ & tie).sum())
        counts["rounding"] += int((differ & rounding).sum())
        counts["other"] += int((differ & ~tie & ~rounding).sum())
    return counts


EXAMPLES = {  # mergekit's examples/*.yml (commit a6e4028), model names mapped to a 40-layer tiny Llama family
    "linear.yml": "merge_method: linear\ndtype: float16\n" + models(
        ("ft0", "{weight: 1.0}"), ("ft1", "{weight: 0.3}"), ("ft2", "{weight: 0.5}")),
    "ties.yml": "merge_method: ties\nbase_model: base\nparameters: {normalize: true, int8_mask: true}\n"
                "dtype: float16\n" + models(
                    ("ft0", "{density: [1, 0.7, 0.1], weight: 1.0}"),
                    ("ft1", "{density: 0.5, weight: [0, 0.3, 0.7, 1]}"),
                    ("ft2", "{density: 0.33, weight: [{filter: mlp, value: 0.5}, {value: 0}]}")),
    "bio-merge.yml": "merge_method: ties\nbase_model: base\nparameters: {normalize: false, int8_mask: true}\n"
                     "dtype: float16\n" + models(("ft0", "{density: 0.5, weight: 0.5}"),
                                                 ("ft1", "{density: 0.5, weight: 0.5}")),
    "gradient-slerp.yml": "merge_method: slerp\nbase_model: ft0\ndtype: float16\nslices:\n  - sources:\n"
                          "      - {model: ft0, layer_range: [0, 40]}\n      - {model: ft1, layer_range: [0, 40]}\n"
                          + SLERP_T,
    "orcamini-platy-44layer.yml": "merge_method: passthrough\ndtype: float16\nslices:\n"
                                  "  - sources: [{model: ft0, layer_range: [0, 24]}]\n"
                                  "  - sources: [{model: ft1, layer_range: [20, 40]}]\n",
    "arcee_fusion.yml": "merge_method: arcee_fusion\nbase_model: ft0\ndtype: bfloat16\n" + models(
        ("ft0", ""), ("ft1", "")),
}


VOCAB_RECIPES = {  # tokenizer_source over inputs with different added tokens (tests/merge_helpers.vocab_family)
    "union, linear": "merge_method: linear\ntokenizer_source: union\n" + models(
        ("ft0", "{weight: 0.25}"), ("ft1", "{weight: 0.75}")),
    "union, task_arithmetic": "merge_method: task_arithmetic\nbase_model: base\ntokenizer_source: union\n" + models(
        ("ft0", "{weight: 1.0}"), ("ft1", "{weight: 0.5}")),
    "union, ties": "merge_method: ties\nbase_model: base\ntokenizer_source: union\n" + models(
        ("ft0", "{weight: 1.0, density: 0.5}"), ("ft1", "{weight: 0.7, density: 0.3}")),
    "union, slerp": "merge_method: slerp\nbase_model: ft0\ntokenizer_source: union\nparameters: {t: 0.3}\n"
                    + models(("ft0", ""), ("ft1", "")),
    "base, linear": "merge_method: linear\nbase_model: base\ntokenizer_source: base\n" + models(
        ("ft0", "{weight: 0.5}"), ("base", "{weight: 0.5}")),
    "model ft1, task_arithmetic": "merge_method: task_arithmetic\nbase_model: base\ntokenizer_source: ft1\n"
                                  + models(("ft0", "{weight: 1.0}")),
    "union, passthrough slices": "merge_method: passthrough\ntokenizer_source: union\nslices:\n"
                                 "  - sources: [{model: ft0, layer_range: [0, 1]}]\n"
                                 "  - sources: [{model: ft1, layer_range: [1, 2]}]\n",
}


def by_token(ours: dict, theirs: dict, ours_dir: Path, theirs_dir: Path) -> tuple[dict, bool]:
    """mergekit's token-indexed rows reordered to polymod's vocabulary (the order of tokens that several
    non-base models add is mergekit's set order, i.e. unspecified); whether the vocabularies are identical."""
    mine = tf.AutoTokenizer.from_pretrained(ours_dir).get_vocab()
    other = tf.AutoTokenizer.from_pretrained(theirs_dir).get_vocab()
    if set(mine) != set(other):
        return theirs, False
    order = torch.tensor([other[t] for t, _ in sorted(mine.items(), key=lambda kv: kv[1])])
    rows = len(mine)
    return {k: v[order] if v.shape[:1] == (rows,) and "layers" not in k else v for k, v in theirs.items()}, \
        mine == other


def mergekit_vocab_parity(work: Path) -> list[dict]:
    """``tokenizer_source`` (union, base, a model) vs mergekit, float32, untied and tied embeddings."""
    import sys
    sys.path.insert(0, str(ROOT))
    from tests.merge_helpers import vocab_family
    rows = []
    for tied in (False, True):
        fam = work / ("tied" if tied else "untied")
        vocab_family(fam, tied=tied)
        for name, body in VOCAB_RECIPES.items():
            if tied and not name.startswith("union"):
                continue
            tag = name.replace(" ", "_").replace(",", "")
            ours, theirs, cfg, mk_cfg = both(fam, tag, f"dtype: float32\n{body}")
            theirs, same_order = by_token(ours, theirs, fam / f"ours-{tag}", fam / f"mk-{tag}")
            rows.append({"peer": "mergekit (checkpoint)", "method": f"tokenizer_source {name}"
                         + (" (tied)" if tied else ""), **compare_checkpoints(ours, theirs),
                         "vocab_size": [cfg.get("vocab_size"), mk_cfg.get("vocab_size")],
                         "token_ids_identical": same_order})
    return rows


def mergekit_examples(work: Path) -> list[dict]:
    """mergekit's example recipes: run by both tools as written (float16) and in float32."""
    save_family(work, 40, ("base", "ft0", "ft1", "ft2"))
    rows = []
    for name, text in EXAMPLES.items():
        for dtype in ("as written", "float32"):
            body = text if dtype == "as written" else "\n".join(
                "dtype: float32" if line.startswith("dtype:") else line for line in text.split("\n"))
            tag = f"{name.removesuffix('.yml')}-{'w' if dtype == 'as written' else 'f32'}"
            try:
                ours, theirs, cfg, mk_cfg = both(work, tag, body)
            except pm.ConfigError as exc:
                rows.append({"peer": "mergekit (example)", "method": name, "dtype": dtype, "max_abs_diff": None,
                             "polymod": f"refused: {str(exc).splitlines()[-1].strip()}"})
                continue
            rows.append({"peer": "mergekit (example)", "method": name, "dtype": dtype,
                         **compare_checkpoints(ours, theirs), "layers": [cfg.get("num_hidden_layers"),
                                                                         mk_cfg.get("num_hidden_layers")]})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    tf.utils.logging.disable_progress_bar()
    rows = peft_parity()
    if MK_PY.exists():
        rows += mergekit_tensor_parity()
        with tempfile.TemporaryDirectory() as tmp:
            rows += mergekit_checkpoint_parity(Path(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            rows += mergekit_vocab_parity(Path(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            rows += mergekit_examples(Path(tmp))
    else:
        print(f"mergekit is not installed at {MK_PY}; see docs/merging.md — skipping its parity")
    out = ROOT / "benchmarks/results/merge_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2) + "\n")
    print(f"{'peer':22s} {'method':22s} {'shape/params':30s} {'max |Δ|':>10s} {'identical':>10s}")
    for r in rows:
        method = r.get("peft") or r.get("method")
        detail = str(r.get("shape", "")) if "shape" in r else ""
        same = (f"{r['identical_fraction']:.7f}" if "identical_fraction" in r else f"rel {r['relative']:.1e}"
                if "relative" in r else r.get("polymod", json.dumps({k: r[k] for k in ("polymod", "mergekit")
                                                                    if k in r})))
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:10.2e}"
        detail = detail or str(r.get("dtype", ""))
        print(f"{r['peer']:22s} {method:26s} {detail:14s} {diff:>10s} {same}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
