"""The PEFT reader's allow-list: every field of PEFT's four config classes, set to a non-default value, loads
equal to PEFT (max |Δ| ≤ 1e-5) or is refused by name — never a silent load (ISSUE 17).

The fields are enumerated from the installed PEFT's dataclasses, so a new PEFT option fails
``test_every_peft_field_is_classified`` until polymod classifies it (polymod/interop/peft_options.py)
and a case is written for it (tests/peft_cases.py).
"""

from __future__ import annotations

import dataclasses

import pytest

from polymod.interop.options import check
from polymod.interop.peft_options import CLASS_NAMES, TABLES
from tests.peft_cases import CASES, Skip, case_ids, run_case

peft = pytest.importorskip("peft")
TABLE_OF = {name: TABLES[t] for t, name in CLASS_NAMES.items()}


@pytest.mark.parametrize("cls", sorted(CASES))
def test_every_peft_field_is_classified(cls):
    fields = {f.name for f in dataclasses.fields(getattr(peft, cls))}
    assert fields - set(TABLE_OF[cls]) == set(), f"PEFT {cls} fields polymod does not classify"
    assert fields - set(CASES[cls]) == set(), f"PEFT {cls} fields without a test case"
    assert set(TABLE_OF[cls]) - fields == set(), f"polymod classifies {cls} fields PEFT no longer has"


@pytest.mark.parametrize("cls,key,index", case_ids())
def test_non_default_field_is_equal_to_peft_or_refused_by_name(cls, key, index, tmp_path):
    case = CASES[cls][key][index]
    outcome = run_case(peft, cls, case, tmp_path)
    if outcome.status == "refused":
        assert outcome.named, f"the refusal must name the option; changed keys vs message: {outcome.detail}"
    else:
        assert outcome.max_diff <= 1e-5, f"{cls}.{key}={case.overrides}: max |Δ| vs PEFT {outcome.max_diff}"


def test_unknown_and_refused_options_are_all_named_at_once():
    config = {"peft_type": "LORA", "r": 4, "use_dora": False, "shiny_new_option": 3, "alora_invocation_tokens": [1],
              "also_new": None}
    with pytest.raises(Exception, match=r"(?s)2 option.*shiny_new_option=3.*does not know.*alora_invocation") as e:
        check(config, TABLE_OF["LoraConfig"], "PEFT LoraConfig")
    assert "also_new" not in str(e.value), "an unknown option left empty is accepted"


def test_skips_say_why():
    for table in CASES.values():
        for key, cases in table.items():
            assert not isinstance(cases, Skip) or len(cases.why) > 20, key


def test_docs_page_lists_every_field_with_its_status():
    from pathlib import Path

    from polymod.interop.peft_options import CLASS_NAMES as NAMES

    page = (Path(__file__).resolve().parents[1] / "docs" / "interop-peft.md").read_text()
    for kind, table in TABLES.items():
        section = page.split(f"### {NAMES[kind]}\n", 1)[1].split("\n### ", 1)[0]
        for key, option in table.items():
            row = next((line for line in section.splitlines() if line.startswith(f"| `{key}` |")), None)
            assert row is not None, f"docs/interop-peft.md does not list {NAMES[kind]}.{key}"
            word = "refused" if option.status == "refused" else option.status
            assert f"| {word}" in row, f"{NAMES[kind]}.{key} is {option.status}, the page says: {row[:120]}"
