"""The parallel Bible: labels, the TSV cache, errors; the real Debian modules in the slow tier."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from polymod import assets_bible as ab
from polymod.errors import ConfigError

BOOKS_66 = ("Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov Eccl Song "
            "Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal Matt Mark Luke John Acts "
            "Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet 2Pet 1John 2John 3John "
            "Jude Rev").split()


def test_every_book_has_exactly_one_of_six_genres():
    assert sorted(ab.BOOK_GENRE) == sorted(BOOKS_66) and len(BOOKS_66) == 66
    assert set(ab.BOOK_GENRE.values()) == set(ab.GENRES) and len(ab.GENRES) == 6
    counts = {g: sum(1 for b in BOOKS_66 if ab.BOOK_GENRE[b] == g) for g in ab.GENRES}
    assert counts == {"law": 5, "history": 13, "wisdom": 5, "prophets": 18, "gospels": 4, "epistles": 21}


def test_tsv_cache_round_trips_and_refuses_other_files(tmp_path):
    pairs = [ab.VersePair("Gen.1.1", "Gen", "ot", "law", 'In the "beginning"', "En el principio, crió"),
             ab.VersePair("Rev.22.21", "Rev", "nt", "prophets", "Amen \\ back", "Amén")]
    ab.write_tsv(pairs, tmp_path / "b.tsv")
    assert ab.read_tsv(tmp_path / "b.tsv") == pairs
    assert ab.parallel_bible(tmp_path / "b.tsv") == pairs  # a present cache is read, nothing fetched
    assert pairs[1].genre_id == 3
    (tmp_path / "old.tsv").write_text("ref\tbook\n")
    with pytest.raises(ConfigError, match="not a parallel-bible cache of version 1; delete it"):
        ab.read_tsv(tmp_path / "old.tsv")


def test_missing_modules_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMOD_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="not unpacked under .*sword; run 'make bible'"):
        ab.parallel_bible()
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(ConfigError, match="needs 'apt-get'"):
        ab.fetch_sword_modules(tmp_path / "x")
    monkeypatch.setattr(ab, "MODULES", {"en": "engKJV2006eb", "es": "nope"})
    if importlib.util.find_spec("pysword") is not None:
        with pytest.raises(ConfigError, match="not a SWORD library \\(no mods.d folder\\)"):
            ab.extract_pairs(tmp_path)
        (tmp_path / "mods.d").mkdir()
        (tmp_path / "mods.d" / "x.conf").write_text("[engKJV2006eb]\nModDrv=zText\nDataPath=./m/\n")
        with pytest.raises(ConfigError, match="lacks the modules \\['nope'\\]"):
            ab.extract_pairs(tmp_path)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if importlib.util.find_spec("pysword") is None:
        pytest.skip("pysword is not installed (pip install 'polymod[assets]')")
    installed = ab.sword_home() / "usr" / "share" / "sword"
    if (installed / "mods.d" / "spaRV1909eb.conf").is_file():
        return installed
    try:
        return ab.fetch_sword_modules(tmp_path_factory.mktemp("sword"))
    except ConfigError as err:
        pytest.skip(f"the Debian packages could not be fetched here: {err}")


@pytest.mark.slow
def test_real_modules_give_aligned_labelled_pairs(library):
    pairs = ab.extract_pairs(library, books=["Ruth", "Jude"])
    assert [p.ref for p in pairs[:2]] == ["Ruth.1.1", "Ruth.1.2"]
    assert len(pairs) == 85 + 25  # Ruth 4 chapters, 85 verses; Jude 25 verses; none empty in either language
    assert {p.genre for p in pairs} == {"history", "epistles"} and {p.testament for p in pairs} == {"ot", "nt"}
    first = pairs[0]
    assert first.en.startswith("Now it came to pass in the days when the judges ruled")
    assert "jueces" in first.es  # the same verse in Spanish
    last = pairs[-1]
    assert last.ref == "Jude.1.25" and last.en.endswith("Amen.") and last.es.endswith("Amén.")
    assert all("\u00b6" not in p.en and "  " not in p.en and "\t" not in p.es for p in pairs)
