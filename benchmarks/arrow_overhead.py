"""Arrow forward overhead: polymod's Arrow and PEFT's Arrow against the bare host, libraries of 8 / 32 / 128 LoRAs.

Host: the benchmark Llama-like model (hidden 512, intermediate 1408) with 4
layers and an 8,000-word vocabulary (the head is not what is measured), fp32,
1 thread. A library of E LoRAs (r = 8, at q_proj and v_proj) with random
orthonormal factors and singular values 0.05·(1, 0.3, 0.15, …): a clear top
direction, so PEFT's 15-step power iteration converges and both route alike.
Token-level Arrow, top-k 3, temperature 1; a batch of 2 rows × 32 tokens (a
shared 2-core machine must run all three sizes in under 3 minutes).

For each library size the contenders — bare host, polymod Arrow, PEFT Arrow
(``create_arrow_model`` on the same LoRAs, written with ``write_peft``) — run
interleaved (one forward each per round, order rotated every round); each time
is the median over the rounds, of wall time and of process CPU time (on a
shared, oversubscribed machine one thread's CPU time is the steadier measure
of the work done). The script checks that polymod's and PEFT's
logits agree and records the machine's load average before and after (the
machine is shared: compare ratios within one run, not absolute times).

Run: ``python benchmarks/arrow_overhead.py [--rounds 7] [--sizes 8 32 128]``; writes
``benchmarks/results/arrow_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_hosts import llama_host

import polymod as pm
from polymod.interop.peft import write_peft

RESULTS = Path(__file__).parent / "results"
SITES = ("q_proj", "v_proj")


def library(host: torch.nn.Module, size: int, rank: int) -> tuple[pm.Modular, list[str]]:
    """A Modular on ``host`` with ``size`` random LoRAs at q_proj and v_proj."""
    model = pm.Modular(host)
    names = [f"m{i}" for i in range(size)]
    g = torch.Generator().manual_seed(size)
    sv = torch.tensor([1.0] + [0.3 / (i + 1) for i in range(rank - 1)]) * 0.05  # a clear top singular value
    for name in names:
        model.add(name, pm.LoRA(rank=rank, sites="|".join(f"*.{s}" for s in SITES)))
        with torch.no_grad():
            for _, part in model[name].items():
                qa, _ = torch.linalg.qr(torch.randn(part.A.shape[1], rank, generator=g))  # (D_in, r)
                qb, _ = torch.linalg.qr(torch.randn(part.B.shape[0], rank, generator=g))  # (D_out, r)
                part.A.copy_((qa * sv).t())
                part.B.copy_(qb)
    return model, names


def peft_arrow(bare: torch.nn.Module, model: pm.Modular, names: list[str], top_k: int, folder: Path):
    """PEFT's Arrow over the same LoRAs, on its own copy of the host."""
    from peft import ArrowConfig, create_arrow_model

    paths = [str(write_peft(model[n], folder / n)) for n in names]
    cfg = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0)
    return create_arrow_model(copy.deepcopy(bare), paths, cfg).eval()


def timed(contenders: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved rounds, order rotated each round; per-contender wall and process CPU times in seconds."""
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's Arrow")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()

    bare = llama_host(layers=4, vocab=8000)
    ids = torch.randint(0, 8000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    print(f"\nArrow top-{args.top_k}, LoRA r={args.rank} at {'/'.join(SITES)}, Llama-like host (hidden 512, 4 layers), "
          f"batch {args.batch}x{args.tokens}, fp32, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'modules':>7} {'contender':<16} {'median s':>9} {'x bare host':>12} {'CPU s':>9} {'CPU x bare':>10}")
    for size in args.sizes:
        host = copy.deepcopy(bare)
        model, names = library(host, size, args.rank)
        model.use(pm.Mix(names, router=pm.Arrow(top_k=args.top_k)))
        contenders = {"bare host": lambda: bare(input_ids=ids).logits,
                      "polymod Arrow": lambda h=host: h(input_ids=ids).logits}
        with tempfile.TemporaryDirectory() as tmp:
            twin = None if args.no_peft else peft_arrow(bare, model, names, args.top_k, Path(tmp))
        if twin is not None:
            contenders["PEFT Arrow"] = lambda t=twin: t(input_ids=ids).logits
        with torch.inference_mode():
            outputs = {k: f() for k, f in contenders.items()}  # warm-up (PEFT builds its prototypes here)
            times, cpu = timed(contenders, args.rounds)
        diff = (outputs["polymod Arrow"] - outputs["PEFT Arrow"]).abs().max().item() if twin is not None else None
        base, base_cpu = statistics.median(times["bare host"]), statistics.median(cpu["bare host"])
        for name, ts in times.items():
            med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
            rows.append({"modules": size, "contender": name, "median_s": med, "ratio_to_host": med / base,
                         "median_cpu_s": med_cpu, "cpu_ratio_to_host": med_cpu / base_cpu, "times_s": ts,
                         "cpu_s": cpu[name]})
            print(f"{size:>7} {name:<16} {med:>9.4f} {med / base:>12.3f} {med_cpu:>9.4f} {med_cpu / base_cpu:>10.3f}")
        if diff is not None:
            rows[-1]["max_abs_diff_vs_polymod"] = diff
            print(f"{'':>7} max |polymod - PEFT| logits: {diff:.2e}")
        del model, host, twin
    load_after = os.getloadavg()
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; "
          f"{time.perf_counter() - started:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "arrow_overhead", "config": vars(args), "rows": rows, "load_before": load_before,
           "load_after": load_after, "cpus": os.cpu_count(), "torch": torch.__version__,
           "machine": platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "arrow_overhead.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
