"""IA³ and LoRA in polymod vs PEFT vs the bare host: forward time and training-step time.

Host: a Llama-like model built from a config (hidden 512, 8 layers, 8 heads,
intermediate 1408, vocab 32000), fp32, 2 threads, a batch of 8 rows × 64 tokens.
Modules: IA³ on its default sites (keys, values and the FFN intermediate
activation) and LoRA r=8 on the query and value projections; polymod's and
PEFT's modules hold the same weights, and the script checks their logits
agree. On this gated FFN, down(act(gate x) ⊙ up x), polymod scales the
intermediate activation at up_proj's output and PEFT at down_proj's input —
the same vector, the same function. Two more polymod rows: IA³ merged into the
host, and IA³ with PEFT's placement (``gated_ffn="down"``), which pays one
extra matrix product per layer because a forward hook sees down_proj's input
only after the layer ran.

* forward: ``host(input_ids).logits`` under ``torch.inference_mode``;
* training step: forward with ``labels`` (causal-LM loss), backward, AdamW step
  on the module's parameters. The bare host's "training step" is forward +
  backward to its input embeddings (the backward pass every module pays) with
  no optimiser step.

Every contender has its own copy of the host. They run interleaved (one call
each per round, the order rotated every round); each time is the median over
the rounds, so machine noise hits all of them alike.

Both wall time and process CPU time are reported; ratios use CPU time, which
other processes on a shared machine stretch far less. OpenMP's wait policy is
set to passive (unless the environment says otherwise) so that threads waiting
for a descheduled sibling sleep instead of spinning, which would count as CPU
time.

Run: ``python benchmarks/kinds_peft.py [--rounds 7]``; writes
``benchmarks/results/kinds_peft.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import torch  # noqa: E402
from bench_hosts import llama_host  # noqa: E402

import polymod as pm  # noqa: E402
from polymod.modules.ia3 import IA3  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build_host(vocab: int = 32000) -> torch.nn.Module:
    """The Llama-like benchmark host (see bench_hosts.llama_host)."""
    return llama_host(vocab=vocab)


def polymod_model(bare: torch.nn.Module, spec: object) -> tuple[torch.nn.Module, pm.Module, pm.Modular]:
    """A copy of ``bare`` with one randomised polymod module built from ``spec``, active."""
    host = copy.deepcopy(bare)
    model = pm.Modular(host)
    model.add("m", spec)
    with torch.no_grad():
        for p in model["m"].parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if spec.kind == "ia3" else 0.02 * torch.randn_like(p))
    model.use("m")
    return host, model["m"], model


def peft_site(site: str, scales_input: bool) -> tuple[str, bool]:
    """PEFT's default placement of one polymod IA³ site: (site, is_feedforward).

    polymod puts a gated FFN's vector at ``up_proj``'s output, PEFT at ``down_proj``'s input:
    the same vector and the same function, down(act(gate x) ⊙ up x).
    """
    if not scales_input and site.endswith(".mlp.up_proj"):
        return site.removesuffix("up_proj") + "down_proj", True
    return site, scales_input


def peft_twin(bare: torch.nn.Module, ours: pm.Module) -> torch.nn.Module:
    """A PEFT model on a copy of ``bare`` holding exactly ``ours``'s weights (IA³ at PEFT's placement, or LoRA)."""
    import peft

    if ours.kind == "ia3":
        where = {site: peft_site(site, p.scales_input) for site, p in ours.items()}
        cfg = peft.IA3Config(target_modules=[s for s, _ in where.values()],
                             feedforward_modules=[s for s, ff in where.values() if ff])
    else:
        where = {site: (site, False) for site in ours.sites}
        part = next(iter(ours.parts.values()))
        cfg = peft.LoraConfig(r=part.rank, lora_alpha=part.rank * part.scaling, target_modules=list(ours.sites),
                              lora_dropout=0.0)
    twin = peft.get_peft_model(copy.deepcopy(bare), cfg).eval()
    with torch.no_grad():
        for site, p in ours.items():
            layer = twin.base_model.model.get_submodule(where[site][0])
            if ours.kind == "ia3":
                layer.ia3_l["default"].copy_(p.scale.view(layer.ia3_l["default"].shape))
            else:
                layer.lora_A["default"].weight.copy_(p.A)
                layer.lora_B["default"].weight.copy_(p.B)
    return twin


def train_step(model: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor) -> Callable[[], None]:
    """One optimiser step of the causal-LM loss on ``params`` (or a bare forward+backward when empty)."""
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()

    def step() -> None:
        if opt is None:
            x = embed(ids).detach().requires_grad_()
            model(inputs_embeds=x, labels=ids).loss.backward()
            return
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU times of each contender over ``rounds`` rounds, the order rotated every round.

    CPU time (``time.process_time``, all threads) is the steadier measure on a shared machine: other
    processes stretch wall time but do not add CPU time to this one.
    """
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


