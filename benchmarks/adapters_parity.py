"""Parity and forward overhead of polymod's bottleneck and invertible adapters against AdapterHub ``adapters``.

``adapters`` pins transformers 4.57, so it runs in its own virtual environment,
``benchmarks/.venv-adapters`` (git-ignored; created on first use with
``pip install torch==2.13.0`` and then ``adapters``). This script, run with the
project's Python, then:

1. builds tiny random BERT masked LMs (parity: hidden 32, 2 layers; timing:
   hidden 256, 4 layers) and saves them with ``save_pretrained``;
2. attaches each polymod configuration, gives every module parameter random
   values, writes those weights (under ``adapters``' parameter names) and the
   inputs to safetensors, and records polymod's logits and forward times;
3. runs itself with ``--worker`` in the ``adapters`` environment, which loads the
   same host, adds the matching ``adapters`` configuration, copies the weights
   in, and records its logits and forward times;
4. prints a table of max |Δlogits| and of each library's forward time with the
   adapter relative to its own bare host, and writes
   ``benchmarks/results/adapters_parity.json``.

Configurations: Pfeiffer (``SeqBnConfig``), Houlsby (``DoubleSeqBnConfig``),
scaled parallel (``ParBnConfig``), Pfeiffer + invertible (``SeqBnInvConfig``;
polymod: ``Stack(Invertible(sites="bert.embeddings"), Adapter())``) and a Stack
of two Pfeiffer adapters. Timings interleave bare and adapted forwards (order
rotated each round) and report medians; the two libraries run in separate
processes with different transformers versions, so compare their *ratios*.

Run: ``.venv/bin/python benchmarks/adapters_parity.py [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
VENV = HERE / ".venv-adapters"
RESULTS = HERE / "results"
TOL = 1e-5
SKIP_TIMING = ("stack-pfeiffer", "pfeiffer+invertible-static")
CONFIGS = ("pfeiffer", "houlsby", "parallel", "pfeiffer+invertible", "pfeiffer+invertible-static", "stack-pfeiffer")


def timed(contenders: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each contender, interleaved and rotated each round."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm up
        contenders[n]()
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


# -- polymod side (the project's environment) ------------------------------------------------------


def ensure_venv() -> Path:
    """The ``adapters`` environment's python, created on first use."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} (torch 2.13.0, adapters) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["adapters", "safetensors"], check=True)
    return python


def build_host(hidden: int, layers: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, vocab_size=128, max_position_embeddings=128)
    return tf.BertForMaskedLM(cfg).eval()


def attach(host, config: str):
    """polymod modules for ``config`` on ``host``, active, with random weights; returns the Modular."""
    import polymod as pm
    from polymod.modules.adapter import Adapter
    from polymod.modules.invertible import Invertible

    model = pm.Modular(host)
    if config.startswith("pfeiffer+invertible"):
        # adapters' static-head BertForMaskedLM applies the forward coupling only (no inverse before its decoder)
        model.add("inv", Invertible(sites="bert.embeddings", inverse=not config.endswith("static")))
        model.add("a", Adapter())
        expr = pm.Stack("inv", "a")
    elif config == "stack-pfeiffer":
        model.add("a", Adapter())
        model.add("b", Adapter())
        expr = pm.Stack("a", "b")
    else:
        model.add("a", Adapter(placement=config))
        expr = "a"
    torch.manual_seed(1)
    with torch.no_grad():
        for name in model.names():
            for p in model[name].parameters():
                p.normal_(0.0, 0.1)
    model.use(expr)
    return model


