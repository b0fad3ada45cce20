"""Prompt and prefix tuning overhead: polymod and PEFT against the bare host, forward and training step.

Host: a Llama-like model built from a config (hidden 512, 4 layers, 8 query / 4
key-value heads, intermediate 1408, vocab 8000), fp32; prompt tuning with 20
soft tokens, prefix tuning with 10 prefix positions (the kinds' defaults); a
batch of 4 rows × 64 tokens. A prompt makes every forward process 20 more
tokens in both libraries, so the fair comparison is polymod against PEFT; the
ratio to the bare host shows that inherent cost.

The contenders run interleaved (one call each per round, the order rotated
every round) and each time is the median over the rounds, so machine noise hits
all of them alike. Both wall-clock and process CPU time are recorded; on a
shared machine the CPU time (summed over the process's threads) is the less
noisy of the two, and the table shows it; one thread (the default) avoids
OpenMP spin-waits that count as CPU time when threads wait for cores.
polymod's and PEFT's modules hold the same weights, and the script checks
that their logits agree.

Run: ``python benchmarks/prompt_prefix.py [--rounds 31] [--threads 1] [--device cpu]``; writes
``benchmarks/results/prompt_prefix.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import polymod as pm
from polymod.modules.prefix import PrefixTuning
from polymod.modules.prompt import PromptTuning

RESULTS = Path(__file__).parent / "results"
VOCAB = 8000


def build_host() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1408, vocab_size=VOCAB, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def polymod_twin(bare: torch.nn.Module, spec: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(host, part): a copy of ``bare`` with the module attached and active."""
    host = copy.deepcopy(bare)
    model = pm.Modular(host)
    model.add("m", spec)
    model.use("m")
    return host, model["m"].part("<input>")


def peft_twin(bare: torch.nn.Module, kind: str, part: torch.nn.Module) -> torch.nn.Module:
    """A PEFT prompt- or prefix-tuning model on a copy of ``bare`` holding ``part``'s weights."""
    import peft

    if kind == "prompt":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=part.prompt.shape[0])
    else:
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=part.length)
    twin = peft.get_peft_model(copy.deepcopy(bare), cfg).eval()
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(part.prompt if kind == "prompt" else part.prefix)
    return twin


def median_times(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Interleaved timing: one call per contender per round, the order rotated every round.

    Returns, per contender, the wall-clock (``wall``) and process CPU (``cpu``) seconds of every round.
    """
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in contenders}
    order = list(contenders)
    for fn in contenders.values():  # warm-up
        fn()
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bare = build_host().to(args.device)
    hosts = {k: polymod_twin(bare, s) for k, s in (("prompt", PromptTuning()), ("prefix", PrefixTuning()))}
    with torch.no_grad():
        hosts["prefix"][1].prefix.mul_(0.1)  # keys of the scale of real ones
    peft_models = {k: peft_twin(bare, k, part) for k, (_, part) in hosts.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.batch, args.tokens), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask}
    forward = {"bare host": lambda: bare(**batch).logits,
               "polymod prompt": lambda: hosts["prompt"][0](**batch).logits,
               "PEFT prompt": lambda: peft_models["prompt"](**batch).logits,
               "polymod prefix": lambda: hosts["prefix"][0](**batch).logits,
               "PEFT prefix": lambda: peft_models["prefix"](**batch).logits}

    def step(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> Callable[[], None]:
        def run() -> None:
            loss = model(**batch, labels=ids).loss
            loss.backward()
            for p in params:
                p.grad = None
        return run

    train = {"polymod prompt": step(hosts["prompt"][0], list(hosts["prompt"][1].parameters())),
             "PEFT prompt": step(peft_models["prompt"], [p for p in peft_models["prompt"].parameters()
                                                         if p.requires_grad]),
             "polymod prefix": step(hosts["prefix"][0], list(hosts["prefix"][1].parameters())),
             "PEFT prefix": step(peft_models["prefix"], [p for p in peft_models["prefix"].parameters()
                                                         if p.requires_grad])}

    with torch.inference_mode():
        outputs = {k: f() for k, f in forward.items()}
        fwd = median_times(forward, args.rounds)
    diffs = {k: (outputs[f"polymod {k}"] - outputs[f"PEFT {k}"]).abs().max().item() for k in ("prompt", "prefix")}
    for module in (*[h for h, _ in hosts.values()], *peft_models.values()):
        module.train()
    trn = median_times(train, args.rounds)

    base = statistics.median(fwd["bare host"]["cpu"])
    rows = []
    print(f"\nLlama-like host (hidden 512, 4 layers, 8/4 heads, vocab {VOCAB}), batch {args.batch}x{args.tokens}, "
          f"{args.device}, fp32, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'mode':<8} {'contender':<16} {'CPU s':>8} {'wall s':>8} {'x bare host':>12} {'x PEFT':>8}")
    for mode, times in (("forward", fwd), ("train", trn)):
        for name, ts in times.items():
            med, wall = statistics.median(ts["cpu"]), statistics.median(ts["wall"])
            peer = f"PEFT {name.split()[-1]}"
            vs_peft = med / statistics.median(times[peer]["cpu"]) if name.startswith("polymod") else None
            rows.append({"mode": mode, "contender": name, "median_cpu_s": med, "median_wall_s": wall,
                         "ratio_to_host": med / base if mode == "forward" else None,
                         "ratio_to_peft": vs_peft, "cpu_s": ts["cpu"], "wall_s": ts["wall"]})
            ratio = f"{med / base:>12.3f}" if mode == "forward" else f"{'':>12}"
            peft_col = "" if vs_peft is None else f"{vs_peft:>8.3f}"
            print(f"{mode:<8} {name:<16} {med:>8.4f} {wall:>8.4f} {ratio} {peft_col}")
    print(f"max |polymod - PEFT| logits: prompt {diffs['prompt']:.2e}, prefix {diffs['prefix']:.2e}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "prompt_prefix", "config": vars(args), "rows": rows, "max_abs_diff_vs_peft": diffs,
           "torch": torch.__version__, "machine": platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "prompt_prefix.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
