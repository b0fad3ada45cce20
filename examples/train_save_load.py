"""Train a LoRA on Rotten Tomatoes, save it, then load it in a fresh Python process and evaluate it there.

    python examples/train_save_load.py --out runs/example           # ~3 minutes on 2 CPU cores
    python examples/train_save_load.py --out /tmp/x --train-size 64 --eval-size 32 --steps 4   # smoke run

The fresh process builds the same host (same checkpoint, same seeded head) and attaches the module
with one line, ``pm.from_pretrained(host, directory)``; it prints the accuracy as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import accuracy, encode, minilm_classifier  # noqa: E402

import polymod as pm  # noqa: E402
from polymod import assets  # noqa: E402


def train(args: argparse.Namespace) -> dict[str, float]:
    host, tokenizer = minilm_classifier()
    train_split, test_split = assets.rotten_tomatoes(train=args.train_size, test=args.eval_size)
    model = pm.Modular(host)
    model.add("sentiment", pm.LoRA(rank=8, sites="attn.q|attn.v|classifier"))
    model.use("sentiment")
    config = pm.TrainConfig(steps=args.steps, batch_size=16, lr=4e-3, progress=False)
    pm.Trainer(model, ["sentiment"], encode(tokenizer, train_split), config=config).fit()
    here = accuracy(host, encode(tokenizer, test_split))
    saved = pm.save(model["sentiment"], Path(args.out) / "sentiment", task="sentiment", license="apache-2.0",
                    description="Rotten Tomatoes sentence polarity on all-MiniLM-L6-v2", base_model=host)
    fresh = subprocess.run([sys.executable, __file__, "--load", str(saved), "--train-size", str(args.train_size),
                            "--eval-size", str(args.eval_size)],
                           capture_output=True, text=True, check=True)
    there = json.loads(fresh.stdout.strip().splitlines()[-1])["accuracy"]
    return {"accuracy": here, "accuracy_in_fresh_process": there}


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    host, tokenizer = minilm_classifier()
    pm.from_pretrained(host, args.load)  # host + saved module -> ready model
    _, test_split = assets.rotten_tomatoes(train=args.train_size, test=args.eval_size)
    return {"accuracy": accuracy(host, encode(tokenizer, test_split))}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example", help="where the module is saved")
    parser.add_argument("--load", help="evaluate the module saved in this directory (the fresh process)")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args(argv)
    result = evaluate(args) if args.load else train(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
