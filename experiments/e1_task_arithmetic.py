"""E1 — task arithmetic with LoRA task vectors (Ilharco et al., 2023, "Editing models with task arithmetic").

Claim (survey §6.1, parameter aggregation): a module's weight delta is a task
vector τ; subtracting it (θ − λτ) removes the task while a control task stays
within a few points, and adding two (θ + λ(τ_A + τ_B)) gives one model close to
both specialists. A random direction of the same norm per weight is the control
for "any perturbation this large hurts".

Design: host all-MiniLM-L6-v2 (frozen). As in Ilharco et al., every task has
a fixed zero-shot head — cosine similarity (× 20) to the host's embeddings of
class prompts such as "a positive movie review" (``common.PROMPTS``) — and a
LoRA module (r = 8 on the attention queries and values) is trained through that
frozen head. Every edited model is therefore evaluated with the same heads, so
accuracy changes come from the task vectors alone. Edits are made with ``pm.merge`` (task arithmetic with
negative or positive weights) and merged into the host for evaluation.
Tasks: A = Rotten Tomatoes sentiment (negated), B = language ID over six
chatterbot-corpus languages (control, and the second task for addition).
Normalised accuracy = accuracy / the task's own specialist's accuracy.
"""

from __future__ import annotations

import time

import common as C
import numpy as np
import torch

import polymod as pm
from polymod.merging.merge import merge

SCALES = (0.5, 1.0, 2.0)


def random_like(model: pm.Modular, module: pm.Module, seed: int) -> pm.Module:
    """A LoRA of the same rank and sites whose ΔW has, per site, the same Frobenius norm as ``module``'s."""
    model.add("random-direction", pm.LoRA(rank=module.spec.rank, sites=module.spec.sites))
    rand = model.remove("random-direction")
    gen = torch.Generator().manual_seed(seed)
    target = module.delta()
    with torch.no_grad():
        for site, part in rand.items():
            part.A.copy_(torch.randn(part.A.shape, generator=gen))
            part.B.copy_(torch.randn(part.B.shape, generator=gen))
            part.B.mul_(target[site].norm() / part.delta_weight().norm())
    return rand


def run_seed(seed: int, n_train: int, n_test: int, epochs: float) -> dict[str, float]:
    C.set_seed(seed)
    host = C.load_host()
    model = pm.Modular(host)
    a, b = (C.load_task(t, n_train, n_test, seed) for t in ("rt", "lang"))
    heads = {t.name: C.zero_shot_head(host, t.name) for t in (a, b)}
    spec = pm.LoRA(rank=8, sites="attn.q|attn.v")
    r: dict[str, float] = {}
    for t in (a, b):
        stats = C.train_module(model, t.name, spec, t, heads[t.name], epochs=epochs, seed=seed)
        r[f"loss first/{t.name}"], r[f"loss last/{t.name}"] = stats["loss_first"], stats["loss_last"]
    tau = {t.name: model.remove(t.name) for t in (a, b)}
    rand = random_like(model, tau["rt"], seed)

    def acc(module, task):
        return C.accuracy_of(model, module, task, heads[task.name])

    for t in (a, b):
        r[f"host/{t.name}"] = acc(None, t)
        r[f"specialist/{t.name}"] = acc(tau[t.name], t)
    r["specialist/lang-on-rt"] = acc(tau["lang"], a)
    r["specialist/rt-on-lang"] = acc(tau["rt"], b)
    for lam in SCALES:
        neg = merge({"rt": tau["rt"]}, method="task_arithmetic", weights=[-lam])
        neg_rand = merge({"random": rand}, method="task_arithmetic", weights=[-lam])
        for t in (a, b):
            r[f"negate {lam}/{t.name}"] = acc(neg, t)
            r[f"random {lam}/{t.name}"] = acc(neg_rand, t)
    for lam in (0.5, 1.0):
        added = merge(tau, method="task_arithmetic", weights=[lam, lam])
        for t in (a, b):
            r[f"add {lam}/{t.name}"] = acc(added, t)
    return r