PEERS = {"polymod IA3": "PEFT IA3", "polymod IA3 down": "PEFT IA3", "polymod LoRA": "PEFT LoRA"}


def summarise(times: dict[str, dict[str, list[float]]]) -> list[dict[str, object]]:
    """Per contender: median wall and CPU seconds, CPU-time ratios to the bare host and to the PEFT peer."""
    med = {k: {m: statistics.median(v[m]) for m in ("wall", "cpu")} for k, v in times.items()}
    rows = []
    for name, m in med.items():
        peer = PEERS.get(name)
        rows.append({"contender": name, "wall_s": m["wall"], "cpu_s": m["cpu"],
                     "cpu_x_host": m["cpu"] / med["bare host"]["cpu"],
                     "wall_x_host": m["wall"] / med["bare host"]["wall"],
                     "cpu_x_peft": m["cpu"] / med[peer]["cpu"] if peer else None,
                     "wall_x_peft": m["wall"] / med[peer]["wall"] if peer else None,
                     "wall_times_s": times[name]["wall"], "cpu_times_s": times[name]["cpu"]})
    return rows


def print_table(title: str, rows: list[dict[str, object]]) -> None:
    print(f"\n{title}")
    print(f"{'contender':<20} {'wall s':>8} {'cpu s':>8} {'cpu x host':>11} {'cpu x PEFT':>11} {'wall x PEFT':>12}")
    for r in rows:
        print(f"{r['contender']:<20} {r['wall_s']:>8.3f} {r['cpu_s']:>8.3f} {r['cpu_x_host']:>11.3f} "
              f"{_cell(r['cpu_x_peft'], 11)} {_cell(r['wall_x_peft'], 12)}")


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bare = build_host().requires_grad_(False)
    ids = torch.randint(0, 32000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    hosts: dict[str, torch.nn.Module] = {"bare host": bare}
    trainable: dict[str, list[torch.nn.Parameter]] = {"bare host": []}
    modules: dict[str, pm.Module] = {}
    for label, spec in (("IA3", IA3()), ("LoRA", pm.LoRA(rank=8, sites="attn.q|attn.v"))):
        host, module, _ = polymod_model(bare, spec)
        twin = peft_twin(bare, module)
        hosts[f"polymod {label}"], trainable[f"polymod {label}"] = host, list(module.parameters())
        hosts[f"PEFT {label}"] = twin
        trainable[f"PEFT {label}"] = [p for p in twin.parameters() if p.requires_grad]
        modules[label] = module
    # IA³ with PEFT's placement on the gated FFN: the input of down_proj, the same vectors.
    down_host, down_module, _ = polymod_model(bare, IA3(gated_ffn="down"))
    with torch.no_grad():
        for site, part in down_module.items():
            part.scale.copy_(modules["IA3"].part(site.replace("down_proj", "up_proj")).scale)
    hosts["polymod IA3 down"], trainable["polymod IA3 down"] = down_host, list(down_module.parameters())
    merged_host = copy.deepcopy(bare)  # a fresh copy: a deep copy of a hooked host would copy its hooks too
    merged = pm.Modular(merged_host)
    merged.add("m", copy.deepcopy(modules["IA3"]))
    merged.merge_into_host("m")

    with torch.inference_mode():
        logits = {k: h(input_ids=ids).logits for k, h in hosts.items()}
        logits["polymod IA3 merged"] = merged_host(input_ids=ids).logits
    diffs = {"IA3 vs PEFT": (logits["polymod IA3"] - logits["PEFT IA3"]).abs().max().item(),
             "IA3 down vs PEFT": (logits["polymod IA3 down"] - logits["PEFT IA3"]).abs().max().item(),
             "IA3 merged vs unmerged": (logits["polymod IA3"] - logits["polymod IA3 merged"]).abs().max().item(),
             "LoRA vs PEFT": (logits["polymod LoRA"] - logits["PEFT LoRA"]).abs().max().item()}
    del logits

    forwards = {k: (lambda h=h: h(input_ids=ids).logits) for k, h in hosts.items()}
    forwards["polymod IA3 merged"] = lambda: merged_host(input_ids=ids).logits
    with torch.inference_mode():
        fwd = interleaved(forwards, args.rounds)
    steps = {k: train_step(h, trainable[k], ids) for k, h in hosts.items()}
    trn = interleaved(steps, args.rounds)

    fwd_rows, trn_rows = summarise(fwd), summarise(trn)
    setting = (f"Llama-like host (hidden 512, 8 layers, vocab 32000), batch {args.batch}x{args.tokens}, fp32, "
               f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    print_table(f"forward — {setting}", fwd_rows)
    print_table("training step (forward + backward + AdamW step; bare host: forward + backward only)", trn_rows)
    print("max |logits difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "kinds_peft", "config": vars(args), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "forward": fwd_rows, "train_step": trn_rows,
           "max_abs_logit_diff": diffs,
           "torch": torch.__version__, "machine": platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "kinds_peft.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
