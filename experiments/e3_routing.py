"""E3 — routing (survey §4): a learned task-level router and token-level top-k with load balancing.

Claims: (a) a learned task-level router (Polytropon, Ponti et al., 2023) puts
most of each task's weight on the module that fits the task; (b) a token-level
top-k Mix trained without the load-balancing loss concentrates the load on few
experts, and with the Switch Transformer's balancing loss (Fedus et al., 2022,
coefficient 0.01) the load evens out at similar accuracy.

Design (host all-MiniLM-L6-v2, frozen; tasks Rotten Tomatoes sentiment, BBC
News topics, chatterbot language ID, each with a fixed zero-shot head: cosine
similarity × 20 to the host's embeddings of class prompts, ``common.PROMPTS``):

(a) one LoRA module per task (r = 8, queries and values) is trained through
its task's head; the three are then frozen and only a
``Mix([rt, bbc, lang], router=Polytropon(n_tasks=3))`` router is trained, on
batches of one task at a time with ``model.route(task=t)``. We report, per
task, the share of the router's weight (evaluation mode: normalised sigmoid of
the task's logits, averaged over the 12 sites) on each module, and accuracy
against the uniform average of the three modules and the task's own module.

(b) four fresh LoRA experts (r = 4, queries and values) under
``Mix([e0..e3], router=TopK(k=1, level="token", balance_coef=c))`` are trained
together with the gates on the same three tasks (one task per batch, its fixed
head), with c = 0 and c = 0.01; everything else (z-loss 0.001, seeds, data,
steps) is equal. Load statistics come from ``model.routing_stats()`` over the
three test sets: max expert share and the entropy of the load distribution
(nats; uniform over four experts = ln 4 = 1.386).
"""

from __future__ import annotations

import itertools
import math
import time

import common as C
import numpy as np
import torch

import polymod as pm
from polymod.compose import Mix
from polymod.routing import Polytropon, TopK

TASKS = ("rt", "bbc", "lang")


