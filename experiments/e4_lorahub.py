"""E4 — LoraHub: a gradient-free combination of modules for an unseen task from a few examples.

Claim (Huang et al., 2023, arXiv 2307.13269; survey §6 on reusing modules):
given modules trained on other tasks, searching their combination weights w
with a gradient-free optimiser on a handful of examples of an unseen task beats
both the host alone and the uniform average of the modules.

Design: host all-MiniLM-L6-v2 (frozen). Upstream LoRA modules (r = 8, queries
and values) are trained on four tasks, each through a fixed zero-shot head
(cosine similarity × 20 to the host's embeddings of class prompts,
``common.PROMPTS``): Rotten Tomatoes sentiment, BBC News topics, chatterbot
topics, chatterbot language ID. The unseen task is IMDB review
polarity (first 96 tokens) with K = 32 labelled examples (16 per class); its
head is its own zero-shot head ("a negative/positive movie review" — the same
prompts as Rotten Tomatoes, as LoraHub shares the LM head and verbaliser across
tasks), fixed for every contender:

* host: the zero-shot head alone;
* uniform: the four modules merged with equal weights 1/4 — ΔW-wise
  (``pm.merge(..., lora="cat")``, the exact average of the updates) and
  factor-wise (``lora="ab"``, LoraHub's own composition at its starting point);
* LoraHub: weights w ∈ [−1.5, 1.5]⁴ searched to minimise the cross-entropy on
  the 32 search examples + 0.05·Σ|wᵢ| (the paper's L1 term and bounds), composing
  A = Σ wᵢ Aᵢ, B = Σ wᵢ Bᵢ (``lora="ab"``), with 40 evaluations of
  ``polymod.merging.lorahub.lorahub`` (CMA-ES) where this polymod has it,
  else of a small (μ/μ, λ) evolution strategy in this script (population 8,
  μ = 4, σ from 0.5 decaying); the report names the one that ran.

Every contender is evaluated on 400 held-out IMDB reviews.
"""

from __future__ import annotations

import time

import common as C
import numpy as np
import torch

import polymod as pm
from polymod.merging.merge import merge

try:
    from polymod.merging.lorahub import lorahub as LORAHUB
except ImportError:  # not in this version of polymod: the in-script search below stands in
    LORAHUB = None

UPSTREAM = ("rt", "bbc", "chat", "lang")
BOUND, L1 = 1.5, 0.05


