"""E5 — merging methods as the number of merged tasks grows (survey §6.1, parameter aggregation).

Claim: merging N task modules into one loses accuracy to interference as N
grows; the interference-aware methods (TIES: trim, elect signs, disjoint mean —
Yadav et al., 2023; DARE: random drop and rescale — Yu et al., 2024) lose less
than plain weight averaging and task arithmetic (Ilharco et al., 2023).

Design: host all-MiniLM-L6-v2 (frozen); six real tasks, each with a fixed
zero-shot head (cosine similarity × 20 to the host's embeddings of class
prompts, ``common.PROMPTS``, as CLIP heads in Ilharco et al.) and a LoRA module
(r = 8, attention queries and values) trained through that frozen head: Rotten Tomatoes and
IMDB sentiment, BBC News topics (5), BBC tech-vs-rest, chatterbot topics (6),
chatterbot language ID (6). For N = 2 … 6 the first N tasks of a per-seed task
order are merged with ``pm.merge`` and the one merged module is evaluated on
each of them with that task's fixed head. Score: normalised accuracy =
accuracy / the task's own module's accuracy, averaged over the N tasks.

Hyper-parameters are fixed a priori, not tuned on the test sets: average =
``linear`` (w = 1/N); task arithmetic λ = 0.5 per task vector; TIES density 0.2,
λ = 1 (the TIES paper's defaults); DARE (``dare_linear``) density 0.1, i.e.
drop rate 0.9, rescaled by 1/0.1, then task arithmetic with λ = 0.5.
"""

from __future__ import annotations

import random
import time

import common as C
import numpy as np

import polymod as pm
from polymod.merging.merge import merge

TASKS = ("rt", "bbc", "lang", "chat", "imdb", "bbc_tech")
METHODS = {
    "average": dict(method="linear"),
    "task arithmetic": dict(method="task_arithmetic", scale=0.5),
    "TIES": dict(method="ties", density=0.2),
    "DARE": dict(method="dare_linear", density=0.1, scale=0.5),
}


def merged(modules: dict, recipe: dict, seed: int) -> pm.Module:
    recipe = dict(recipe)
    scale = recipe.pop("scale", None)
    weights = [scale] * len(modules) if scale is not None else None
    return merge(modules, weights=weights, seed=seed, **recipe)


def run_seed(seed: int, n_train: int, n_test: int, epochs: float, tasks: tuple[str, ...]) -> dict[str, float]:
    order = list(tasks)
    if seed:
        random.Random(seed).shuffle(order)
    C.set_seed(seed)
    host = C.load_host()
    model = pm.Modular(host)
    data = {t: C.load_task(t, n_train, n_test, seed) for t in order}
    heads = {t: C.zero_shot_head(host, t) for t in order}
    modules = {}
    for t in order:
        C.train_module(model, t, pm.LoRA(rank=8, sites="attn.q|attn.v"), data[t], heads[t], epochs=epochs, seed=seed)
        modules[t] = model.remove(t)
    r: dict[str, float] = {}
    for t in order:
        r[f"host/{t}"] = C.accuracy_of(model, None, data[t], heads[t])
        r[f"specialist/{t}"] = C.accuracy_of(model, modules[t], data[t], heads[t])
    for n in range(2, len(order) + 1):
        chosen = {t: modules[t] for t in order[:n]}
        r[f"host/N={n}"] = float(np.mean([r[f"host/{t}"] / r[f"specialist/{t}"] for t in chosen]))
        for name, recipe in METHODS.items():
            module = merged(chosen, recipe, seed)
            scores = [C.accuracy_of(model, module, data[t], heads[t]) / r[f"specialist/{t}"] for t in chosen]
            r[f"{name}/N={n}"] = float(np.mean(scores))
    r["order"] = ",".join(order)
    return r


def main(argv=None) -> dict:
    args = C.setup(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    if args.quick:
        seeds, n_train, n_test, epochs, tasks = (0,), 320, 100, 2.0, TASKS[:3]
    else:
        seeds, n_train, n_test, epochs, tasks = (0, 1, 2), 400, 120, 2.0, TASKS
    runs = [run_seed(s, n_train, n_test, epochs, tasks) for s in seeds]
    ns = list(range(2, len(tasks) + 1))
    rows = []
    for name in ("host", *METHODS):
        rows.append([name if name != "host" else "host (no module)"]
                    + [C.mean_std([r[f"{name}/N={n}"] for r in runs]) for n in ns])
    table = C.markdown_table(["method \\ N merged", *[str(n) for n in ns]], rows)
    spec_rows = [[t, C.mean_std([r[f"host/{t}"] for r in runs]), C.mean_std([r[f"specialist/{t}"] for r in runs])]
                 for t in tasks]
    spec_table = C.markdown_table(["task", "host, zero-shot head", "own LoRA module"], spec_rows)
    mean = {f"{name}/N={n}": float(np.mean([r[f"{name}/N={n}"] for r in runs])) for name in ("host", *METHODS)
            for n in ns}
    last = ns[-1]
    ranking = sorted(METHODS, key=lambda k: -mean[f"{k}/N={last}"])
    verdict = (f"At N = {last}: " + ", ".join(f"{k} {mean[f'{k}/N={last}']:.3f}" for k in ranking)
               + f" (host without modules {mean[f'host/N={last}']:.3f}). From N = 2 to N = {last}: "
               + ", ".join(f"{k} {mean[f'{k}/N=2']:.3f} → {mean[f'{k}/N={last}']:.3f}" for k in METHODS) + ".")

    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in ("host", *METHODS):
        ys = [mean[f"{name}/N={n}"] for n in ns]
        errs = [np.std([r[f"{name}/N={n}"] for r in runs]) for n in ns]
        ax.errorbar(ns, ys, yerr=errs, marker="o", capsize=3, linestyle="--" if name == "host" else "-",
                    label="host (no module)" if name == "host" else name)
    ax.set(xlabel="number of merged task modules N", ylabel="mean normalised accuracy",
           title="merging LoRA task modules (MiniLM, fixed heads)")
    ax.set_xticks(ns)
    ax.legend(fontsize=8)
    orders = "; ".join(f"seed {s}: {r['order']}" for s, r in zip(seeds, runs))
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Seeds {list(seeds)} (each: its own task order, modules and DARE masks); {n_train} training / {n_test}
test examples per task, LoRA trained {epochs:g} epochs (AdamW, lr 4e-3, batch 32), max length
{C.MAX_LENGTH} tokens.
Task orders — {orders}. Cells: mean ± std over seeds.

Mean normalised accuracy of the merged module over the N merged tasks:

{table}

Per-task accuracy (normalisers):

{spec_table}

**Outcome.** {verdict}
"""
    C.write_report(args, "e5_merging", "E5 — merging methods vs number of merged tasks", body, fig, started)
    return {"mean": mean, "ns": ns}


if __name__ == "__main__":
    main()
