"""Remote modules (polymod.swarm) in the default tier: records, routing, failure and trust on a stand-in
swarm, and one real loopback round trip through hivemind (skipped with the reason when it cannot start)."""

from __future__ import annotations

import time

import pytest
import torch

import polymod as pm
from polymod.errors import FormatError, UnknownModuleError
from polymod.swarm.records import UID_GRAMMAR, Announcement, expert_uid
from polymod.swarm.trust import Binding
from tests.hosts import make_batch, make_host, randomize
from tests.swarm_helpers import PEERS, LocalSwarm, announcement, bind


@pytest.fixture
def setup():
    host = make_host("llama")
    model = pm.Modular(host)
    for i, name in enumerate(["a", "b", "c"]):
        model.add(name, pm.LoRA(rank=4, sites="attn.q|attn.v"))
        randomize(model[name], std=0.3 + 0.1 * i)
    model.add("ad", pm.Adapter(reduction=4, init="bert"))
    return host, model, LocalSwarm()


def _remote(model, swarm, name, peers, **kwargs):
    spec = pm.Remote(f"me/{name}", dht="/ip4/127.0.0.1/tcp/1", run="remote", **kwargs)
    bind(spec, swarm, model[name], peers, local=kwargs.pop("local", None))
    model.add(f"r{name}", spec)
    return spec


def _out(host, model, expr, batch, rows=None):
    model.use(expr)
    if rows is not None:
        with model.route(rows):
            return host(**batch).logits
    return host(**batch).logits


def test_expert_ids_derive_from_the_content_hash_and_fit_hiveminds_grammar(setup):
    _, model, _ = setup
    record = announcement(model["a"], "me/a", PEERS[0])
    assert all(UID_GRAMMAR.match(s.uid) for s in record.sites)
    assert record.sites[1].uid == expert_uid(record.content_hash, 1) == f"pm{record.content_hash[:24]}.1"
    assert not UID_GRAMMAR.match("layers.3.q_proj.0")  # why site names cannot be expert ids
    assert Announcement.from_dict(record.to_dict()) == record
    other = announcement(model["b"], "me/a", PEERS[1])  # b's weights under a's expert ids
    forged = {**other.to_dict(), "sites": record.to_dict()["sites"]}
    with pytest.raises(FormatError, match="does not derive from the content hash"):
        Announcement.from_dict(forged)
    with pytest.raises(FormatError, match="unknown fields"):
        Announcement.from_dict({**record.to_dict(), "pickle": b"..."})


