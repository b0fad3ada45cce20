"""Parity with PEFT's prompt and prefix tuning on identical weights (same tiny hosts, same inputs).

Deliberate differences, checked rather than hidden:

* T5 prefix: PEFT 0.21 builds the seq2seq cache by duplicating its (L·2) prefixes
  along the layer axis and splitting them in fours, so decoder layer ℓ gets the
  rows PEFT stores for layer 2ℓ mod L (and its cross-attention half is thrown
  away). polymod gives every decoder layer its own prefix (Li and Liang); with
  PEFT's rows remapped that way the outputs agree exactly.
* BERT prefix: PEFT 0.21's sequence-classification forward looks for a
  ``past_key_values`` parameter, which transformers 5 renamed ``cache``, and
  raises; the reference is PEFT's own prefix cache (``get_prompt``) passed to
  the host by hand with the grown mask.
* With grouped-query attention PEFT's reparametrisation input P′ has width
  H_kv·d, polymod's D (the token width); both are free choices of Li and Liang's
  MLP, so only the plain-prefix GQA case is compared.
"""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.modules.prefix import PrefixTuning
from polymod.modules.prompt import PromptTuning
from tests.hosts import make_batch, make_host

peft = pytest.importorskip("peft")

TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
N = 4
CASES = [(f, k) for f in ("bert", "gpt2", "llama", "t5") for k in ("prompt", "prefix", "prefix-mlp")
         if not (f == "llama" and k == "prefix-mlp")]


def _batch(family: str) -> dict[str, torch.Tensor]:
    batch = make_batch(family)
    batch["attention_mask"][0, -2:] = 0
    batch["labels"] = {"bert": torch.tensor([0, 1, 2]), "t5": batch.get("decoder_input_ids")}.get(
        family, batch["input_ids"])
    return batch


def _copy_weights(family: str, kind: str, part: torch.nn.Module, encoder: torch.nn.Module) -> None:
    with torch.no_grad():
        if kind == "prompt":
            encoder.embedding.weight.copy_(part.prompt)
        elif kind == "prefix-mlp":
            encoder.embedding.weight.copy_(part.embedding)
            for theirs, ours in zip((encoder.transform[0], encoder.transform[2]), (part.mlp[0], part.mlp[2])):
                theirs.weight.copy_(ours.weight)
                theirs.bias.copy_(ours.bias)
            if family == "t5":  # PEFT's output rows of layer 2l mod L feed decoder layer l (module docstring)
                for ours in (part.mlp[2].weight, part.mlp[2].bias):
                    ours.copy_(_t5_layer_order(ours.view(2, -1, *ours.shape[1:]), dim=0).reshape(ours.shape))
        elif family == "t5":
            part.prefix.copy_(_t5_layer_order(encoder.embedding.weight.view(N, 2, -1), dim=1).reshape(N, -1))
        else:
            encoder.embedding.weight.copy_(part.prefix)


def _t5_layer_order(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """PEFT 0.21's seq2seq prefix layout: decoder layer l reads the rows stored for layer 2l mod L."""
    layers = rows.shape[dim]
    return torch.stack([rows.select(dim, (2 * i) % layers) for i in range(layers)], dim)


@pytest.mark.parametrize("family,kind", CASES)
def test_same_outputs_and_loss_as_peft(family, kind):
    ours, theirs = make_host(family), make_host(family)
    model = pm.Modular(ours)
    if kind == "prompt":
        model.add("m", PromptTuning(length=N))
        config = peft.PromptTuningConfig(task_type=TASK[family], num_virtual_tokens=N, num_transformer_submodules=1)
    else:
        model.add("m", PrefixTuning(length=N, projection=16 if kind == "prefix-mlp" else None))
        config = peft.PrefixTuningConfig(task_type=TASK[family], num_virtual_tokens=N,
                                         prefix_projection=kind == "prefix-mlp", encoder_hidden_size=16)
    model.use("m")
    reference = peft.get_peft_model(theirs, config).eval()
    part = next(p for p in model["m"].parts.values() if list(p.parameters()))
    _copy_weights(family, kind, part, reference.prompt_encoder["default"])
    batch = _batch(family)
    with torch.no_grad():
        got = ours(**batch)
        if family == "bert" and kind != "prompt":
            mask = torch.cat([torch.ones(3, N, dtype=torch.long), batch["attention_mask"]], 1)
            want = theirs(**{**batch, "attention_mask": mask}, cache=reference.get_prompt(3))
        else:
            want = reference(**batch)
    assert got.logits.shape == want.logits.shape
    diff = (got.logits - want.logits).abs().max().item()
    print(f"{family} {kind}: max |Δlogits| = {diff:.2e}")
    assert diff <= 1e-5
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
