"""Merge two trained modules with TIES and publish the result to a hub, with its card filled in.

    python examples/merge_and_publish.py --hub runs/hub        # a local store directory (or a hub URL)
    python examples/merge_and_publish.py --hub /tmp/hub --train-size 32 --eval-size 16 --steps 2   # smoke run

Trains a LoRA on Rotten Tomatoes and one on IMDB, merges them (``pm.merge(..., method="ties")``), saves
the merge with task, description, tags, licence and base model on its card, pushes it and prints what
the hub shows: version, content hash and the lineage (both parents and the recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import accuracy, minilm_classifier, train_movie_modules  # noqa: E402

import polymod as pm  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", default="runs/hub", help="hub URL or local store directory")
    parser.add_argument("--ref", default="me/movie-sentiment", help="owner/name to publish as")
    parser.add_argument("--out", default="runs/merged", help="where the merged module is saved first")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args(argv)
    host, tokenizer = minilm_classifier()
    model = pm.Modular(host)
    tests = train_movie_modules(model, tokenizer, args.train_size, args.eval_size, args.steps)
    merged = pm.merge({"rt": model["rt"], "imdb": model["imdb"]}, method="ties", density=0.2)
    model.add("merged", merged)
    model.use("merged")
    scores = {f"merged_{name}_accuracy": accuracy(host, data) for name, data in tests.items()}
    saved = pm.save(merged, args.out, task="sentiment", tags=["movies", "english"], license="apache-2.0",
                    description="TIES merge (density 0.2) of Rotten Tomatoes and IMDB LoRAs on all-MiniLM-L6-v2",
                    readme="# Movie sentiment\n\nA TIES merge of two LoRAs; see the card's lineage.\n",
                    base_model=host)
    pm.hub.push(saved, args.ref, version="1.0.0", hub=args.hub)
    shown = pm.hub.show(args.ref, hub=args.hub)  # what a hub visitor sees
    card = pm.Card.from_dict(shown.card)
    result = {**scores, "published": f"{args.ref}@{shown.version}", "sha256": shown.sha256,
              "lineage": card.lineage.describe(), "base_model": card.host["base_model"]["name"],
              "license": card.license}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
