"""Modules trained in separate processes from the same pretrained checkpoint merge (ISSUE 14.1).

Each process loads the checkpoint with ``from_pretrained(..., num_labels=2)`` — a new random classifier
each time — trains a LoRA on attention plus a head module, and saves both. A third process loads them
onto its own fresh host (no HostMismatchWarning) and merges the LoRAs (TIES) and the heads (average).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent("""
    import sys, torch, transformers as tf
    import polymod as pm
    ckpt, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(seed)
    host = tf.BertForSequenceClassification.from_pretrained(ckpt, num_labels=2).eval()
    model = pm.Modular(host)
    model.add("lora", pm.LoRA(rank=2, sites="attn.q|attn.v"))
    model.add("head", pm.Head(sites="classifier"))
    model.use(pm.Stack("lora", "head"))
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.randint(3, 96, (4, 7), generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(host(input_ids=ids).logits, torch.tensor([0, 1, 0, 1]))
        loss.backward(); opt.step(); opt.zero_grad()
    print(float(host.classifier.weight.sum()))  # this process's random classifier
    pm.save(model["lora"], f"{out}/lora"); pm.save(model["head"], f"{out}/head")
""")

MERGE = textwrap.dedent("""
    import sys, warnings, torch, transformers as tf
    import polymod as pm
    ckpt, a, b = sys.argv[1:4]
    warnings.simplefilter("error", pm.HostMismatchWarning)
    host = tf.BertForSequenceClassification.from_pretrained(ckpt, num_labels=2).eval()
    mods = {f"{kind}-{i}": pm.load(f"{d}/{kind}", host=host) for i, d in enumerate((a, b)) for kind in ("lora", "head")}
    lora = pm.merge({"a": mods["lora-0"], "b": mods["lora-1"]}, method="ties", density=0.5)
    head = pm.merge({"a": mods["head-0"], "b": mods["head-1"]}, method="linear")
    model = pm.Modular(host)
    model.add("lora", lora); model.add("head", head)
    model.use(pm.Stack("lora", "head"))
    print(lora.kind, head.kind, tuple(host(input_ids=torch.tensor([[5, 6, 7]])).logits.shape))
""")


def test_modules_from_two_processes_on_one_checkpoint_merge(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=96, max_position_embeddings=64)
    tf.BertModel(cfg).save_pretrained(tmp_path / "ckpt")  # the pretrained body: no classifier in it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "merge.py").write_text(MERGE)
    runs = [subprocess.Popen([sys.executable, str(tmp_path / "train.py"), str(tmp_path / "ckpt"), str(tmp_path / s),
                              s], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for s in ("1", "2")]
    outs = [r.communicate(timeout=300) for r in runs]
    for r, (_, err) in zip(runs, outs):
        assert r.returncode == 0, err[-3000:]
    assert outs[0][0] != outs[1][0], "each process must draw its own random classifier"
    done = subprocess.run([sys.executable, str(tmp_path / "merge.py"), str(tmp_path / "ckpt"), str(tmp_path / "1"),
                           str(tmp_path / "2")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["delta", "head", "(1,", "2)"]  # TIES of LoRAs is a dense delta