def es_search(objective, dim: int, evaluations: int, seed: int, popsize: int = 8, sigma: float = 0.5):
    """A (μ/μ, λ) evolution strategy in [−BOUND, BOUND]^dim from w = 0; returns (best w, best value, history)."""
    rng = np.random.default_rng(seed)
    mean = np.zeros(dim)
    best_w, best_v = mean.copy(), objective(mean)
    history = [best_v]
    done = 1
    while done < evaluations:
        pop = np.clip(mean + sigma * rng.standard_normal((popsize, dim)), -BOUND, BOUND)
        values = []
        for w in pop[: evaluations - done]:
            values.append(objective(w))
            done += 1
            if values[-1] < best_v:
                best_w, best_v = w.copy(), values[-1]
            history.append(best_v)
        elite = pop[np.argsort(values)[: max(1, len(values) // 2)]]
        mean = elite.mean(0)
        sigma *= 0.8
    return best_w, best_v, history


def run(seeds, n_upstream: int, n_test: int, shots: int, evaluations: int, epochs: float) -> list[dict]:
    C.set_seed(0)
    host = C.load_host()
    model = pm.Modular(host)
    modules = {}
    for t in UPSTREAM:  # upstream modules are trained once; seeds vary the few-shot sample and the search
        task = C.load_task(t, n_upstream, 50, seed=0)
        C.train_module(model, t, pm.LoRA(rank=8, sites="attn.q|attn.v"), task, C.zero_shot_head(host, t),
                       epochs=epochs)
        modules[t] = model.remove(t)
    out = []
    for seed in seeds:
        imdb = C.load_task("imdb", shots, n_test, seed=seed, max_length=96)
        head = C.zero_shot_head(host, "imdb")
        ids, mask, y = next(imdb.train.batches(len(imdb.train)))

        def few_shot_loss(combo, head=head, ids=ids, mask=mask, y=y) -> float:
            model.add("hub-tmp", combo)
            model.merge_into_host("hub-tmp")
            with torch.no_grad():
                loss = torch.nn.functional.cross_entropy(head(host(ids, mask)), y).item()
            model.remove("hub-tmp")
            return loss

        start = time.perf_counter()
        if LORAHUB is not None:  # the library's LoraHub (CMA-ES)
            losses: list[float] = []

            def traced(combo, losses=losses):
                losses.append(few_shot_loss(combo))
                return losses[-1]

            found = LORAHUB(modules, traced, budget=evaluations, l1=L1, bounds=(-BOUND, BOUND), seed=seed)
            w = np.array([p.weight for p in found.card.lineage.parents])
            history = list(np.minimum.accumulate(losses))
        else:  # the in-script evolution strategy
            w, _, history = es_search(
                lambda v: few_shot_loss(merge(modules, method="task_arithmetic", weights=list(map(float, v)),
                                              lora="ab")) + L1 * float(np.abs(v).sum()),
                len(modules), evaluations, seed)
        seconds = time.perf_counter() - start
        uniform = [1.0 / len(modules)] * len(modules)
        r = {"seed": seed, "w": w.tolist(), "search_seconds": seconds, "history": history,
             "host": C.accuracy_of(model, None, imdb, head),
             "uniform ΔW (cat)": C.accuracy_of(model, merge(modules, method="task_arithmetic", weights=uniform,
                                                            lora="cat"), imdb, head),
             "uniform A/B (ab)": C.accuracy_of(model, merge(modules, method="task_arithmetic", weights=uniform,
                                                            lora="ab"), imdb, head),
             "LoraHub": C.accuracy_of(model, merge(modules, method="task_arithmetic", weights=w.tolist(),
                                                   lora="ab"), imdb, head)}
        out.append(r)
        print({k: v for k, v in r.items() if k != "history"}, flush=True)
    return out


def main(argv=None) -> dict:
    args = C.setup(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    if args.quick:
        seeds, n_upstream, n_test, shots, evaluations, epochs = (0,), 256, 150, 32, 16, 2.0
    else:
        seeds, n_upstream, n_test, shots, evaluations, epochs = (0, 1, 2, 3, 4), 400, 400, 32, 40, 2.0
    runs = run(seeds, n_upstream, n_test, shots, evaluations, epochs)
    contenders = ("host", "uniform ΔW (cat)", "uniform A/B (ab)", "LoraHub")
    rows = [[c, C.mean_std([r[c] for r in runs])] for c in contenders]
    table = C.markdown_table(["contender", f"IMDB accuracy ({len(runs)} few-shot samples)"], rows)
    wrows = [[r["seed"], *[f"{x:+.2f}" for x in r["w"]], f"{r['LoraHub']:.3f}"] for r in runs]
    wtable = C.markdown_table(["seed", *[f"w_{t}" for t in UPSTREAM], "LoraHub acc"], wrows)
    mean = {c: float(np.mean([r[c] for r in runs])) for c in contenders}
    wins_host = sum(r["LoraHub"] > r["host"] for r in runs)
    wins_uni = sum(r["LoraHub"] > max(r["uniform ΔW (cat)"], r["uniform A/B (ab)"]) for r in runs)
    verdict = (f"LoraHub {mean['LoraHub']:.3f} vs host {mean['host']:.3f} and uniform averages "
               f"{mean['uniform ΔW (cat)']:.3f} (ΔW) / {mean['uniform A/B (ab)']:.3f} (A/B); LoraHub beats the host in "
               f"{wins_host} and both uniform averages in {wins_uni} of {len(runs)} few-shot samples.")

    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(range(len(contenders)), [mean[c] for c in contenders],
                yerr=[np.std([r[c] for r in runs]) for c in contenders], capsize=4, color=["C7", "C1", "C2", "C0"])
    axes[0].set_xticks(range(len(contenders)), contenders, fontsize=8)
    axes[0].set(ylabel="IMDB test accuracy", title=f"unseen task, K = {shots} examples",
                ylim=(min(mean.values()) - 0.1, min(1.0, max(mean.values()) + 0.05)))
    for r in runs:
        axes[1].plot(r["history"], alpha=0.7, label=f"seed {r['seed']}")
    axes[1].set(xlabel="objective evaluations", ylabel="best so far", title="LoraHub search")
    axes[1].legend(fontsize=7)
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Upstream: {n_upstream} training examples per task, {epochs:g} epochs (lr 4e-3), seed 0. Few-shot seeds
{list(seeds)} (each: its own {shots} examples and search); {evaluations} objective evaluations per search, by
{"polymod's lorahub (CMA-ES)" if LORAHUB is not None else "the in-script evolution strategy"}. The search curve
plots the best few-shot loss{"" if LORAHUB is not None else " + L1"} so far.

{table}

Searched weights:

{wtable}

**Outcome.** {verdict}
"""
    C.write_report(args, "e4_lorahub", "E4 — LoraHub on an unseen task", body, fig, started)
    return {"mean": mean, "wins_host": wins_host, "wins_uniform": wins_uni, "runs": len(runs)}


if __name__ == "__main__":
    main()
