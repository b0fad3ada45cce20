"""Names, versions and cards: unit tests plus hypothesis fuzzing (only clean errors, never a crash)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polymod.card import Card
from polymod.errors import FormatError, InvalidNameError
from polymod.hub.names import Ref, SemVer, check_name, check_owner, check_version
from polymod.hub.package import card_bytes, parse_card

FAST = int(os.environ.get("POLYMOD_FUZZ_EXAMPLES", "100"))


@pytest.mark.parametrize("bad", ["..", "../etc", "a/b", "a..b", ".hidden", "a\x00b", "a\nb", "a b", "", "x" * 101,
                                 "name.", "ünï", "a\\b"])
def test_bad_module_names_rejected(bad):
    with pytest.raises(InvalidNameError, match="module name"):
        check_name(bad)


@pytest.mark.parametrize("bad", ["Alice", "-a", "a-", "a_b", "a.b", "x" * 40, "", "a\tb", "../a"])
def test_bad_owners_rejected(bad):
    with pytest.raises(InvalidNameError, match="owner"):
        check_owner(bad)


def test_good_names_and_versions():
    assert check_name("lora.en-de_v2") == "lora.en-de_v2" and check_owner("nlp-lab") == "nlp-lab"
    assert Ref.parse("alice/m") == Ref("alice", "m", "latest")
    assert str(Ref.parse("alice/m@2.1.0-rc.1")) == "alice/m@2.1.0-rc.1"
    for bad in ("1.0", "01.0.0", "1.0.0+build", "v1.0.0", "1.0.0-", "1" * 60 + ".0.0"):
        with pytest.raises(InvalidNameError, match="version"):
            check_version(bad)
    for bad in ("alice/m/x@1.0.0", "a@b/c", "alice@1.0.0/m"):  # the '/' must sit before any '@'
        with pytest.raises(InvalidNameError, match="reference"):
            Ref.parse(bad)


def test_semver_precedence():
    order = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
             "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0", "2.0.0"]
    assert sorted(order[::-1], key=SemVer.parse) == order


def _check_name_cleanly(text: str) -> None:
    try:
        name = check_name(text)
    except InvalidNameError:
        return
    assert "/" not in name and ".." not in name and name not in (".", "..") and len(name) <= 100
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)


def _parse_ref_cleanly(text: str) -> None:
    try:
        ref = Ref.parse(text)
    except InvalidNameError:
        return
    assert Ref.parse(str(ref)) == ref


@settings(max_examples=FAST, deadline=None)
@given(st.text(max_size=120))
def test_fuzz_names(text):
    _check_name_cleanly(text)
    _parse_ref_cleanly(text)
    _parse_ref_cleanly("alice/" + text)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4), max_leaves=20)
CARD_KEYS = ["kind", "config", "name", "owner", "version", "sites", "host", "task", "language", "tags", "metrics",
             "license", "description", "lineage", "format_version"]


def _mutated_cards():
    base = Card(kind="lora", config={"rank": 2}, sites=["a.b"], tags=["x"], metrics={"acc": 0.5}).to_dict()
    return st.builds(lambda updates, drop: {k: v for k, v in {**base, **updates}.items() if k not in drop},
                     st.dictionaries(st.sampled_from(CARD_KEYS + ["bogus"]), JSON, max_size=4),
                     st.sets(st.sampled_from(CARD_KEYS), max_size=2))


def _parse_cleanly(raw: bytes) -> None:
    try:
        card = parse_card(raw)
    except FormatError:
        return
    assert parse_card(card_bytes(card)).to_dict() == card.to_dict(), "a parsed card round-trips"


@settings(max_examples=FAST, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_cards())
def test_fuzz_card_fields(data):
    _parse_cleanly(json.dumps(data).encode())


@settings(max_examples=FAST, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_card_bytes(raw):
    _parse_cleanly(raw)


def test_deeply_nested_or_huge_cards_are_clean_errors():
    with pytest.raises(FormatError):
        parse_card(b"[" * 100_000)
    with pytest.raises(FormatError, match="limit"):
        parse_card(b" " * (2 << 20))
    with pytest.raises(FormatError, match="NaN"):
        parse_card(b'{"kind": "lora", "format_version": 1, "metrics": {"a": NaN}}')


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_cards(), st.text(max_size=120))
def test_fuzz_thousands(data, text):
    _parse_cleanly(json.dumps(data).encode())
    _check_name_cleanly(text)
    _parse_ref_cleanly(text)
