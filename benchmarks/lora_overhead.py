"""LoRA forward overhead: polymod (unmerged, merged) and PEFT against the bare host.

Host: a Llama-like model built from a config (hidden 512, 8 layers, intermediate
1408, vocab 32000), fp32, 2 threads; LoRA r=8 on every linear layer except the
output head (PEFT's ``all-linear``); a batch of 32 rows × 64 tokens.

The contenders run interleaved (one forward each per round, the order rotated
every round) and each time is the median over the rounds, so machine noise hits
all of them alike. Each contender owns its host copy and nothing touches it
between its calls (merging or unmerging inside the loop would warm the merged
contender's weights in the caches just before it is timed). polymod's and
PEFT's modules hold the same weights, and the script checks their logits agree.

Run: ``python benchmarks/lora_overhead.py [--rounds 7]``; writes
``benchmarks/results/lora_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_hosts import llama_host

import polymod as pm

RESULTS = Path(__file__).parent / "results"


def build_host(vocab: int = 32000) -> torch.nn.Module:
    """The Llama-like benchmark host (see bench_hosts.llama_host)."""
    return llama_host(vocab=vocab)


def peft_twin(host: torch.nn.Module, ours: pm.Module) -> torch.nn.Module:
    """A PEFT LoRA model on a copy of ``host`` holding exactly ``ours``'s A and B."""
    from peft import LoraConfig, get_peft_model

    names = sorted({s.rsplit(".", 1)[-1] for s in ours.sites})
    part = next(iter(ours.parts.values()))
    cfg = LoraConfig(r=part.rank, lora_alpha=part.rank * part.scaling, target_modules=names, lora_dropout=0.0)
    twin = get_peft_model(copy.deepcopy(host), cfg).eval()
    layers = dict(twin.named_modules())
    with torch.no_grad():
        for site, p in ours.items():
            layer = layers[f"base_model.model.{site}"]
            layer.lora_A["default"].weight.copy_(p.A)
            layer.lora_B["default"].weight.copy_(p.B)
    return twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bare = build_host()
    host = copy.deepcopy(bare)
    model = pm.Modular(host)
    model.add("lora", pm.LoRA(rank=8, sites="linear"))
    with torch.no_grad():
        for p in model["lora"].parameters():
            p.normal_(0, 0.02)
    model.use("lora")
    merged = pm.Modular(copy.deepcopy(bare))  # its own host copy, merged once, never toggled
    merged.add("lora", pm.LoRA(rank=8, sites="linear"))
    merged["lora"].load_state_dict(model["lora"].state_dict())
    merged.use("lora")
    merged.merge_into_host("lora")
    peft = peft_twin(bare, model["lora"])
    ids = torch.randint(0, 32000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))

    def run_bare():
        return bare(input_ids=ids).logits

    def run_unmerged():
        return host(input_ids=ids).logits

    def run_merged():
        return merged.host(input_ids=ids).logits

    def run_peft():
        return peft(input_ids=ids).logits

    contenders = {"bare host": run_bare, "polymod unmerged": run_unmerged, "polymod merged": run_merged,
                  "PEFT unmerged": run_peft}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.inference_mode():
        outputs = {k: f() for k, f in contenders.items()}  # warm-up and parity outputs
        order = list(contenders)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                fn = contenders[name]
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    diff_peft = (outputs["polymod unmerged"] - outputs["PEFT unmerged"]).abs().max().item()
    diff_merged = (outputs["polymod unmerged"] - outputs["polymod merged"]).abs().max().item()
    base = statistics.median(times["bare host"])
    rows = []
    print(f"\nLoRA r=8 on all linear layers, Llama-like host (hidden 512, 8 layers), batch {args.batch}x{args.tokens}, "
          f"fp32, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'contender':<20} {'median s':>9} {'x bare host':>12}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"contender": name, "median_s": med, "ratio_to_host": med / base, "times_s": ts})
        print(f"{name:<20} {med:>9.4f} {med / base:>12.3f}")
    print(f"max |polymod - PEFT| logits: {diff_peft:.2e}; max |unmerged - merged|: {diff_merged:.2e}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "lora_overhead", "config": vars(args), "rows": rows, "max_abs_diff_vs_peft": diff_peft,
           "max_abs_diff_merged": diff_merged, "torch": torch.__version__, "machine": platform.machine(),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "lora_overhead.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
