"""E7 — a multi-task fine-tuned host vs a frozen host with task modules and routing, at equal budget.

Claim (survey §7/§8): instead of fine-tuning the whole host on a multi-task
mixture (the instruction-tuning recipe), one can keep the host frozen, train
one module per task and route among them; the modular system matches the
multi-task host on its training tasks without interference and reuses its
modules on held-out tasks.

Design: host all-MiniLM-L6-v2. Training tasks: Rotten Tomatoes sentiment, BBC
News topics, chatterbot language ID; held-out tasks: IMDB polarity and
chatterbot topics. Equal training budget: the same examples and the same
number of optimiser steps (batch 32) for both systems.

* multi-task host: every host weight fine-tuned (lr 1e-4) on batches cycling
  over the three tasks;
* modular host: the host frozen; one LoRA module per task (r = 8, queries and
  values, lr 4e-3), each trained for a third of the steps; on a training task
  the module is chosen by task id (``TaskRouter`` semantics).

Both train through the same fixed zero-shot head per task (cosine similarity
× 20 to the host's embeddings of class prompts, ``common.PROMPTS``), so the
heads cannot favour either system.

Held-out tasks get K = 64 labelled examples, and both systems fit a linear
probe on their features of those 64 examples. The modular system first routes
the new task: among the bare host, each of its three modules and their uniform
``Mix``, it picks the composition whose probe (fitted on 32 of the examples)
scores best on the other 32 — task-level routing by validation, using only the
same 64 examples. The frozen host with a probe is the reference.
"""

from __future__ import annotations

import itertools
import time

import common as C
import numpy as np
import torch

import polymod as pm
from polymod.compose import Mix

TRAIN, HELD_OUT = ("rt", "bbc", "lang"), ("imdb", "chat")


