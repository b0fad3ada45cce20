"""Helpers the example scripts share: the bundled MiniLM host, tokenised movie-review splits, accuracy."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import polymod as pm
from polymod import assets


def minilm_classifier(num_labels: int = 2, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """all-MiniLM-L6-v2 with a classification head, and its tokenizer.

    The head is not in the checkpoint, so it is drawn at random: seeding first makes every process
    build the same host (a module saved in one process then loads in another without a warning).
    """
    path = assets.minilm_path()
    torch.manual_seed(seed)
    host = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    return host.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode(tokenizer, split: assets.TextSplit, max_length: int = 64) -> dict[str, torch.Tensor]:
    """Padded token ids, attention mask and labels of a text split."""
    enc = tokenizer(split.texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(split.labels)}


@torch.no_grad()
def accuracy(host: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    """Share of rows whose arg-max logit is the label (host in eval mode)."""
    host.eval()
    right = 0
    for i in range(0, len(data["labels"]), batch_size):
        logits = host(input_ids=data["input_ids"][i:i + batch_size],
                      attention_mask=data["attention_mask"][i:i + batch_size]).logits
        right += int((logits.argmax(-1) == data["labels"][i:i + batch_size]).sum())
    return right / len(data["labels"])


def train_movie_modules(model: pm.Modular, tokenizer, train_size: int, eval_size: int,
                        steps: int) -> dict[str, dict[str, torch.Tensor]]:
    """Train one LoRA per movie-review task ('rt', 'imdb') on the model's host; return each task's test split.

    The LoRAs also cover the classifier: both live on this one host (one random head), so they compose and
    merge here; modules meant for other processes keep the head in a ``pm.Head`` (see train_save_load.py).
    """
    tests = {}
    for name, load in (("rt", assets.rotten_tomatoes), ("imdb", assets.imdb)):
        train_split, test_split = load(train=train_size, test=eval_size)
        model.add(name, pm.LoRA(rank=8, sites="attn.q|attn.v|classifier"))
        model.use(name)
        pm.Trainer(model, [name], encode(tokenizer, train_split),
                   config=pm.TrainConfig(steps=steps, batch_size=16, lr=4e-3, progress=False)).fit()
        tests[name] = encode(tokenizer, test_split)
    return tests