def test_remote_module_equals_local_alone_in_a_stack_and_in_per_row_routing(setup):
    host, model, swarm = setup
    batch = make_batch("llama")
    for name in ("a", "b", "ad"):
        _remote(model, swarm, name, [PEERS[0]])
    for expr in ("a", "ad", pm.Stack("a", "ad")):
        want = _out(host, model, expr, batch)
        remote = expr if isinstance(expr, str) else pm.Stack("ra", "rad")
        got = _out(host, model, "r" + remote if isinstance(remote, str) else remote, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    mixed = _out(host, model, pm.Stack("a", "rad"), batch)  # local + remote == all local
    torch.testing.assert_close(mixed, _out(host, model, pm.Stack("a", "ad"), batch), atol=1e-5, rtol=0)
    swarm.rows_sent.clear()
    want = _out(host, model, pm.Mix(["a", "b"]), batch, rows=["a", "b", None])
    got = _out(host, model, pm.Mix(["ra", "rb"]), batch, rows=["ra", "rb", None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    tokens = batch["input_ids"].shape[1]
    assert {rows for _, rows in swarm.rows_sent} == {tokens}  # each expert got only its row's tokens, once per site
    assert len(swarm.rows_sent) == 2 * 4  # two experts x four sites: one call per expert per site


@pytest.mark.parametrize("kind", ["lora", "ffn"])
def test_token_level_top_k_over_remote_experts_equals_local(setup, kind):
    """Token-level top-k over remote LoRAs, and over FFN experts (small MLPs at the block outputs)."""
    host, model, swarm = setup
    batch = make_batch("llama")
    if kind == "ffn":
        for name in ("a", "b", "c"):
            model.remove(name)
            model.add(name, pm.Adapter(placement="pfeiffer", reduction=2, init="bert"))  # z' = z + U σ(D z)
            assert all(s.kind == "block" for s in model[name].sites.values())
    for name in ("a", "b", "c"):
        _remote(model, swarm, name, [PEERS[0]])
    torch.manual_seed(5)  # the same seed builds the same gates for both routers
    want = _out(host, model, pm.Mix(["a", "b", "c"], router=pm.TopK(k=2, level="token")), batch)
    torch.manual_seed(5)
    got = _out(host, model, pm.Mix(["ra", "rb", "rc"], router=pm.TopK(k=2, level="token")), batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    report = pm.swarm.report(model)
    assert report["ra"]["answered"] == {PEERS[0]: 4 if kind == "lora" else 2} and report["ra"]["dropped"] == []
    sites = 4 if kind == "lora" else 2
    # each token goes to its k = 2 experts only: 2 rows per token per site in all, not 3
    assert sum(rows for _, rows in swarm.rows_sent) == 2 * batch["input_ids"].numel() * sites


def test_a_dropped_expert_is_renormalised_away_and_reported(setup):
    host, model, swarm = setup
    batch = make_batch("llama")
    for name, peer in zip("abc", PEERS):
        _remote(model, swarm, name, [peer])
    swarm.dead.add(PEERS[2])
    got = _out(host, model, pm.Mix(["ra", "rb", "rc"], router=pm.Static([0.5, 0.3, 0.2])), batch)
    want = _out(host, model, pm.Mix(["a", "b", "c"], router=pm.Static([0.625, 0.375, 0.0])), batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    report = pm.swarm.report(model)
    assert report["rc"]["answered"] == {} and report["ra"]["answered"] == {PEERS[0]: 4}
    assert report["rc"]["dropped"][0]["peer"] == PEERS[2]
    assert "failed to dial" in report["rc"]["dropped"][0]["reason"]
    assert all("no host available" in d["reason"] for d in report["rc"]["dropped"][1:])  # resting, not re-dialled


def test_a_replica_answers_when_one_host_fails(setup):
    host, model, swarm = setup
    batch = make_batch("llama")
    _remote(model, swarm, "a", [PEERS[0], PEERS[1]])
    swarm.dead.add(PEERS[1])
    want = _out(host, model, "a", batch)
    _out(host, model, "ra", batch)  # first call: one site's call reaches the dead host and is dropped
    got = _out(host, model, "ra", batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_when_every_host_failed_the_dht_is_asked_again_and_a_new_host_answers(setup):
    host, model, swarm = setup
    batch = make_batch("llama")
    _remote(model, swarm, "a", [PEERS[0]], retry_after=1.0)
    swarm.dead.add(PEERS[0])
    _out(host, model, "ra", batch)  # every call dropped: the only host is dead
    swarm.records["me/a"] = {"owner3": announcement(model["a"], "me/a", PEERS[3]),  # a new host of the content
                             "owner4": announcement(model["b"], "me/a", PEERS[4])}  # other content: not taken
    time.sleep(1.1)
    _out(host, model, "ra", batch)  # the dead host is tried once more, then the DHT is asked again
    got = _out(host, model, "ra", batch)
    torch.testing.assert_close(got, _out(host, model, "a", batch), atol=1e-5, rtol=0)
    report = pm.swarm.report(model)["ra"]
    assert report["answered"] == {PEERS[3]: 3 + 4}
    assert [h.peer_id for h in model["ra"].spec.binding().hosts] == [PEERS[0], PEERS[3]]


def test_a_frozen_host_costs_one_deadline_not_a_hang(setup):
    host, model, swarm = setup
    _remote(model, swarm, "a", [PEERS[0]], timeout=0.2, retry_after=60)
    swarm.frozen.add(PEERS[0])
    start = time.perf_counter()
    out = _out(host, model, "ra", make_batch("llama"))
    assert time.perf_counter() - start < 5.0
    model.use(None)
    torch.testing.assert_close(out, host(**make_batch("llama")).logits)  # every call dropped: the bare host
    dropped = pm.swarm.report(model)["ra"]["dropped"]
    assert dropped[0]["reason"] == "timeout" and len(dropped) == 4


def test_verification_catches_a_lying_host_and_quarantines_it(setup):
    host, model, swarm = setup
    batch = make_batch("llama")
    spec = pm.Remote("me/a", dht="/ip4/127.0.0.1/tcp/1", run="remote", verify=1.0)
    bind(spec, swarm, model["a"], [PEERS[0], PEERS[1]], local=model["a"])
    model.add("ra", spec)
    swarm.wrong.add(PEERS[0])
    want = _out(host, model, "a", batch)
    got = _out(host, model, "ra", batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the wrong answer was replaced by the local one
    report = pm.swarm.report(model)
    assert PEERS[0] in report["ra"]["quarantined"] and "max |Δ| 0.5" in report["ra"]["quarantined"][PEERS[0]]
    assert PEERS[1] not in report["ra"]["quarantined"]
    swarm.rows_sent.clear()
    _out(host, model, "ra", batch)
    assert pm.swarm.report(model)["ra"]["answered"] == {PEERS[1]: 4}  # the quarantined host is not asked again


def test_without_weights_a_second_and_third_host_outvote_a_lying_one(setup):
    host, model, swarm = setup
    batch = make_batch("llama")
    spec = pm.Remote("me/a", dht="/ip4/127.0.0.1/tcp/1", run="remote", verify=1.0)
    bind(spec, swarm, model["a"], PEERS[:3])  # no local weights: hosts are compared with each other
    model.add("ra", spec)
    swarm.wrong.add(PEERS[1])
    want = _out(host, model, "a", batch)
    for _ in range(2):
        torch.testing.assert_close(_out(host, model, "ra", batch), want, atol=1e-5, rtol=0)
    report = pm.swarm.report(model)["ra"]
    assert list(report["quarantined"]) == [PEERS[1]] and "disagreed with two hosts" in report["quarantined"][PEERS[1]]
    assert report["verified"] == 8 and report["dropped"] == []


def test_resolution_refuses_unpinned_owners_and_says_why(setup):
    _, model, swarm = setup
    spec = pm.Remote("me/a", dht="/ip4/127.0.0.1/tcp/1", owner="feedfacefeedface")
    found = {"0123456789abcdef": announcement(model["a"], "me/a", PEERS[0])}
    with pytest.raises(UnknownModuleError, match="no acceptable host of 'me/a'.*owner='feedfacefeedface'"):
        Binding.resolve(spec, swarm, found, {"badbadbadbadbad0": "expert id does not derive"})
    pinned = pm.Remote("me/a", dht="/ip4/127.0.0.1/tcp/1", owner="0123456789abcdef", run="remote")
    assert Binding.resolve(pinned, swarm, found, {}).hosts[0].peer_id == PEERS[0]
    with pytest.raises(pm.ConfigError, match="verify=0.5.*is the only one; pass weights="):
        Binding.resolve(pm.Remote("me/a", dht="x", verify=0.5), swarm, found, {})
    with pytest.raises(pm.ConfigError, match="Remote timeout must be positive"):
        pm.Remote("me/a", dht="x", timeout=0)
    with pytest.raises(pm.ConfigError, match="'owner/name'"):
        pm.Remote("no-owner", dht="x")


def test_host_command_refuses_what_it_cannot_announce_before_starting_anything(setup, tmp_path):
    from typer.testing import CliRunner

    from polymod.cli import app

    _, model, _ = setup
    pm.save(model["a"], tmp_path / "a")  # a card without owner/name
    runner = CliRunner()
    out = runner.invoke(app, ["host", str(tmp_path / "a")])
    assert out.exit_code != 0 and "has no owner/name in its card; give one with --name" in str(out.exception)
    out = runner.invoke(app, ["host", str(tmp_path / "a"), "--name", "no-slash"])
    assert out.exit_code != 0 and "is named 'owner/name'" in str(out.exception)
    out = runner.invoke(app, ["swarm", "ls"])
    assert out.exit_code != 0 and "--dht" in out.output


def test_loopback_smoke_one_host_one_client():
    """The real thing, in one process: a hivemind host serving a LoRA, a client calling it (bounded)."""
    from polymod.swarm import Swarm, SwarmUnavailableError
    from polymod.swarm.host import Host

    host = make_host("llama")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=4, sites="attn.q"))
    randomize(model["a"])
    try:
        node = Swarm(start_timeout=30)
    except SwarmUnavailableError as exc:
        pytest.skip(f"hivemind cannot start here: {exc}")
    served = Host(model["a"], "me/a", node)
    client = None
    try:
        served.start(timeout=60)
        client = pm.swarm.join(node.addresses, start_timeout=30)
        model.add("ra", pm.Remote("me/a", dht=client, timeout=20, run="remote"))
        batch = make_batch("llama")
        want = _out(host, model, "a", batch)
        got = _out(host, model, "ra", batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert pm.swarm.report(model)["ra"]["answered"] == {node.peer_id: 2}
    finally:
        if client is not None:
            client.shutdown()
        served.shutdown()
