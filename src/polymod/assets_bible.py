"""A verse-aligned English–Spanish Bible, read offline from Debian's SWORD modules.

The one parallel corpus that installs without a model hub: Debian's
``sword-text-kjv`` (King James Version, 14.3-1) and ``sword-text-sparv``
(Reina-Valera 1909, 2.60-1), both public domain and both in the KJV
versification, so verse ``Gen.1.1`` of one is verse ``Gen.1.1`` of the other.
:func:`fetch_sword_modules` gets the two ``.deb`` files with ``apt-get download``
(a package registry; no root needed) and unpacks them with ``dpkg -x`` under
``$POLYMOD_HOME/assets/sword``; :func:`parallel_bible` reads both with
``pysword`` once (seconds) into a TSV cache and returns
the pairs with labels: book, testament and one of six genres
(:data:`GENRES`). Verses empty in either translation are left out.

Command line (what ``make bible`` runs)::

    python -m polymod.assets_bible      # fetch, unpack, extract; prints the cache path
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from polymod.assets_multilingual import assets_home
from polymod.errors import ConfigError

DEBS = ("sword-text-kjv", "sword-text-sparv")
MODULES = {"en": "engKJV2006eb", "es": "spaRV1909eb"}
EXTRACTOR_VERSION = 1

GENRES = ("law", "history", "wisdom", "prophets", "gospels", "epistles")
# OSIS book names per genre. Acts is narrative (history); Revelation is apocalyptic prophecy.
_GENRE_BOOKS = {
    "law": "Gen Exod Lev Num Deut",
    "history": "Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Acts",
    "wisdom": "Job Ps Prov Eccl Song",
    "prophets": "Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal Rev",
    "gospels": "Matt Mark Luke John",
    "epistles": "Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet 2Pet 1John "
                "2John 3John Jude",
}
BOOK_GENRE = {book: genre for genre, books in _GENRE_BOOKS.items() for book in books.split()}
NEW_TESTAMENT_FIRST = "Matt"


@dataclass(frozen=True)
class VersePair:
    """One verse in both languages.

    Attributes:
        ref: the OSIS reference, ``Book.chapter.verse`` (``Gen.1.1``).
        book: OSIS book name (``Gen``).
        testament: ``ot`` or ``nt``.
        genre: one of :data:`GENRES`.
        en: King James Version text.
        es: Reina-Valera 1909 text.
    """

    ref: str
    book: str
    testament: str
    genre: str
    en: str
    es: str

    @property
    def genre_id(self) -> int:
        """The genre's index in :data:`GENRES`."""
        return GENRES.index(self.genre)


def sword_home() -> Path:
    """Where the unpacked SWORD modules live: ``$POLYMOD_HOME/assets/sword``."""
    return assets_home() / "sword"


def _library(root: Path) -> Path:
    return root / "usr" / "share" / "sword"


def fetch_sword_modules(root: str | Path | None = None) -> Path:
    """Download the two Debian packages with ``apt-get download`` and unpack them with ``dpkg -x`` into ``root``.

    Returns:
        The SWORD library folder (holding ``mods.d`` and ``modules``).

    Raises:
        ConfigError: ``apt-get`` or ``dpkg`` is missing, or the download fails (its output is in the message).
    """
    root = Path(root) if root else sword_home()
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise ConfigError(f"fetching the Bible needs {tool!r} (a Debian system); install the packages "
                              f"{' and '.join(DEBS)} elsewhere and unpack them with 'dpkg -x DEB {root}'")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["apt-get", "download", *DEBS], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if done.returncode or len(debs) != len(DEBS):
            raise ConfigError(f"'apt-get download {' '.join(DEBS)}' failed (exit {done.returncode}): "
                              f"{done.stderr.strip()[-500:]}; if the package lists are empty, run "
                              "'apt-get update' first (as root)")
        root.mkdir(parents=True, exist_ok=True)
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
    return _library(root)


def _clean(text: str) -> str:
    return " ".join(text.replace("\u00b6", " ").split())  # drop the KJV's paragraph marks, collapse spaces