def multitask_host(tasks, steps: int, seed: int):
    C.set_seed(seed)
    host = C.load_host()
    heads = [C.zero_shot_head(host, t.name) for t in tasks]  # from the pretrained host, then fixed
    host.requires_grad_(True)
    opt = torch.optim.AdamW(list(host.parameters()), lr=1e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    streams = [itertools.cycle(list(t.train.batches(32, seed=seed))) for t in tasks]
    start = time.perf_counter()
    for step in range(steps):
        i = step % len(tasks)
        ids, mask, y = next(streams[i])
        loss = torch.nn.functional.cross_entropy(heads[i](host(ids, mask)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    host.requires_grad_(False)
    return host, heads, time.perf_counter() - start


def modular_host(tasks, steps: int, seed: int):
    host = C.load_host()
    model = pm.Modular(host)
    heads, seconds = [], 0.0
    per_task = steps // len(tasks)
    for t in tasks:
        head = C.zero_shot_head(host, t.name)
        stats = C.train_module(model, t.name, pm.LoRA(rank=8, sites="attn.q|attn.v"), t, head,
                               epochs=per_task / -(-len(t.train) // 32), lr=4e-3, seed=seed)
        model[t.name].requires_grad_(False)
        heads.append(head)
        seconds += stats["seconds"]
    model.use(None)
    return model, heads, seconds


def held_out_modular(model, task, seed: int) -> tuple[float, float, str]:
    """(probe on the frozen host, probe on the routed composition) accuracy, and the composition chosen.

    Task-level routing by validation: each candidate composition (the bare host, each module, the uniform
    Mix of all modules) gets a probe fitted on one half of the K examples and scored on the other half;
    the best is routed to, and its probe refitted on all K.
    """
    candidates = {"host": None, **{t: t for t in TRAIN}, "uniform Mix": Mix(list(TRAIN))}
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))
    fit, val = C.subset(task.train, order[: len(order) // 2]), C.subset(task.train, order[len(order) // 2:])
    scores = {}
    for name, comp in candidates.items():
        model.use(comp)
        head = C.fit_probe(C.features(model.host, fit), fit.labels, task.classes, seed=seed)
        scores[name] = C.accuracy(C.headed(model.host, head), val)
    chosen = max(candidates, key=lambda k: scores[k])  # ties: the earlier candidate (host first)
    results = []
    for name in ("host", chosen):
        model.use(candidates[name])
        head = C.fit_probe(C.features(model.host, task.train), task.train.labels, task.classes, seed=seed)
        results.append(C.accuracy(C.headed(model.host, head), task.test))
    model.use(None)
    return results[0], results[1], chosen


def run_seed(seed: int, n_train: int, n_test: int, shots: int, epochs: float) -> dict:
    tasks = [C.load_task(t, n_train, n_test, seed) for t in TRAIN]
    held = [C.load_task(t, shots, n_test, seed) for t in HELD_OUT]
    steps = round(epochs * sum(-(-len(t.train) // 32) for t in tasks))
    mt, mt_heads, mt_seconds = multitask_host(tasks, steps, seed)
    model, heads, mod_seconds = modular_host(tasks, steps, seed)
    r = {"steps": steps, "mt_seconds": mt_seconds, "mod_seconds": mod_seconds}
    for t, h_mt, h_mod in zip(tasks, mt_heads, heads):
        r[f"mt/{t.name}"] = C.accuracy(C.headed(mt, h_mt), t.test)
        model.use(t.name)
        r[f"modular/{t.name}"] = C.accuracy(C.headed(model.host, h_mod), t.test)
    model.use(None)
    for t in held:
        r[f"mt/{t.name}"] = C.accuracy(C.headed(mt, C.probe(mt, t, seed)), t.test)
        r[f"frozen/{t.name}"], r[f"modular/{t.name}"], r[f"route/{t.name}"] = held_out_modular(model, t, seed)
    return r


def main(argv=None) -> dict:
    args = C.setup(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    if args.quick:
        seeds, n_train, n_test, shots, epochs = (0,), 192, 120, 64, 2.0
    else:
        seeds, n_train, n_test, shots, epochs = (0, 1, 2), 320, 200, 64, 2.0
    runs = [run_seed(s, n_train, n_test, shots, epochs) for s in seeds]

    def ms(key):
        return C.mean_std([r[key] for r in runs])

    rows = [[f"{t} (training task)", "", ms(f"mt/{t}"), ms(f"modular/{t}")] for t in TRAIN]
    rows += [[f"{t} (held out, K = {shots})", ms(f"frozen/{t}"), ms(f"mt/{t}"), ms(f"modular/{t}")] for t in HELD_OUT]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if not k.startswith("route/")}
    routes = "; ".join(f"{t}: " + ", ".join(r[f"route/{t}"] for r in runs) for t in HELD_OUT)
    train_mt = float(np.mean([mean[f"mt/{t}"] for t in TRAIN]))
    train_mod = float(np.mean([mean[f"modular/{t}"] for t in TRAIN]))
    held_mt = float(np.mean([mean[f"mt/{t}"] for t in HELD_OUT]))
    held_mod = float(np.mean([mean[f"modular/{t}"] for t in HELD_OUT]))
    held_frozen = float(np.mean([mean[f"frozen/{t}"] for t in HELD_OUT]))
    rows.append(["mean, training tasks", "", f"{train_mt:.3f}", f"{train_mod:.3f}"])
    rows.append(["mean, held-out tasks", f"{held_frozen:.3f}", f"{held_mt:.3f}", f"{held_mod:.3f}"])
    table = C.markdown_table(["task", "frozen host + probe", "multi-task fine-tuned host", "frozen host + modules"],
                             rows)
    verdict = (f"Training tasks: multi-task host {train_mt:.3f} vs modular {train_mod:.3f}. Held-out tasks "
               f"(K = {shots}): multi-task host {held_mt:.3f} vs modular (routed by validation) {held_mod:.3f} "
               f"(frozen host alone {held_frozen:.3f}). Training time at equal steps: multi-task "
               f"{mean['mt_seconds']:.0f} s vs modular {mean['mod_seconds']:.0f} s.")

    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [*TRAIN, *HELD_OUT]
    x = np.arange(len(names))
    ax.bar(x - 0.27, [mean.get(f"frozen/{t}", np.nan) for t in names], 0.27, label="frozen host + probe", color="C7")
    ax.bar(x, [mean[f"mt/{t}"] for t in names], 0.27, label="multi-task fine-tuned host", color="C3")
    ax.bar(x + 0.27, [mean[f"modular/{t}"] for t in names], 0.27, label="frozen host + modules/routing", color="C0")
    ax.axvline(len(TRAIN) - 0.5, color="k", lw=0.8)
    ax.set_xticks(x, [*TRAIN, *[f"{t}\n(held out)" for t in HELD_OUT]])
    ax.set(ylabel="test accuracy", ylim=(0, 1), title=f"equal budget: {runs[0]['steps']} steps of 32")
    ax.legend(fontsize=8, loc="lower left")
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Seeds {list(seeds)}; {n_train} training / {n_test} test examples per task, {runs[0]['steps']} optimiser steps in
total for each system ({epochs:g} epochs of the mixture), max length {C.MAX_LENGTH}. Mean ± std over seeds.
Compositions the modular system routed the held-out tasks to, per seed — {routes}.

{table}

**Outcome.** {verdict}
"""
    C.write_report(args, "e7_multitask_vs_modular", "E7 — multi-task fine-tuned host vs modular host", body, fig,
                   started)
    return {"mean": mean, "train_mt": train_mt, "train_mod": train_mod, "held_mt": held_mt, "held_mod": held_mod,
            "held_frozen": held_frozen}


if __name__ == "__main__":
    main()
