"""Streaming checkpoint merge: polymod vs mergekit on the same recipes, in one run.

Generates a base and three fine-tunes of a Llama-like model (default: hidden
1024, 12 layers, intermediate 2560, vocabulary 32,000, untied head: 210M
parameters, fp32, 0.84 GB each, sharded safetensors) in a temporary directory,
writes mergekit recipes — ``ties`` (base + 3, density 0.2), ``slerp`` (base +
one fine-tune, mergekit's gradient-and-filter ``t``) and ``passthrough`` (a
frankenmerge stacking layers 0–7 of one fine-tune on layers 4–11 of another:
16 layers) — and runs ``polymod merge`` and mergekit's ``mergekit-yaml`` on
each, interleaved, each in its own process under ``/usr/bin/time -v`` (wall
time and peak resident memory). Then compares the two outputs tensor by tensor
and writes ``benchmarks/results/merge_stream.json``.

mergekit runs from its own virtual environment (``benchmarks/.cache/mergekit-venv``,
see ``benchmarks/README`` in docs/merging.md); polymod never imports it.

    .venv/bin/python benchmarks/merge_stream.py            # full size, ~3.4 GB of temp files
    .venv/bin/python benchmarks/merge_stream.py --layers 2 --repeats 1   # quick check
    .venv/bin/python benchmarks/merge_stream.py --recipes slerp,passthrough --finetunes 2 \
        --out benchmarks/results/merge_stream_slerp_passthrough.json   # SLERP + frankenmerge, ~5 min quiet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from polymod.merging.shards import Checkpoint, ShardedWriter

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT = ROOT / "benchmarks/.cache/mergekit-venv/bin/mergekit-yaml"
POLYMOD = [sys.executable, "-c", "from polymod.cli import main; main()"]  # this checkout's polymod


def layout(hidden: int, layers: int, inter: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-style causal LM (Hugging Face names)."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def generate(work: Path, args: argparse.Namespace) -> list[Path]:
    """Write base + fine-tunes as sharded fp32 safetensors; returns their directories."""
    shapes = layout(args.hidden, args.layers, args.intermediate, args.vocab)
    dirs = [work / "base"] + [work / f"ft{i}" for i in range(args.finetunes)]
    writers = [ShardedWriter(d, [(n, torch.float32, s) for n, s in shapes], 400 * 1024**2) for d in dirs]
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes:
        base = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        writers[0].write(name, base)
        for w in writers[1:]:  # a fine-tune: small dense change, a few larger moves
            delta = torch.randn(shape, generator=g) * 0.002
            w.write(name, base + delta)
            del delta
        del base
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": args.vocab,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    for d, w in zip(dirs, writers):
        w.close()
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return dirs


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds and peak RSS (GB)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); see {log}\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(rss_kb / 1024**2, 3)}


def compare(a: Path, b: Path) -> dict[str, float]:
    """Agreement of two checkpoints: max |Δ|, fraction of bit-identical entries, tensors compared."""
    with Checkpoint(a) as ca, Checkpoint(b) as cb:
        if set(ca.names) != set(cb.names):
            return {"error": f"tensor names differ: {sorted(set(ca.names) ^ set(cb.names))[:5]}"}
        worst, same, total = 0.0, 0, 0
        for name in ca.names:
            x, y = ca.read(name).float(), cb.read(name).float()
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
            same += int((x == y).sum())
            total += x.numel()
    return {"max_abs_diff": worst, "identical_fraction": same / total, "entries": total, "tensors": len(ca.names)}


def recipes(dirs: list[Path], args: argparse.Namespace) -> dict[str, str]:
    """The benchmarked recipes over base ``dirs[0]`` and fine-tunes ``dirs[1:]`` (all float32 out)."""
    ties = "".join(f"  - model: {d}\n    parameters: {{weight: 1.0, density: {args.density}}}\n" for d in dirs[1:])
    return {
        "ties": f"merge_method: ties\nbase_model: {dirs[0]}\nmodels:\n{ties}dtype: float32\n",
        "slerp": (f"merge_method: slerp\nbase_model: {dirs[0]}\nmodels:\n  - model: {dirs[0]}\n"
                  f"  - model: {dirs[1]}\nparameters:\n  t:\n    - filter: self_attn\n"
                  "      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
                  "    - value: 0.5\ndtype: float32\n"),
        "passthrough": (f"merge_method: passthrough\nslices:\n"
                        f"  - sources: [{{model: {dirs[1]}, layer_range: [0, {max(1, 2 * args.layers // 3)}]}}]\n"
                        f"  - sources: [{{model: {dirs[2]}, layer_range: [{args.layers // 3}, {args.layers}]}}]\n"
                        "dtype: float32\n"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2560)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--finetunes", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per tool (medians reported)")
    ap.add_argument("--recipes", default="ties,slerp,passthrough", help="comma-separated: ties, slerp, passthrough")
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/merge_stream.json"))
    ap.add_argument("--mergekit", default=str(MERGEKIT), help="the mergekit-yaml to run (its own venv)")
    args = ap.parse_args()
    mergekit = Path(args.mergekit)
    if not mergekit.exists():
        raise SystemExit(f"mergekit is not installed at {mergekit}; see docs/merging.md (benchmarks)")
    work = Path(tempfile.mkdtemp(prefix="polymod-merge-stream-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        dirs = generate(work, args)
        n_params = sum(i.numel for i in Checkpoint(dirs[0]).infos.values())
        print(f"generated base + {args.finetunes} fine-tunes, {n_params / 1e6:.1f}M params each, "
              f"fp32, in {time.perf_counter() - t0:.0f} s ({work})", flush=True)
        chosen = {k: v for k, v in recipes(dirs, args).items() if k in args.recipes.split(",")}
        runs: dict[str, dict[str, list[dict[str, float]]]] = {}
        agreement: dict[str, dict] = {}
        for name, text in chosen.items():
            recipe = work / f"{name}.yml"
            recipe.write_text(text)
            tools = {
                "polymod": lambda out, r=recipe: [*POLYMOD, "merge", str(r), str(out), "--quiet"],
                "mergekit": lambda out, r=recipe: [str(mergekit), str(r), str(out), "--no-copy-tokenizer", "--quiet",
                                                   "--no-write-model-card"],
            }
            runs[name] = {t: [] for t in tools}
            for r in range(args.repeats):
                for tool, cmd in tools.items():
                    out = work / f"out-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    runs[name][tool].append(timed(cmd(out), work / f"{name}-{tool}-{r}.log"))
                    print(f"{name}: run {r + 1}/{args.repeats} {tool:9s} {runs[name][tool][-1]} "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
            agreement[name] = compare(work / "out-polymod", work / "out-mergekit")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_recipe = {}
    for name, tool_runs in runs.items():
        med = {t: {k: statistics.median(x[k] for x in v) for k in v[0]} for t, v in tool_runs.items()}
        ratio = med["polymod"]["wall_s"] / med["mergekit"]["wall_s"]
        per_recipe[name] = {"runs": tool_runs, "median": med, "wall_ratio_polymod_over_mergekit": round(ratio, 3),
                            "goal_met": ratio <= 1 / 3 and med["polymod"]["peak_rss_gb"] <= 1.2,
                            "agreement": agreement[name]}
    result = {
        "benchmark": "streaming merges of whole checkpoints: ties (base + 3), slerp (base + 1), passthrough slices",
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                  "vocab": args.vocab, "params": n_params, "dtype": "float32"},
        "recipes": {name: chosen[name] for name in per_recipe}, "results": per_recipe,
        "goal": {"wall_ratio_max": 1 / 3, "peak_rss_gb_max": 1.2},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "note": "shared machine: other agents ran concurrently; medians of interleaved runs",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'recipe':12s} {'tool':10s} {'wall s (median)':>16s} {'peak RSS GB':>12s}")
    for name, res in per_recipe.items():
        for t, m in res["median"].items():
            print(f"{name:12s} {t:10s} {m['wall_s']:16.2f} {m['peak_rss_gb']:12.3f}")
        print(f"{name:12s} ratio {res['wall_ratio_polymod_over_mergekit']:.3f} (goal <= 0.333), goal met: "
              f"{res['goal_met']}; agreement {res['agreement']}")
    print(f"wrote {args.out}")
    sys.exit(0)


if __name__ == "__main__":
    main()