def their_weights(model) -> dict[str, torch.Tensor]:
    """The polymod parameters under ``adapters``' names (BertForMaskedLM, adapter names as in polymod)."""
    out = {}
    for name in model.names():
        for site, part in model[name].items():
            if hasattr(part, "down"):
                layer = site.split(".layer.")[1].split(".")[0]
                where = "attention.output" if ".attention." in site else "output"  # BertSelfOutput / BertOutput
                prefix = f"bert.encoder.layer.{layer}.{where}.adapters.{name}"
                out |= {f"{prefix}.adapter_down.0.weight": part.down.weight, f"{prefix}.adapter_down.0.bias":
                        part.down.bias, f"{prefix}.adapter_up.weight": part.up.weight,
                        f"{prefix}.adapter_up.bias": part.up.bias}
            elif part.owns:
                for net in ("F", "G"):
                    for ours, theirs in ((0, 0), (1, 2)):  # theirs: Linear, activation, Linear
                        linear = getattr(part.block, net)[ours]
                        # adapters names the invertible block after the adapter it belongs to (the stack's first)
                        key = f"bert.invertible_adapters.a.{net}.{theirs}"
                        out |= {f"{key}.weight": linear.weight, f"{key}.bias": linear.bias}
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def polymod_side(work: Path, rounds: int) -> dict:
    from safetensors.torch import save_file
    from transformers.utils import logging

    logging.disable_progress_bar()

    results: dict = {}
    for size, (hidden, layers, batch, length) in {"parity": (32, 2, 3, 9), "timing": (256, 4, 8, 64)}.items():
        host = build_host(hidden, layers)
        host.save_pretrained(work / f"host-{size}")
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(5, 128, (batch, length), generator=g)
        save_file({"input_ids": ids}, str(work / f"inputs-{size}.safetensors"))
        bare_host = copy.deepcopy(host)
        for config in CONFIGS:
            if size == "timing" and config in SKIP_TIMING:
                continue
            model = attach(host, config)
            save_file(their_weights(model), str(work / f"weights-{size}-{config}.safetensors"))
            with torch.no_grad():
                logits = host(input_ids=ids).logits
                save_file({"logits": logits}, str(work / f"ours-{size}-{config}.safetensors"))
                if size == "timing":
                    results[config] = timed({"bare": lambda h=bare_host, i=ids: h(input_ids=i),
                                             "adapted": lambda h=host, i=ids: h(input_ids=i)}, rounds)
            model.detach()
    return results


# -- adapters side (runs in .venv-adapters with --worker) -------------------------------------------


def load_host(path: Path, flex_head: bool):
    """The host in ``adapters``: BertForMaskedLM, or BertAdapterModel with its MLM head (which applies the inverse).

    adapters converts the checkpoint's ``cls.predictions`` into the flex head ``heads.default``; the
    decoder bias is not converted, so it is copied from the checkpoint.
    """
    import adapters
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM

    if not flex_head:
        model = BertForMaskedLM.from_pretrained(path).eval()
        adapters.init(model)
        return model
    model = adapters.BertAdapterModel.from_pretrained(path).eval()
    saved = load_file(str(path / "model.safetensors"))
    bias = next(v for k, v in saved.items() if k.endswith("predictions.bias") or k.endswith("decoder.bias"))
    with torch.no_grad():
        model.heads["default"][3].bias.copy_(bias)
    model.active_head = "default"
    return model