def cycle_tasks(model, tasks, heads, steps: int, params, lr: float, seed: int, aux: bool = False) -> float:
    """Train ``params`` on batches cycling over the tasks, each routed with its task id; returns seconds."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.0)
    streams = [itertools.cycle(list(t.train.batches(32, seed=seed))) for t in tasks]
    start = time.perf_counter()
    for step in range(steps):
        i = step % len(tasks)
        ids, mask, y = next(streams[i])
        with model.route(task=i):
            loss = torch.nn.functional.cross_entropy(heads[i](model.host(ids, mask)), y)
            extra = model.aux_loss() if aux else None
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def routed_accuracy(model, task, head, task_id: int) -> float:
    with model.route(task=task_id):
        return C.accuracy(C.headed(model.host, head), task.test)


def polytropon_part(seed: int, tasks, heads, host, epochs: float, router_steps: int) -> dict[str, float]:
    model = pm.Modular(host)
    for t, head in zip(tasks, heads):
        C.train_module(model, t.name, pm.LoRA(rank=8, sites="attn.q|attn.v"), t, head, epochs=epochs, seed=seed)
        model[t.name].requires_grad_(False)
    r: dict[str, float] = {}
    for t, head in zip(tasks, heads):
        model.use(t.name)
        r[f"own/{t.name}"] = C.accuracy(C.headed(host, head), t.test)
    model.use(Mix([t.name for t in tasks]))  # uniform weights 1/3 (Static router)
    for t, head in zip(tasks, heads):
        r[f"uniform/{t.name}"] = C.accuracy(C.headed(host, head), t.test)
    router = Polytropon(n_tasks=len(tasks))
    model.use(Mix([t.name for t in tasks], router=router))
    C.set_seed(seed)
    router.train()
    r["router_seconds"] = cycle_tasks(model, tasks, heads, router_steps, router.parameters(), 5e-2, seed)
    router.eval()
    for i, (t, head) in enumerate(zip(tasks, heads)):
        router.stats.reset()
        r[f"routed/{t.name}"] = routed_accuracy(model, t, head, i)
        load = router.stats.summary()["load"]
        for u in tasks:
            r[f"weight/{t.name}->{u.name}"] = load[u.name]
    model.detach()
    return r


def topk_part(seed: int, tasks, heads, balance: float, steps: int) -> dict[str, float]:
    C.set_seed(seed)
    host = C.load_host()
    model = pm.Modular(host)
    experts = [f"e{i}" for i in range(4)]
    for e in experts:
        model.add(e, pm.LoRA(rank=4, sites="attn.q|attn.v"))
    router = TopK(k=1, level="token", balance_coef=balance)
    model.use(Mix(experts, router=router))
    router.train()
    seconds = cycle_tasks(model, tasks, heads, steps, list(model.trainable_parameters()), 3e-3, seed, aux=True)
    router.eval()
    router.stats.reset()
    r = {"seconds": seconds}
    for i, (t, head) in enumerate(zip(tasks, heads)):
        r[f"acc/{t.name}"] = routed_accuracy(model, t, head, i)
    load = np.array(list(router.stats.summary()["load"].values()))
    r["max_share"] = float(load.max())
    r["entropy"] = float(-(load * np.log(np.clip(load, 1e-12, None))).sum())
    r["mean_acc"] = float(np.mean([r[f"acc/{t.name}"] for t in tasks]))
    for e, v in zip(experts, load):
        r[f"load/{e}"] = float(v)
    return r


def main(argv=None) -> dict:
    args = C.setup(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    if args.quick:
        seeds, n_train, n_test, epochs, router_steps, topk_steps = (0,), 256, 120, 2.0, 15, 24
    else:
        seeds, n_train, n_test, epochs, router_steps, topk_steps = (0, 1, 2), 320, 200, 2.0, 30, 36
    poly, topk = [], {0.0: [], 0.01: []}
    for seed in seeds:
        C.set_seed(seed)
        host = C.load_host()
        tasks = [C.load_task(t, n_train, n_test, seed) for t in TASKS]
        heads = [C.zero_shot_head(host, t.name) for t in tasks]
        poly.append(polytropon_part(seed, tasks, heads, host, epochs, router_steps))
        for balance in topk:
            topk[balance].append(topk_part(seed, tasks, heads, balance, topk_steps))

    def ms(runs, key):
        return C.mean_std([r[key] for r in runs])

    rows_a = [[t] + [ms(poly, f"weight/{t}->{u}") for u in TASKS]
              + [ms(poly, f"own/{t}"), ms(poly, f"uniform/{t}"), ms(poly, f"routed/{t}")] for t in TASKS]
    table_a = C.markdown_table(["task \\ weight on", *TASKS, "own module acc", "uniform Mix acc", "Polytropon acc"],
                               rows_a)
    rows_b = [[f"balance_coef = {b:g}", ms(runs, "max_share"), ms(runs, "entropy"), ms(runs, "mean_acc")]
              + [ms(runs, f"acc/{t}") for t in TASKS] for b, runs in topk.items()]
    table_b = C.markdown_table(["top-1 token routing", "max expert share", "load entropy (nats)", "mean acc",
                                *[f"{t} acc" for t in TASKS]], rows_b)
    diag = float(np.mean([[r[f"weight/{t}->{t}"] for t in TASKS] for r in poly]))
    right = sum(all(r[f"weight/{t}->{t}"] == max(r[f"weight/{t}->{u}"] for u in TASKS) for t in TASKS) for r in poly)
    share = {b: float(np.mean([r["max_share"] for r in runs])) for b, runs in topk.items()}
    ent = {b: float(np.mean([r["entropy"] for r in runs])) for b, runs in topk.items()}
    acc = {b: float(np.mean([r["mean_acc"] for r in runs])) for b, runs in topk.items()}
    verdict = (f"(a) Polytropon puts on average {diag:.3f} of a task's weight on that task's own module (uniform: "
               f"{1 / len(TASKS):.3f}); the own module has the largest weight for every task in {right} of "
               f"{len(poly)} seeds. (b) Top-1 token routing: without the balancing loss the busiest expert takes "
               f"{share[0.0]:.3f} of the load (entropy {ent[0.0]:.3f}), with it {share[0.01]:.3f} (entropy "
               f"{ent[0.01]:.3f}); mean accuracy {acc[0.0]:.3f} vs {acc[0.01]:.3f}.")

    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mat = np.array([[np.mean([r[f"weight/{t}->{u}"] for r in poly]) for u in TASKS] for t in TASKS])
    im = axes[0].imshow(mat, vmin=0, vmax=1, cmap="viridis")
    for i, j in itertools.product(range(3), range(3)):
        axes[0].text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", color="w" if mat[i, j] < 0.6 else "k")
    axes[0].set_xticks(range(3), TASKS)
    axes[0].set_yticks(range(3), TASKS)
    axes[0].set(xlabel="module", ylabel="task id", title="(a) Polytropon weights per task")
    fig.colorbar(im, ax=axes[0])
    width = 0.38
    for k, (b, runs) in enumerate(topk.items()):
        loads = np.mean([[r[f"load/e{i}"] for i in range(4)] for r in runs], axis=0)
        axes[1].bar(np.arange(4) + (k - 0.5) * width, loads, width, label=f"balance_coef={b:g}")
    axes[1].axhline(0.25, color="k", lw=0.8, ls=":")
    axes[1].set_xticks(range(4), [f"e{i}" for i in range(4)])
    axes[1].set(ylabel="share of tokens", title="(b) top-1 token load per expert", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Seeds {list(seeds)}; {n_train} training / {n_test} test examples per task; task modules trained {epochs:g}
epochs (lr 4e-3); the Polytropon router {router_steps} steps (AdamW lr 5e-2, relaxed Bernoulli τ = 1 in training);
the top-k experts and gates {topk_steps} steps (lr 3e-3). Batch 32, max length
{C.MAX_LENGTH}. Mean ± std over seeds.

(a) Polytropon: share of each task's weight on each module, and accuracy.

{table_a}

(b) Token-level top-1 Mix of four LoRA experts.

{table_b}

**Outcome.** {verdict}
"""
    C.write_report(args, "e3_routing", "E3 — learned routing: Polytropon and top-k load balancing", body, fig, started)
    return {"diag": diag, "right": right, "seeds": len(poly), "share": share, "entropy": ent, "acc": acc,
            "uniform_entropy": math.log(4)}


if __name__ == "__main__":
    main()
