"""How long running rows stall while newcomers are prefilled: the scheduler alone, chunked prefill on and off.

Host: SmolLM2-135M's architecture with random weights (``serve_load.py``),
fp32, 1 torch thread; M LoRAs r=8 on every linear layer. ``--running`` rows
decode (each with a random one of the M modules); then ``--joining`` requests
with ``--prompt``-token prompts arrive at once and the scheduler steps until
they have joined and ``--after`` more steps ran. Every step produces one token
for each running row, so a step's duration is the running rows' inter-token
latency at that moment. Reported per ``--prefill-chunk`` value: the longest
step (the stall), the median step, the steps and seconds until the newcomers'
first token, in wall and CPU time (CPU time is what a loaded machine distorts
least; wall time is what a client sees).

Run: ``python benchmarks/serve_stall.py [--chunks 0,32,64,128]``; writes
``benchmarks/results/serve_stall.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import polymod as pm
from polymod.serving.batching import Request, Scheduler, _Row
from polymod.serving.sampling import Sampling
from polymod.serving.text import TextStream

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import SITES, IdTokenizer, smollm2_host  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _row(prompt: list[int], route: str, new: int) -> _Row:
    req = Request(prompt, route, 1, new, [Sampling.make(0.0, 1.0, None)], [], sink=lambda ev: None)
    req._open = 1
    return _Row(req, 0, TextStream(IdTokenizer(), []))


def measure(model: pm.Modular, chunk: int, args: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    """Steps before, during and after one group of newcomers joins, with ``chunk`` prompt tokens per step."""
    sched = Scheduler(model, IdTokenizer(), set(), max_batch=args.running + args.joining, prefill_chunk=chunk)

    def prompt() -> list[int]:
        return [rng.randrange(100, 49000) for _ in range(args.prompt)]

    routes = [f"m{i}" for i in range(args.modules)]
    sched.step([_row(prompt(), rng.choice(routes), 10**6) for _ in range(args.running)])
    for _ in range(2):
        sched.step([])
    joining = [_row(prompt(), rng.choice(routes), 10**6) for _ in range(args.joining)]
    new, walls, cpus, joined = joining, [], [], None
    while joined is None or len(walls) < joined + args.after:
        w, c = time.perf_counter(), time.process_time()
        sched.step(new)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        new = []
        if joined is None and joining[0].generated:
            joined = len(walls)
    return {"chunk": chunk, "max_step_s": max(walls), "median_step_s": statistics.median(walls),
            "max_step_cpu_s": max(cpus), "median_step_cpu_s": statistics.median(cpus), "steps_to_join": joined,
            "to_first_token_s": sum(walls[:joined]), "to_first_token_cpu_s": sum(cpus[:joined])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", default="0,32,64,128", help="values of --prefill-chunk (0: whole prompts)")
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--running", type=int, default=4)
    parser.add_argument("--joining", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--after", type=int, default=4, help="steps measured after the newcomers joined")
    args = parser.parse_args()
    torch.set_num_threads(1)
    host = smollm2_host()
    model = pm.Modular(host)
    for i in range(args.modules):
        model.add(f"m{i}", pm.LoRA(rank=8, sites=SITES))
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model[f"m{i}"].parameters():
                p.normal_(0, 0.02)
    rows = [measure(model, int(c), args, random.Random(0)) for c in args.chunks.split(",")]
    print("| prefill chunk | longest step s (CPU s) | median step s (CPU s) | steps to join | to first token s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chunk'] or 'whole'} | {r['max_step_s']:.2f} ({r['max_step_cpu_s']:.2f}) | "
              f"{r['median_step_s']:.2f} ({r['median_step_cpu_s']:.2f}) | {r['steps_to_join']} | "
              f"{r['to_first_token_s']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_stall.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