def worker(work: Path, rounds: int) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import BertForMaskedLM

    # the bare hosts are loaded before adapters is imported: plain transformers modules
    bare_hosts = {size: BertForMaskedLM.from_pretrained(work / f"host-{size}").eval() for size in ("parity", "timing")}
    import adapters
    from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig, SeqBnInvConfig
    from adapters.composition import Stack

    configs = {"pfeiffer": SeqBnConfig, "houlsby": DoubleSeqBnConfig, "parallel": ParBnConfig,
               "pfeiffer+invertible": SeqBnInvConfig, "pfeiffer+invertible-static": SeqBnInvConfig,
               "stack-pfeiffer": SeqBnConfig}
    report: dict = {"timing": {}, "versions": {"adapters": adapters.__version__}}
    import transformers

    report["versions"]["transformers"] = transformers.__version__
    for size in ("parity", "timing"):
        ids = load_file(str(work / f"inputs-{size}.safetensors"))["input_ids"]
        bare_host = bare_hosts[size]
        assert type(bare_host.bert.encoder.layer[0].output).__name__ == "BertOutput"
        for config, cls in configs.items():
            if size == "timing" and config in SKIP_TIMING:
                continue
            model = load_host(work / f"host-{size}", flex_head=config == "pfeiffer+invertible")
            names = ["a", "b"] if config == "stack-pfeiffer" else ["a"]
            for name in names:
                model.add_adapter(name, config=cls())
            model.set_active_adapters(Stack(*names) if len(names) > 1 else names[0])
            weights = load_file(str(work / f"weights-{size}-{config}.safetensors"))
            state = model.state_dict()
            theirs = {k for k in state if "adapter" in k and "heads." not in k}
            if set(weights) != theirs:
                raise SystemExit(f"{config}: weight names differ: only ours {sorted(set(weights) - theirs)[:4]}, "
                                 f"only theirs {sorted(theirs - set(weights))[:4]}")
            model.load_state_dict(weights, strict=False)
            with torch.no_grad():
                logits = model(input_ids=ids).logits
                save_file({"logits": logits}, str(work / f"theirs-{size}-{config}.safetensors"))
                if size == "timing":
                    report["timing"][config] = timed({"bare": lambda h=bare_host, i=ids: h(input_ids=i),
                                                      "adapted": lambda h=model, i=ids: h(input_ids=i)}, rounds)
    (work / "theirs.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (medians are reported)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker is not None:
        worker(args.worker, args.rounds)
        return
    from safetensors.torch import load_file

    python = ensure_venv()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours_timing = polymod_side(work, args.rounds)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONPATH="")
        subprocess.run([str(python), __file__, "--worker", str(work), "--rounds", str(args.rounds)],
                       check=True, env=env, cwd=str(HERE))
        theirs = json.loads((work / "theirs.json").read_text())
        rows = []
        for config in CONFIGS:
            diffs = {}
            for size in ("parity", "timing"):
                if size == "timing" and config in SKIP_TIMING:
                    continue
                ours = load_file(str(work / f"ours-{size}-{config}.safetensors"))["logits"]
                other = load_file(str(work / f"theirs-{size}-{config}.safetensors"))["logits"]
                diffs[size] = (ours - other).abs().max().item()
            ot, tt = ours_timing.get(config), theirs["timing"].get(config)
            rows.append({
                "config": config, "max_abs_diff_tiny": diffs["parity"], "max_abs_diff_timing_host": diffs.get("timing"),
                "agree": all(d <= TOL for d in diffs.values()),
                "polymod_ms": ot and 1e3 * ot["adapted"], "polymod_bare_ms": ot and 1e3 * ot["bare"],
                "adapters_ms": tt and 1e3 * tt["adapted"], "adapters_bare_ms": tt and 1e3 * tt["bare"],
                "polymod_overhead": ot and ot["adapted"] / ot["bare"],
                "adapters_overhead": tt and tt["adapted"] / tt["bare"],
            })
    print(f"{'config':22} {'max|Δ| tiny':>12} {'max|Δ| 256':>11} {'polymod/bare':>13} {'adapters/bare':>14}")
    for r in rows:
        t = "" if r["polymod_overhead"] is None else f"{r['polymod_overhead']:13.3f} {r['adapters_overhead']:14.3f}"
        big = "" if r["max_abs_diff_timing_host"] is None else f"{r['max_abs_diff_timing_host']:11.2e}"
        print(f"{r['config']:22} {r['max_abs_diff_tiny']:12.2e} {big:>11} {t}")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "what": "polymod vs AdapterHub adapters on identical weights: BertForMaskedLM, max |Δlogits|; forward "
                "time with the adapter over the same library's bare host (medians, interleaved)",
        "tolerance": TOL, "rows": rows, "versions": theirs["versions"] | {"torch": torch.__version__},
        "hosts": {"parity": "hidden 32, 2 layers, batch 3 x 9 tokens",
                  "timing": "hidden 256, 4 layers, intermediate 1024, batch 8 x 64 tokens"},
        "rounds": args.rounds, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    (RESULTS / "adapters_parity.json").write_text(json.dumps(out, indent=2) + "\n")
    if not all(r["agree"] for r in rows):
        raise SystemExit(f"parity above {TOL} for {[r['config'] for r in rows if not r['agree']]}")


if __name__ == "__main__":
    main()
