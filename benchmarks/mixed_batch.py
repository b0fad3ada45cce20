"""Mixed batches: one LoRA module per row, N distinct modules in a batch of 32 rows.

Host: a Llama-like model built from a config (hidden 512, 8 layers,
intermediate 1408, vocab 32000 — the same host as ``lora_overhead.py``), fp32;
LoRA r=8 on every linear layer but the output head (role ``linear``). 32 rows,
row i uses module i mod N, N ∈ {1, 8, 32}; two workloads: prefill-like (64
tokens per row) and decode-like (1 token per row, no cache).

Contenders, interleaved (one call each per round, order rotated every round),
median over the rounds:

* **bare host** — the host alone;
* **polymod** — ``with model.route(rows): host(input_ids)``: rows grouped once
  per call, gather + bmm at every site. Each round permutes the rows, so the
  per-call plan (grouping) is built anew every time;
* **PEFT** — ``peft_model(input_ids, adapter_names=rows)``, PEFT's mixed batch;
* **sequential** — one host call per row with its module active (``model.use``).

Also a token-level top-2 ``Mix`` of 8 LoRA experts (``TopK(k=2)``, one gate per
site) as a ratio to the bare host. polymod's and PEFT's modules hold the same
weights; the script reports the largest |polymod − PEFT| logit difference.

Run: ``python benchmarks/mixed_batch.py [--rounds 5] [--threads 2]``; prints the
table and writes ``benchmarks/results/mixed_batch.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_hosts import llama_host

import polymod as pm
from polymod.compose import Mix
from polymod.routing import TopK

RESULTS = Path(__file__).parent / "results"
MODULES = 32


def build_host(vocab: int) -> torch.nn.Module:
    """The Llama-like benchmark host (see bench_hosts.llama_host)."""
    return llama_host(vocab=vocab)


def peft_twin(host: torch.nn.Module, model: pm.Modular, names: list[str]) -> torch.nn.Module:
    """A PEFT model on a copy of ``host`` with one adapter per polymod module, same A and B."""
    from peft import LoraConfig, get_peft_model

    first = model[names[0]]
    targets = sorted({s.rsplit(".", 1)[-1] for s in first.sites})
    part = next(iter(first.parts.values()))
    cfg = LoraConfig(r=part.rank, lora_alpha=part.rank * part.scaling, target_modules=targets, lora_dropout=0.0)
    twin = get_peft_model(copy.deepcopy(host), cfg, adapter_name=names[0])
    for name in names[1:]:
        twin.add_adapter(name, cfg)
    layers = dict(twin.named_modules())
    with torch.no_grad():
        for name in names:
            for site, p in model[name].items():
                layer = layers[f"base_model.model.{site}"]
                layer.lora_A[name].weight.copy_(p.A)
                layer.lora_B[name].weight.copy_(p.B)
    return twin.eval()


def interleaved(contenders: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call for each contender, ``rounds`` calls each, order rotated every round."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            start = time.perf_counter()
            contenders[name](r)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workloads", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    parser.add_argument("--no-sequential", action="store_true", help="skip the per-row sequential contender")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bare = build_host(args.vocab)
    host = copy.deepcopy(bare)
    model = pm.Modular(host)
    names = [f"m{i}" for i in range(MODULES)]
    for name in names:
        model.add(name, pm.LoRA(rank=8, sites="linear"))
        with torch.no_grad():
            for p in model[name].parameters():
                p.normal_(0, 0.02)
    peft = peft_twin(bare, model, names)
    experts = [f"x{i}" for i in range(8)]
    moe_host = copy.deepcopy(bare)
    moe = pm.Modular(moe_host)
    for name in experts:
        moe.add(name, pm.LoRA(rank=8, sites="linear"))
        with torch.no_grad():
            for p in moe[name].parameters():
                p.normal_(0, 0.02)
    moe.use(Mix(experts, router=TopK(k=2)))

    results = []
    with torch.inference_mode():
        for workload, length in [(w, args.prefill if w == "prefill" else 1) for w in args.workloads]:
            ids = torch.randint(0, args.vocab, (args.rows, length), generator=torch.Generator().manual_seed(1))
            for n in args.distinct:
                rows = [names[i % n] for i in range(args.rows)]
                results.append(measure_mixed(bare, host, model, peft, ids, rows, args) | {
                    "workload": workload, "tokens": length, "distinct": n})
            times = interleaved({"bare host": lambda r, ids=ids: bare(input_ids=ids, use_cache=False),
                                 "top-2 of 8": lambda r, ids=ids: moe_host(input_ids=ids, use_cache=False)},
                                args.rounds)
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append({"workload": workload, "tokens": length, "distinct": "top-2 of 8 (token level)",
                            "median_s": med, "ratio_to_host": {k: v / med["bare host"] for k, v in med.items()},
                            "times_s": times})
    report(results, args)


def measure_mixed(bare: torch.nn.Module, host: torch.nn.Module, model: pm.Modular, peft: torch.nn.Module,
                  ids: torch.Tensor, base_rows: list[str], args: argparse.Namespace) -> dict:
    """Interleaved timings of the mixed-batch contenders; rows permuted every round (fresh grouping)."""
    perms = [random.Random(r).sample(range(len(base_rows)), len(base_rows)) for r in range(args.rounds)]

    def rows_of(r: int) -> tuple[torch.Tensor, list[str]]:
        perm = perms[r % len(perms)]
        return ids[perm], [base_rows[i] for i in perm]

    def run_bare(r: int) -> torch.Tensor:
        return bare(input_ids=rows_of(r)[0], use_cache=False).logits

    def run_polymod(r: int) -> torch.Tensor:
        x, rows = rows_of(r)
        with model.route(rows):
            return host(input_ids=x, use_cache=False).logits

    def run_peft(r: int) -> torch.Tensor:
        x, rows = rows_of(r)
        return peft(input_ids=x, adapter_names=rows, use_cache=False).logits

    def run_sequential(r: int) -> torch.Tensor:
        x, rows = rows_of(r)
        outs = []
        for i, name in enumerate(rows):
            model.use(name)
            outs.append(host(input_ids=x[i : i + 1], use_cache=False).logits)
        model.use(None)
        return torch.cat(outs)

    contenders = {"bare host": run_bare, "polymod": run_polymod, "PEFT": run_peft}
    if not args.no_sequential:
        contenders["sequential"] = run_sequential
    check = {k: f(0) for k, f in contenders.items()}  # warm-up, and outputs on the same rows
    times = interleaved(contenders, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "ratio_to_host": {k: v / med["bare host"] for k, v in med.items()}, "times_s": times,
            "max_abs_diff_vs_peft": (check["polymod"] - check["PEFT"]).abs().max().item(),
            "max_abs_effect_of_modules": (check["polymod"] - check["bare host"]).abs().max().item(),
            "max_abs_diff_vs_sequential": (check["polymod"] - check["sequential"]).abs().max().item()
            if "sequential" in check else None}


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\nMixed batch, Llama-like host (hidden 512, 8 layers, vocab {args.vocab}), LoRA r=8 on all linear "
          f"layers, {args.rows} rows, fp32, {args.threads} threads, median of {args.rounds} interleaved rounds")
    head = (f"{'workload':<8} {'N':>5} {'bare s':>8} {'polymod':>8} {'PEFT':>8} {'sequential':>10} "
            f"{'seq/polymod':>11} {'|Δ PEFT|':>9}")
    print(head)
    for row in results:
        ratio, med = row["ratio_to_host"], row["median_s"]
        if "polymod" not in ratio:
            print(f"{row['workload']:<8} {'top-2 of 8 experts (token level)':>30}: {ratio['top-2 of 8']:.3f} x "
                  f"bare ({med['bare host']:.4f} s bare)")
            continue
        seq = ratio.get("sequential")
        speed = f"{med['sequential'] / med['polymod']:>11.1f}" if seq else f"{'-':>11}"
        print(f"{row['workload']:<8} {row['distinct']:>5} {med['bare host']:>8.4f} {ratio['polymod']:>8.3f} "
              f"{ratio['PEFT']:>8.3f} {'-' if seq is None else round(seq, 3):>10} {speed} "
              f"{row['max_abs_diff_vs_peft']:>9.1e}")
    print("(polymod, PEFT, sequential: time as a multiple of the bare host's; seq/polymod: speed-up over sequential)")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "mixed_batch", "config": vars(args), "rows": results, "torch": torch.__version__,
           "machine": platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "mixed_batch.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
