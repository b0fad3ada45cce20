"""Two modules, one batch: each row routed to the module of its source (Rotten Tomatoes or IMDB).

    python examples/route_per_row.py                  # ~4 minutes on 2 CPU cores
    python examples/route_per_row.py --train-size 32 --eval-size 16 --steps 2     # smoke run

Trains a LoRA per source, then scores a mixed batch with ``model.route([...])`` — one composition per
row, in one forward — and checks it against running each row's module alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import minilm_classifier, train_movie_modules  # noqa: E402

import polymod as pm  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args(argv)
    host, tokenizer = minilm_classifier()
    model = pm.Modular(host)
    tests = train_movie_modules(model, tokenizer, args.train_size, args.eval_size, args.steps)
    model.use(None)
    host.eval()
    # one mixed batch: RT rows then IMDB rows, padded to one length
    width = max(t["input_ids"].shape[1] for t in tests.values())

    def padded(key: str) -> torch.Tensor:  # (B, T) with T = the longest split's width
        return torch.cat([torch.nn.functional.pad(t[key], (0, width - t[key].shape[1])) for t in tests.values()])

    ids, mask = padded("input_ids"), padded("attention_mask")
    rows = [name for name, t in tests.items() for _ in range(len(t["labels"]))]
    labels = torch.cat([t["labels"] for t in tests.values()])
    with torch.no_grad(), model.route(rows):
        routed = host(input_ids=ids, attention_mask=mask).logits
    alone = []
    with torch.no_grad():
        for name in tests:
            model.use(name)
            keep = torch.tensor([r == name for r in rows])
            alone.append(host(input_ids=ids[keep], attention_mask=mask[keep]).logits)
    model.use(None)
    result = {f"{name}_accuracy": float((routed.argmax(-1) == labels)[torch.tensor([r == name for r in rows])]
                                        .float().mean()) for name in tests}
    result["max_diff_vs_alone"] = float((routed - torch.cat(alone)).abs().max())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