def main(argv=None) -> dict:
    args = C.setup(__doc__.splitlines()[0], argv)
    started = time.perf_counter()
    seeds, n_train, n_test, epochs = ((0,), 320, 160, 2.0) if args.quick else ((0, 1, 2), 640, 300, 2.0)
    runs = [run_seed(s, n_train, n_test, epochs) for s in seeds]
    m = {k: [r[k] for r in runs] for k in runs[0]}

    def cell(k):
        return C.mean_std(m[k])

    def norm(k, task):  # accuracy normalised by the task's specialist, per seed
        return C.mean_std([x / s for x, s in zip(m[f"{k}/{task}"], m[f"specialist/{task}"])])

    rows = [["host (zero-shot heads)", cell("host/rt"), cell("host/lang"), norm("host", "rt"), norm("host", "lang")],
            ["specialist τ_rt", cell("specialist/rt"), cell("specialist/rt-on-lang"), "1", ""],
            ["specialist τ_lang", cell("specialist/lang-on-rt"), cell("specialist/lang"), "", "1"]]
    for lam in SCALES:
        rows.append([f"θ − {lam}·τ_rt", cell(f"negate {lam}/rt"), cell(f"negate {lam}/lang"),
                     norm(f"negate {lam}", "rt"), norm(f"negate {lam}", "lang")])
        rows.append([f"θ − {lam}·random (same norm)", cell(f"random {lam}/rt"), cell(f"random {lam}/lang"),
                     norm(f"random {lam}", "rt"), norm(f"random {lam}", "lang")])
    for lam in (0.5, 1.0):
        rows.append([f"θ + {lam}·(τ_rt + τ_lang)", cell(f"add {lam}/rt"), cell(f"add {lam}/lang"),
                     norm(f"add {lam}", "rt"), norm(f"add {lam}", "lang")])
    table = C.markdown_table(["model", "RT acc", "lang-ID acc", "RT normalised", "lang-ID normalised"], rows)

    mean = {k: float(np.mean(v)) for k, v in m.items()}
    drop_task = mean["host/rt"] - mean["negate 1.0/rt"]
    drop_rand = mean["host/rt"] - mean["random 1.0/rt"]
    drop_ctrl = mean["host/lang"] - mean["negate 1.0/lang"]
    add_norm = float(np.mean([mean[f"add 1.0/{t}"] / mean[f"specialist/{t}"] for t in ("rt", "lang")]))
    verdict = (f"At λ = 1, negating τ_rt moves RT accuracy from {mean['host/rt']:.3f} (host) to "
               f"{mean['negate 1.0/rt']:.3f} (drop {drop_task:+.3f}); the random direction of equal norm drops it by "
               f"{drop_rand:+.3f}; the control task (lang-ID) changes by {-drop_ctrl:+.3f}. Adding both task vectors "
               f"(λ = 1) keeps a mean normalised accuracy of {add_norm:.3f}.")

    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = (0.0, *SCALES)
    for key, style in (("negate", "-o"), ("random", "--s")):
        for task, colour in (("rt", "C0"), ("lang", "C1")):
            ys = [mean[f"host/{task}"]] + [mean[f"{key} {lam}/{task}"] for lam in SCALES]
            label = f"{'τ_rt' if key == 'negate' else 'random'} negated → {task}"
            axes[0].plot(xs, ys, style, color=colour, label=label)
    axes[0].set(xlabel="λ in θ − λ·v", ylabel="accuracy (fixed heads)", title="negation: target RT, control lang-ID")
    axes[0].legend(fontsize=8)
    labels = ["host", "τ_rt", "τ_lang", "θ+0.5Στ", "θ+1.0Στ"]
    rt = [mean["host/rt"], mean["specialist/rt"], mean["specialist/lang-on-rt"], mean["add 0.5/rt"], mean["add 1.0/rt"]]
    lang = [mean["host/lang"], mean["specialist/rt-on-lang"], mean["specialist/lang"], mean["add 0.5/lang"],
            mean["add 1.0/lang"]]
    x = np.arange(len(labels))
    axes[1].bar(x - 0.2, rt, 0.4, label="RT")
    axes[1].bar(x + 0.2, lang, 0.4, label="lang-ID")
    axes[1].set_xticks(x, labels)
    axes[1].set(ylabel="accuracy", title="addition", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Seeds: {list(seeds)} (module training and random direction); {n_train} training / {n_test} test examples per
task (class-balanced), LoRA trained {epochs:g} epochs with AdamW (lr 4e-3, linear
decay, batch 32), max length {C.MAX_LENGTH} tokens. Cells: mean ± std over seeds. Training loss (mean of the first
/ last 10 steps): RT {cell("loss first/rt")} → {cell("loss last/rt")}, lang-ID {cell("loss first/lang")} →
{cell("loss last/lang")}.

{table}

**Outcome.** {verdict}
"""
    C.write_report(args, "e1_task_arithmetic", "E1 — task arithmetic with LoRA task vectors", body, fig, started)
    return {"mean": mean, "drop_task": drop_task, "drop_random": drop_rand, "drop_control": drop_ctrl,
            "add_normalised": add_norm}


if __name__ == "__main__":
    main()
