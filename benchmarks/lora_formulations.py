"""Batched LoRA formulations at one site: which one polymod's mixers use, and why.

One linear site of the mixed-batch host (D_in 512 → D_out 1408, r = 8), 32 rows.
For per-example routing (one module per row, E distinct modules) the contenders are

* **gather + bmm** — stack A (E+1, r, D_in) and sBᵀ (E+1, r, D_out), gather one slice
  per row, ``bmm`` then ``baddbmm`` (polymod's choice for row groups);
* **concatenated rank** — x (A₁;…;A_E)ᵀ, mask each module's r columns by the row's
  one-hot weight, one ``addmm`` against (s₁B₁ … s_E B_E)ᵀ (cost grows with E);
* **segment** — rows sorted by module, one ``mm`` pair per module on its rows, then
  ``index_copy`` (a loop over E);
* **PEFT loop** — PEFT's mixed batch: per module, ``y[rows] += B(A(x[rows]))·s``.

For token-level soft/top-k routing over 8 experts: **concatenated rank** (dense
weights) against **segment** over (token, expert) assignments.

Run: ``python benchmarks/lora_formulations.py [--threads 1]``; prints medians (ms)
and writes ``benchmarks/results/lora_formulations.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"


def timed(fns: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds per call, interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(2):
        for f in fns.values():
            f()
    for r in range(rounds):
        order = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
        for k in order:
            start = time.perf_counter()
            fns[k]()
            times[k].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def example_level(rows: int, tokens: int, num: int, d_in: int, d_out: int, rank: int, rounds: int) -> dict:
    x = torch.randn(rows, tokens, d_in)
    y = torch.randn(rows, tokens, d_out)
    a = torch.randn(num + 1, rank, d_in) * 0.02  # (E+1, r, D_in), slot E zero
    bt = torch.randn(num + 1, rank, d_out) * 0.02  # (E+1, r, D_out)
    a[num] = 0
    bt[num] = 0
    idx = torch.arange(rows) % num  # (B,)
    a_cat, bt_cat = a[:num].reshape(-1, d_in), bt[:num].reshape(-1, d_out)  # (E·r, D)
    onehot = F.one_hot(idx, num).float().repeat_interleave(rank, -1).unsqueeze(1)  # (B, 1, E·r)
    order = torch.argsort(idx, stable=True)
    groups = [(e, (idx == e).nonzero().squeeze(1)) for e in range(num)]

    def gather_bmm():
        h = torch.bmm(x, a.index_select(0, idx).transpose(1, 2))  # (B, T, r)
        return torch.baddbmm(y, h, bt.index_select(0, idx))  # (B, T, D_out)

    def concat_rank():
        h = F.linear(x, a_cat) * onehot  # (B, T, E·r)
        return torch.addmm(y.reshape(-1, d_out), h.reshape(-1, num * rank), bt_cat).view_as(y)

    def segment():
        pieces = [torch.mm(torch.mm(x[rows_e].reshape(-1, d_in), a[e].t()), bt[e]) for e, rows_e in groups]
        delta = torch.cat(pieces).view(-1, tokens, d_out)  # rows in module order
        return y + torch.zeros_like(y).index_copy(0, order, delta)

    size = max(int((idx == e).sum()) for e in range(num))
    slots = torch.full((num, size), rows, dtype=torch.long)  # (E, m): rows per module, padded with a zero row
    for e, rows_e in groups:
        slots[e, : rows_e.numel()] = rows_e
    where = torch.empty(rows, dtype=torch.long)
    where[slots[slots < rows]] = (slots < rows).flatten().nonzero().squeeze(1)

    def grouped_bmm():
        xs = torch.cat([x, x.new_zeros(1, tokens, d_in)]).index_select(0, slots.flatten())  # (E·m, T, D_in)
        h = torch.bmm(xs.view(num, -1, d_in), a[:num].transpose(1, 2))  # (E, m·T, r)
        d = torch.bmm(h, bt[:num]).view(-1, tokens, d_out)  # (E·m, T, D_out)
        return y + d.index_select(0, where)

    def peft_loop():
        out = y.clone()
        for e, rows_e in groups:
            out[rows_e] += F.linear(F.linear(x[rows_e], a[e]), bt[e].t())
        return out

    ref = gather_bmm()
    for f in (concat_rank, segment, peft_loop, grouped_bmm):
        torch.testing.assert_close(f(), ref, rtol=1e-4, atol=1e-5)
    return timed({"gather+bmm": gather_bmm, "grouped bmm": grouped_bmm, "concat-rank": concat_rank,
                  "segment": segment, "PEFT loop": peft_loop}, rounds)


def token_topk(rows: int, tokens: int, num: int, k: int, d_in: int, d_out: int, rank: int, rounds: int) -> dict:
    x = torch.randn(rows * tokens, d_in)
    y = torch.randn(rows * tokens, d_out)
    a = torch.randn(num, rank, d_in) * 0.02
    bt = torch.randn(num, rank, d_out) * 0.02
    probs = torch.softmax(torch.randn(rows * tokens, num), -1)
    top_p, top_i = probs.topk(k, -1)  # (N, k)
    w = torch.zeros_like(probs).scatter(-1, top_i, top_p)  # (N, E)
    a_cat, bt_cat = a.reshape(-1, d_in), bt.reshape(-1, d_out)

    def concat_rank():
        h = F.linear(x, a_cat) * w.repeat_interleave(rank, -1)  # (N, E·r)
        return torch.addmm(y, h, bt_cat)

    def segment():
        out = y.clone()
        for e in range(num):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if tok.numel():
                d = torch.mm(torch.mm(x[tok], a[e].t()), bt[e]) * top_p[tok, slot].unsqueeze(-1)
                out.index_add_(0, tok, d)
        return out

    torch.testing.assert_close(segment(), concat_rank(), rtol=1e-4, atol=1e-5)
    return timed({"concat-rank": concat_rank, "segment": segment}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"config": vars(args), "example_level": [], "token_top2_of_8": []}
    print(f"one site 512 -> 1408, r = 8, 32 rows, {args.threads} thread(s); median ms of {args.rounds} rounds")
    for tokens in (64, 1):
        for num in (8, 32):
            ms = example_level(32, tokens, num, 512, 1408, 8, args.rounds)
            out["example_level"].append({"tokens": tokens, "modules": num, "ms": ms})
            listed = ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
            print(f"per-example, {tokens:>2} tokens/row, E={num:>2}: {listed}")
        ms = token_topk(32, tokens, 8, 2, 512, 1408, 8, args.rounds)
        out["token_top2_of_8"].append({"tokens": tokens, "ms": ms})
        print(f"token top-2 of 8, {tokens:>2} tokens/row:     " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_formulations.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
