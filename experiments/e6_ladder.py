"""E6 — the cost/quality ladder of computation functions (survey §3) on a real model and real text.

Claim: parameter-efficient modules reach much of full fine-tuning's accuracy
while training a small fraction of the parameters; the ladder orders them by
what they cost (trainable parameters, training time, memory) and what they buy.

Design: host all-MiniLM-L6-v2 (22.7M parameters) as a mean-pooled sentence
encoder; task Rotten Tomatoes sentence polarity. Every method trains its module
plus a new linear head (lr 3e-3) for the same number of steps on the same
examples, in the same order, with AdamW and a linear decay. Module learning
rates are each method's usual order of magnitude, raised for a short budget
and fixed a priori (not tuned on this test set): prompt tuning 5e-2 (20 soft
tokens), prefix tuning 2e-2 (10 key/value prefixes per layer), IA³ 2e-2 (keys,
values, FFN output input), LoRA 4e-3 (r = 8 on queries and values), bottleneck
adapter 2e-3 (Pfeiffer placement, reduction 16), sparse fine-tuning 2e-3
(random 1% of every linear weight), full fine-tuning 1e-4 (every host weight).

Memory: each method runs in its own child process; "peak memory" is the
child's peak resident set size (``ru_maxrss``) minus its resident size after
loading the host and data and before training — the extra memory training
takes (parameters, gradients, optimiser state, activations), measured by the
OS, not by torch. Training time is wall time of the training loop only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common as C
import numpy as np
import torch

import polymod as pm
from polymod.modules import IA3, Adapter, PrefixTuning, PromptTuning, SparseFT

METHODS = {  # name -> (spec or None for full fine-tuning, module learning rate)
    "prompt tuning": (lambda: PromptTuning(length=20), 5e-2),
    "prefix tuning": (lambda: PrefixTuning(length=10), 2e-2),
    "IA³": (lambda: IA3(), 2e-2),
    "LoRA r=8": (lambda: pm.LoRA(rank=8, sites="attn.q|attn.v"), 4e-3),
    "adapter": (lambda: Adapter(placement="pfeiffer"), 2e-3),
    "sparse FT 1%": (lambda: SparseFT(density=0.01), 2e-3),
    "full fine-tuning": (None, 1e-4),
}
HEAD_LR = 3e-3


def worker(method: str, seeds: list[int], n_train: int, n_test: int, epochs: float) -> dict:
    """Train ``method`` once per seed in this process; report accuracy, time, parameters and peak memory."""
    torch.set_num_threads(2)
    make, lr = METHODS[method]
    task = C.load_task("rt", n_train, n_test, seed=0)
    out = {"acc": [], "seconds": [], "loss_last": []}
    base = None
    for seed in seeds:
        C.set_seed(seed)
        host = C.load_host()
        base = C.rss_mb() if base is None else base  # host and data loaded, nothing trained yet
        head = torch.nn.Linear(host.config.hidden_size, task.classes)
        if make is None:
            host.requires_grad_(True)
            params = list(host.parameters())
            out["trainable"] = sum(p.numel() for p in params)
        else:
            model = pm.Modular(host)
            report = model.add("module", make())
            model.use("module")
            params = list(model.trainable_parameters())
            out["trainable"] = report.trainable_parameters
        stats = C.train_loop([{"params": params, "lr": lr}, {"params": list(head.parameters()), "lr": HEAD_LR}],
                             C.headed(host, head), task.train, epochs, lr, seed=seed)
        out["acc"].append(C.accuracy(C.headed(host, head), task.test))
        out["seconds"].append(stats["seconds"])
        out["loss_last"].append(stats["loss_last"])
    out["host"] = sum(p.numel() for p in host.parameters())
    out["peak_mb"] = C.peak_rss_mb() - base
    return out


def main(argv=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--worker")
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    if known.worker:
        cfg = json.loads(known.config)
        print("RESULT " + json.dumps(worker(known.worker, **cfg)))
        return {}
    args = C.setup(__doc__.splitlines()[0], rest)
    started = time.perf_counter()
    cfg = {"seeds": [0], "n_train": 256, "n_test": 200, "epochs": 2.0} if args.quick else \
        {"seeds": [0, 1, 2], "n_train": 400, "n_test": 400, "epochs": 2.0}
    results = {}
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--worker", method, "--config", json.dumps(cfg)],
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
        results[method] = json.loads(line[0][len("RESULT "):])
        print(method, results[method], flush=True)

    rows = []
    for method, r in results.items():
        rows.append([method, C.mean_std(r["acc"]), f"{r['trainable']:,}", f"{100 * r['trainable'] / r['host']:.3f}%",
                     f"{np.mean(r['seconds']):.1f}", f"{r['peak_mb']:.0f}"])
    table = C.markdown_table(["method", "RT accuracy", "trainable params (module)", "% of host", "train time (s)",
                              "peak memory over baseline (MiB)"], rows)
    best = max((k for k in results if k != "full fine-tuning"), key=lambda k: np.mean(results[k]["acc"]))
    full = np.mean(results["full fine-tuning"]["acc"])
    verdict = (f"Full fine-tuning reaches {full:.3f}; the best module is {best} at "
               f"{np.mean(results[best]['acc']):.3f}. Share of full fine-tuning's accuracy: "
               + ", ".join(f"{k} {np.mean(r['acc']) / full:.2f}" for k, r in results.items()) + ".")

    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (method, r) in enumerate(results.items()):
        axes[0].errorbar(r["trainable"], np.mean(r["acc"]), yerr=np.std(r["acc"]), fmt="o", color=f"C{i}",
                         capsize=3, label=method)
        axes[1].scatter(np.mean(r["seconds"]), r["peak_mb"], color=f"C{i}", label=method)
        axes[1].annotate(method, (np.mean(r["seconds"]), r["peak_mb"]), fontsize=7)
    axes[0].set(xscale="log", xlabel="trainable parameters (log)", ylabel="RT test accuracy", title="quality vs size")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="training time (s)", ylabel="peak RSS over baseline (MiB)", title="cost")
    steps = round(cfg["epochs"] * -(-cfg["n_train"] // 32))
    body = f"""{__doc__.split(chr(10), 1)[1].strip()}

Seeds {cfg['seeds']}; {cfg['n_train']} training / {cfg['n_test']} test sentences (class-balanced), batch 32,
{cfg['epochs']:g} epochs = {steps} steps, max length {C.MAX_LENGTH} tokens, 2 threads. Accuracy: mean ± std over
seeds; time: mean per seed. Timings depend on the machine and its load (see the last line): compare them within
this table only.

{table}

**Outcome.** {verdict}
"""
    C.write_report(args, "e6_ladder", "E6 — the cost/quality ladder", body, fig, started)
    return results


if __name__ == "__main__":
    main()
