"""tokenizer_source: inputs with different added tokens, merged into one vocabulary (mergekit's semantics).

Expected rows are built by construction: every fine-tune shares the base's 40 tokens and
adds its own tokens after them, so the row each tool must write is known token by token.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import polymod as pm
from polymod.merging.recipe import load_recipe, merge_command
from polymod.merging.shards import Checkpoint
from tests.merge_helpers import one_thread  # noqa: F401 - an autouse fixture
from tests.merge_helpers import vocab_family as family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return root, family(root)


def run(root, tmp_path, text: str, name: str = "out") -> tuple[dict[str, torch.Tensor], dict]:
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(text)
    out = merge_command(recipe, tmp_path / name, progress=False)
    with Checkpoint(out) as ck:
        tensors = {n: ck.read(n).clone() for n in ck.names}
    return tensors, json.loads((out / "config.json").read_text())


def test_union_linear_takes_each_token_from_the_models_that_have_it(fam, tmp_path):
    root, w = fam
    out, cfg = run(root, tmp_path, f"merge_method: linear\ntokenizer_source: union\ndtype: float32\nmodels:\n"
                                   f"  - {{model: {root}/ft0, parameters: {{weight: 0.25}}}}\n"
                                   f"  - {{model: {root}/ft1, parameters: {{weight: 0.75}}}}\n")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<a1>", "<a2>", "<b1>")] == [40, 41, 42] and len(vocab) == 43
    assert cfg["vocab_size"] == 43
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        a, b = w["ft0"][key], w["ft1"][key]
        want = torch.cat([0.25 * a[:40] + 0.75 * b[:40],
                          a[40:41],                                  # <a1>: only ft0 has it
                          0.25 * a[41:42] + 0.75 * b[41:42],         # <a2>: both, at id 41
                          b[40:41]])                                 # <b1>: only ft1 has it (its id 40)
        torch.testing.assert_close(out[key], want, rtol=0, atol=1e-7)
    torch.testing.assert_close(out["model.norm.weight"], 0.25 * w["ft0"]["model.norm.weight"]
                               + 0.75 * w["ft1"]["model.norm.weight"], rtol=0, atol=1e-7)


def test_union_task_arithmetic_fills_the_base_rows_as_mergekit_does(fam, tmp_path):
    """A token the base lacks: its base row is the mean of the models that have it, or the one donor's row."""
    root, w = fam
    out, _ = run(root, tmp_path, f"merge_method: task_arithmetic\nbase_model: {root}/base\ntokenizer_source: union\n"
                                   f"dtype: float32\nmodels:\n  - {{model: {root}/ft0, parameters: {{weight: 1.0}}}}\n"
                                   f"  - {{model: {root}/ft1, parameters: {{weight: 0.5}}}}\n")
    key = "model.embed_tokens.weight"
    base, a, b = w["base"][key], w["ft0"][key], w["ft1"][key]
    mean_a2 = (a[41] + b[41]) / 2
    want = torch.cat([base + (a[:40] - base) + 0.5 * (b[:40] - base),
                      a[40:41],                                       # one donor: every input's row is ft0's
                      (mean_a2 + (a[41] - mean_a2) + 0.5 * (b[41] - mean_a2))[None],
                      b[40:41]])
    torch.testing.assert_close(out[key], want, rtol=0, atol=1e-6)


def test_base_and_model_sources_choose_the_vocabulary(fam, tmp_path):
    root, w = fam
    body = (f"merge_method: linear\nbase_model: {root}/base\ndtype: float32\nmodels:\n"
            f"  - {{model: {root}/ft0, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {root}/base, parameters: {{weight: 0.5}}}}\n")
    out, cfg = run(root, tmp_path, body + "tokenizer_source: base\n", "base-src")
    key = "model.embed_tokens.weight"
    assert cfg["vocab_size"] == 40 and out[key].shape == (40, 16)  # the first model's 42 rows cut to the base's
    torch.testing.assert_close(out[key], 0.5 * w["ft0"][key][:40] + 0.5 * w["base"][key], rtol=0, atol=1e-7)
    out, cfg = run(root, tmp_path, body + f"tokenizer_source: {root}/ft1\n", "ft1-src")
    assert cfg["vocab_size"] == 42
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "ft1-src").get_vocab()["<b1>"] == 40
    # <b1> (id 40): neither input has it → zeros; <a2> (id 41): only ft0 (its id 41) → its row in both inputs
    torch.testing.assert_close(out[key][40], torch.zeros(16), rtol=0, atol=0)
    torch.testing.assert_close(out[key][41], w["ft0"][key][41], rtol=0, atol=1e-7)


def test_tied_embeddings_stay_tied_and_the_merge_loads(tmp_path):
    fam_dir = tmp_path / "tied"
    family(fam_dir, tied=True)
    assert "lm_head.weight" not in Checkpoint(fam_dir / "ft0").infos
    out, cfg = run(fam_dir, tmp_path, f"merge_method: ties\nbase_model: {fam_dir}/base\ntokenizer_source: union\n"
                                      f"dtype: float32\nmodels:\n"
                                      f"  - {{model: {fam_dir}/ft0, parameters: {{weight: 1.0, density: 0.5}}}}\n"
                                      f"  - {{model: {fam_dir}/ft1, parameters: {{weight: 1.0, density: 0.5}}}}\n")
    assert "lm_head.weight" not in out and out["model.embed_tokens.weight"].shape == (43, 16)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("the <b1> end", return_tensors="pt").input_ids
    assert int(ids.max()) == 42 and model(ids).logits.shape[-1] == 43 and cfg["tie_word_embeddings"]


def test_tokenizer_source_is_validated_with_the_recipe(fam, tmp_path):
    root, _ = fam
    recipe = tmp_path / "bad.yml"
    recipe.write_text(f"merge_method: linear\ntokenizer_source: {root}/nowhere\ntokenizer: {{source: union}}\n"
                      f"models:\n  - {{model: {root}/ft0, parameters: {{weight: 1}}}}\n")
    with pytest.raises(pm.ConfigError, match=r"(?s)2 problems.*tokenizer: the tokenizer block .*not supported.*"
                                             r"tokenizer_source: .*nowhere is not a directory"):
        load_recipe(recipe)
    recipe.write_text(f"merge_method: linear\nmodels:\n  - {{model: {root}/ft0, parameters: {{weight: 1}}}}\n"
                      f"  - {{model: {root}/base, parameters: {{weight: 1}}}}\n")
    with pytest.raises(pm.ConfigError, match=r"other shapes .*embed_tokens.weight \[40, 16\] vs \[42, 16\]"):
        load_recipe(recipe)  # without tokenizer_source the vocabularies must match
