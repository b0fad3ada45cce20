"""Merged LoRAs stay small: the storage of a TIES merge of two rank-8 LoRAs, exact and within error bounds.

Two rank-8 LoRAs on the query and value projections of a MiniLM-shaped BERT
(hidden 384, 6 layers: 12 sites of 384 x 384; random host weights, no download)
with random A and B (B non-zero, as after training), merged by TIES at density
0.2. Reported: the bytes of each representation of the merged ΔW (dense,
exact sparse, LoRA at the smallest rank meeting each ``max_rel_error``), the
size of the saved ``weights.safetensors``, the rank chosen and the measured
worst relative Frobenius error over the sites. Writes
``benchmarks/results/merge_lora_size.json``.

    .venv/bin/python benchmarks/merge_lora_size.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import transformers as tf

import polymod as pm
from polymod.merging.merge import merge

ROOT = Path(__file__).resolve().parent.parent
BOUNDS = (0.05, 0.1, 0.2, 0.3, 0.5)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=1000)
    model = pm.Modular(tf.BertForSequenceClassification(cfg).eval())
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=8, alpha=16, sites="attn.q|attn.v"))
        with torch.no_grad():
            for _, part in model[name].items():
                part.A.copy_(torch.randn(part.A.shape, generator=g) * 0.05)
                part.B.copy_(torch.randn(part.B.shape, generator=g) * 0.05)
    inputs = {"a": model["a"], "b": model["b"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def saved(module, tag: str) -> int:
            pm.save(module, Path(tmp) / tag)
            return (Path(tmp) / tag / "weights.safetensors").stat().st_size

        rows.append({"representation": "input LoRA (rank 8)", "file_bytes": saved(model["a"], "a")})
        exact = merge(inputs, "ties", density=0.2, result="dense")
        rows.append({"representation": "dense delta (result='dense')", "file_bytes": saved(exact, "dense"),
                     "max_rel_error": 0.0})
        auto = merge(inputs, "ties", density=0.2)
        rows.append({"representation": f"auto: {auto.kind} (exact)", "file_bytes": saved(auto, "auto"),
                     "max_rel_error": 0.0, "bytes": auto.card.metrics["representation"]["value"]})
        for bound in BOUNDS:
            low = merge(inputs, "ties", density=0.2, max_rel_error=bound)
            rep = low.card.metrics["representation"]
            rows.append({"representation": f"max_rel_error={bound}: {low.kind}"
                                            + (f" rank {rep['rank']}" if low.kind == "lora" else ""),
                         "file_bytes": saved(low, f"b{bound}"), "max_rel_error": rep["measured_rel_error"],
                         "bytes": rep["value"], "rank_needed": rep["rank_needed"], "lora_bytes": rep["lora_bytes"]})
    for r in rows:
        r["ratio_to_input"] = round(r["file_bytes"] / rows[0]["file_bytes"], 2)
    out = ROOT / "benchmarks/results/merge_lora_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": "TIES density 0.2 of two rank-8 LoRAs, 12 sites of 384x384", "rows": rows,
                               "torch": torch.__version__}, indent=2) + "\n")
    print(f"{'representation':40s} {'file bytes':>12s} {'x input':>8s} {'max rel err':>12s}")
    for r in rows:
        err = r.get("max_rel_error")
        print(f"{r['representation']:40s} {r['file_bytes']:12d} {r['ratio_to_input']:8.2f} "
              f"{'' if err is None else f'{err:.3f}':>12s}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
