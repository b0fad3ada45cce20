"""Data-parallel training: 2 CPU processes (gloo) equal one process on the same global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import polymod as pm
from polymod.training.config import TrainConfig
from polymod.training.trainer import Trainer
from tests.hosts import make_host
from tests.test_train_util import classification_data, no_dropout, one_thread  # noqa: F401

CFG = dict(steps=5, batch_size=8, grad_accum=2, lr=1e-2, warmup=1, weight_decay=0.1, eval_every=5, checkpoint_every=5,
           progress=False, log_every=1)


def _run(out: Path, rank: int) -> None:
    """Train a LoRA on a tiny BERT (dropout off) and write its weights and metrics."""
    host = no_dropout(make_host("bert"))
    model = pm.Modular(host)
    model.add("t", pm.LoRA(rank=4, sites="attn.q|attn.v"))
    model.add("idle", pm.LoRA(rank=2, sites="attn.q"))  # named but never routed: no gradient on any rank
    model.use("t")
    if rank > 0:  # a different initial module on rank 1: the trainer broadcasts rank 0's
        with torch.no_grad():
            for p in model["t"].parameters():
                p.add_(1.0)
    trainer = Trainer(model, ["t", "idle"], classification_data(48), eval_data=classification_data(20, seed=5),
                      metrics=["accuracy"], config=TrainConfig(**CFG), output_dir=out / "run")
    result = trainer.fit()
    save_file({k: v.detach().contiguous() for k, v in trainer.weights().items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(result.metrics))


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        _run(Path(out), rank)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    (tmp_path / "ddp").mkdir()
    mp.spawn(_worker, args=(str(tmp_path / "ddp"),), nprocs=2, join=True)
    single = tmp_path / "single"
    single.mkdir()
    _run(single, 0)
    r0, r1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    one = load_file(str(single / "rank0.safetensors"))
    assert set(r0) == set(one) and any(k.startswith("idle.") for k in r0)
    idle = {k: v for k, v in r0.items() if k.startswith("idle.")}
    assert all(torch.equal(v, one[k]) for k, v in idle.items()), "an unrouted module is not even decayed"
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs across ranks"
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-6, msg=f"{k}: 2 processes != 1 process")
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in r0.items() if ".B" in k), "the module trained"
    m0, m1, ms = (json.loads(p.read_text()) for p in (tmp_path / "ddp" / "rank0.json", tmp_path / "ddp" / "rank1.json",
                                                       single / "rank0.json"))
    assert m0 == m1, "sharded evaluation gives every rank the same numbers"
    assert m0["accuracy"] == ms["accuracy"] and abs(m0["loss"] - ms["loss"]) < 1e-5
    ckpt = tmp_path / "ddp" / "run" / "checkpoints" / "step-000005"
    assert (ckpt / "rng-rank0.safetensors").is_file() and (ckpt / "rng-rank1.safetensors").is_file()