def extract_pairs(library: str | Path, books: list[str] | None = None) -> list[VersePair]:
    """Read both translations from a SWORD library folder into verse pairs (no cache).

    Args:
        library: the folder holding ``mods.d`` and ``modules``.
        books: OSIS names of the books to read (default: all 66).

    Raises:
        ConfigError: pysword is missing, or a module is not in the library.
    """
    try:
        from pysword.modules import SwordModules  # optional: the 'assets' extra
    except ImportError:
        raise ConfigError("reading the Bible needs pysword; run: pip install pysword==0.2.8") from None
    if not (Path(library) / "mods.d").is_dir():
        raise ConfigError(f"{library} is not a SWORD library (no mods.d folder); run fetch_sword_modules()")
    modules = SwordModules(str(library))
    found = modules.parse_modules()
    missing = [m for m in MODULES.values() if m not in found]
    if missing:
        raise ConfigError(f"SWORD library {library} lacks the modules {missing}; run fetch_sword_modules()")
    bibles = {lang: modules.get_bible_from_module(name) for lang, name in MODULES.items()}
    for bible in bibles.values():
        # pysword 0.2.8 decompresses a verse's whole block (a book here) for every verse it reads: Genesis alone
        # took 15 s; keeping the last blocks makes the whole Bible a few seconds.
        bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    structure = bibles["en"].get_structure().get_books()
    pairs = []
    for testament in ("ot", "nt"):
        for book in structure[testament]:
            if books is not None and book.osis_name not in books:
                continue
            refs = [f"{book.osis_name}.{c + 1}.{v + 1}" for c, n in enumerate(book.chapter_lengths) for v in range(n)]
            texts = {lang: [_clean(t) for t in bible.get_iter(books=[book.osis_name])]
                     for lang, bible in bibles.items()}
            if not len(refs) == len(texts["en"]) == len(texts["es"]):
                raise ConfigError(f"{book.osis_name}: {len(refs)} verses in the versification, "
                                  f"{len(texts['en'])} in English, {len(texts['es'])} in Spanish")
            for ref, en, es in zip(refs, texts["en"], texts["es"], strict=True):
                if en and es:
                    pairs.append(VersePair(ref, book.osis_name, testament, BOOK_GENRE[book.osis_name], en, es))
    return pairs


FIELDS = ("ref", "book", "testament", "genre", "en", "es")


def write_tsv(pairs: list[VersePair], path: Path) -> None:
    """Write pairs as a TSV with a header (tabs and newlines never occur in the cleaned texts)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writerow((f"# polymod parallel bible v{EXTRACTOR_VERSION}",))
        writer.writerow(FIELDS)
        writer.writerows((p.ref, p.book, p.testament, p.genre, p.en, p.es) for p in pairs)
    os.replace(tmp, path)


def read_tsv(path: Path) -> list[VersePair]:
    """Read a TSV written by :func:`write_tsv`.

    Raises:
        ConfigError: the file is not a cache of this extractor version.
    """
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        stamp, header = next(reader, None), next(reader, None)
        if stamp != [f"# polymod parallel bible v{EXTRACTOR_VERSION}"] or tuple(header or ()) != FIELDS:
            raise ConfigError(f"{path} is not a parallel-bible cache of version {EXTRACTOR_VERSION}; delete it")
        return [VersePair(*row) for row in reader]


def parallel_bible(cache: str | Path | None = None, fetch: bool = False) -> list[VersePair]:
    """All verse-aligned English–Spanish pairs (about 31k), extracted once and cached as a TSV.

    Args:
        cache: the TSV file (default ``$POLYMOD_HOME/assets/bible-en-es.tsv``).
        fetch: when the SWORD modules are not unpacked yet, get them with :func:`fetch_sword_modules`
            (else raise).

    Raises:
        ConfigError: the modules are missing and ``fetch`` is False (the message says how to get them).
    """
    path = Path(cache) if cache else assets_home() / "bible-en-es.tsv"
    if path.is_file():
        return read_tsv(path)
    library = _library(sword_home())
    if not all((library / "mods.d" / f"{m}.conf").is_file() for m in MODULES.values()):
        if not fetch:
            raise ConfigError(f"the SWORD modules are not unpacked under {sword_home()}; run 'make bible' "
                              "(or parallel_bible(fetch=True))")
        library = fetch_sword_modules()
    pairs = extract_pairs(library)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tsv(pairs, path)
    return pairs


if __name__ == "__main__":
    verses = parallel_bible(fetch=True)
    print(f"{len(verses)} verse pairs cached in {assets_home() / 'bible-en-es.tsv'}", file=sys.stderr)
