"""Remote modules across processes on loopback (slow tier): three honest hosts, a slow one, a lying one,
a hijacker, and a client — each host a supervised process tree started by ``HostProcess``.

Skipped with the reason when hivemind cannot start here. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import polymod as pm
from polymod.swarm import Swarm, SwarmUnavailableError
from polymod.swarm.process import HostConfig, HostProcess
from polymod.swarm.records import Announcement, module_key
from tests.hosts import make_batch, make_host, randomize
from tests.swarm_helpers import announcement

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm")
    host = make_host("llama")
    model = pm.Modular(host)
    for i, name in enumerate(NAMES):
        model.add(name, pm.LoRA(rank=4, sites="attn.q"))
        randomize(model[name], std=0.3 + 0.1 * i)
        pm.save(model[name], root / name)
    try:
        probe = Swarm(start_timeout=30)
    except SwarmUnavailableError as exc:
        pytest.skip(f"hivemind cannot start here: {exc}")
    probe.shutdown()
    procs: dict[str, HostProcess] = {}
    client = None
    try:
        for name in NAMES:
            dht = procs["a"].info["addresses"] if procs else []
            procs[name] = HostProcess(HostConfig(source=str(root / name), name=f"me/{name}", dht=dht, ttl=30),
                                      log=root / f"{name}.log")
            procs[name].start(timeout=120)
        client = pm.swarm.join(procs["a"].info["addresses"], start_timeout=30)
        yield {"root": root, "host": host, "model": model, "procs": procs, "client": client}
    finally:
        if client is not None:
            client.shutdown()
        for proc in procs.values():
            proc.stop(grace=5)


def _logits(world, expr, batch):
    world["model"].use(expr)
    return world["host"](**batch).logits


def _attach(world, name, **kwargs):
    model = world["model"]
    if f"r{name}" in model.library:
        model.remove(f"r{name}")
    kwargs.setdefault("run", "remote")
    kwargs.setdefault("timeout", 20)
    model.add(f"r{name}", pm.Remote(f"me/{name}", dht=world["client"], **kwargs))


def test_remote_module_equals_the_local_one(world):
    _attach(world, "a")
    batch = make_batch("llama")
    torch.testing.assert_close(_logits(world, "ra", batch), _logits(world, "a", batch), atol=1e-5, rtol=0)
    report = pm.swarm.report(world["model"])["ra"]
    assert report["answered"] == {world["procs"]["a"].info["peer_id"]: 2} and report["dropped"] == []


def test_mixed_local_and_remote_compositions_equal_all_local(world):
    _attach(world, "a")
    _attach(world, "b")
    batch = make_batch("llama")
    for mixed, local in [(pm.Stack("ra", "c"), pm.Stack("a", "c")),
                         (pm.Mix(["ra", "b"], router=pm.Static([0.7, 0.3])),
                          pm.Mix(["a", "b"], router=pm.Static([0.7, 0.3]))),
                         (pm.Mix(["ra", "rb"], router=pm.Static([0.7, 0.3])),
                          pm.Mix(["a", "b"], router=pm.Static([0.7, 0.3])))]:
        torch.testing.assert_close(_logits(world, mixed, batch), _logits(world, local, batch), atol=1e-5, rtol=0)
    world["model"].use(pm.Mix(["ra", "rb"]))
    with world["model"].route(["ra", "rb", None]):
        got = world["host"](**batch).logits
    world["model"].use(pm.Mix(["a", "b"]))
    with world["model"].route(["a", "b", None]):
        want = world["host"](**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_second_peer_cannot_take_over_the_first_ones_announcement(world):
    client, root = world["client"], world["root"]
    owner_a = world["procs"]["a"].info["owner"]
    hijacker = pm.swarm.Swarm(world["procs"]["a"].info["addresses"], start_timeout=30)
    try:
        found, _ = client.lookup("me/a")
        original = found[owner_a]
        other = announcement(pm.load(root / "b"), "me/a", hijacker.peer_id)  # b's weights under a's name
        marker_a = next(k for k in hijacker.dht.get(module_key("me/a"), latest=True).value
                        if isinstance(k, bytes) and k.startswith(b"[owner:"))
        from hivemind.utils import get_dht_time

        # 1. writing into the owner's signed subkey: refused (the hijacker cannot sign for that key)
        assert not hijacker.dht.store(module_key("me/a"), other.to_dict(), get_dht_time() + 600, subkey=marker_a)
        # 2. b's content under a's expert ids, in its own subkey: refused by readers (ids bound to the hash)
        forged = {**other.to_dict(), "sites": [s.__dict__ for s in original.sites]}
        assert hijacker.dht.store(module_key("me/a"), forged, get_dht_time() + 600, subkey=hijacker.owner_marker)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found, refused = client.lookup("me/a")
            if hijacker.owner in refused:
                break
            time.sleep(0.5)
        assert found[owner_a] == Announcement(**{**original.__dict__, "load": found[owner_a].load,
                                                 "time": found[owner_a].time})
        assert "does not derive from the content hash" in refused[hijacker.owner]
        # 3. a well-formed record of the same content from another peer: a pinned client never uses it
        assert hijacker.announce(Announcement(**{**original.__dict__, "peer_id": hijacker.peer_id}), 600)
        _attach(world, "a", owner=owner_a)
        binding = world["model"]["ra"].spec.binding()
        assert [h.peer_id for h in binding.hosts] == [original.peer_id]
    finally:
        hijacker.shutdown()


def test_swarm_ls_lists_every_host_with_its_modules_and_latency(world):
    from typer.testing import CliRunner

    from polymod.cli import app

    out = CliRunner().invoke(app, ["swarm", "ls", "--dht", world["procs"]["a"].info["addresses"][0], "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["owner"]: r for r in json.loads(out.output)}
    for name, proc in world["procs"].items():
        row = rows[proc.info["owner"]]
        assert row["peer_id"] == proc.info["peer_id"]
        assert row["modules"] == [f"me/{name}@{proc.info['content_hash'][:12]}"]
        assert row["latency_ms"] is not None and 0 < row["latency_ms"] < 5000


def test_polymod_host_command_serves_and_stops(world):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "polymod.cli", "host", str(world["root"] / "b"), "--name", "me/cli-b", "--once",
           "--dht", world["procs"]["a"].info["addresses"][0]]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads(run.stdout.splitlines()[0])
    assert info["ready"] and info["ref"] == "me/cli-b" and len(info["uids"]) == 2
    assert "hosting me/cli-b (2 sites) as owner" in run.stderr
    with pytest.raises(ProcessLookupError):  # the host's whole process group is gone
        os.killpg(info["pid"], 0)


def test_a_slow_host_times_out_without_hanging(world):
    root = world["root"]
    slow = HostProcess(HostConfig(source=str(root / "b"), name="me/slowb", dht=world["procs"]["a"].info["addresses"]),
                       log=root / "slow.log", entry=[sys.executable, "-m", "tests.swarm_helpers", "slow"])
    try:
        slow.start(timeout=120)
        _attach(world, "slowb", timeout=1.0)
        start = time.perf_counter()
        out = _logits(world, "rslowb", make_batch("llama"))
        assert time.perf_counter() - start < 10
        torch.testing.assert_close(out, _logits(world, None, make_batch("llama")))  # dropped: the bare host
        dropped = pm.swarm.report(world["model"])["rslowb"]["dropped"]
        assert dropped[0]["reason"] == "timeout" and dropped[0]["peer"] == slow.info["peer_id"]
    finally:
        slow.kill()


def test_a_host_returning_wrong_outputs_is_caught_and_quarantined(world):
    root = world["root"]
    liar = HostProcess(HostConfig(source=str(root / "c"), name="me/c", dht=world["procs"]["a"].info["addresses"]),
                       log=root / "liar.log", entry=[sys.executable, "-m", "tests.swarm_helpers", "wrong"])
    try:
        liar.start(timeout=120)
        _attach(world, "c", verify=1.0, weights=str(root / "c"))
        binding = world["model"]["rc"].spec.binding()
        assert {h.peer_id for h in binding.hosts} == {liar.info["peer_id"], world["procs"]["c"].info["peer_id"]}
        batch = make_batch("llama")
        for _ in range(2):  # round robin: the liar is asked within two forwards
            torch.testing.assert_close(_logits(world, "rc", batch), _logits(world, "c", batch), atol=1e-5, rtol=0)
        report = pm.swarm.report(world["model"])["rc"]
        assert liar.info["peer_id"] in report["quarantined"]
        assert world["procs"]["c"].info["peer_id"] not in report["quarantined"]
    finally:
        liar.kill()
        world["client"].quarantined.clear()


class _KillAt(LogitsProcessor):
    def __init__(self, step: int, proc: HostProcess):
        self.step, self.proc, self.seen = step, proc, 0

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen == self.step:
            self.proc.kill()
        return scores


def test_killing_a_host_mid_generation_drops_it_and_generation_finishes(world):
    for name in NAMES:  # pinned: the liar's record of me/c may not have expired yet
        _attach(world, name, timeout=5, owner=world["procs"][name].info["owner"])
    model, host = world["model"], world["host"]
    model.use(pm.Mix(["ra", "rb", "rc"], router=pm.Static([0.4, 0.3, 0.3])))
    victim = world["procs"]["c"]
    batch = make_batch("llama", batch=2, length=5)
    start = time.perf_counter()
    out = host.generate(**batch, max_new_tokens=10, do_sample=False, min_new_tokens=10,
                        logits_processor=LogitsProcessorList([_KillAt(4, victim)]))
    assert out.shape == (2, 15) and time.perf_counter() - start < 60
    assert not victim.alive()
    report = pm.swarm.report(model)
    dropped = report["rc"]["dropped"]
    assert dropped and dropped[0]["peer"] == victim.info["peer_id"]
    assert report["ra"]["dropped"] == [] and report["rb"]["dropped"] == []
    assert report["rc"]["answered"][victim.info["peer_id"]] >= 3 * 2  # answered until it died (2 sites a step)
