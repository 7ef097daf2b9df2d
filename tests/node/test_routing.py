"""Routing rules (pure logic): each criterion, regex, case folding, several rules."""

from __future__ import annotations

from typing import Any

import pytest

from dicom_node.config import RoutingRule
from dicom_node.pipeline.routing import SeriesFacts, matching_rules, quiet_period, rule_matches

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

FACTS = SeriesFacts(calling_ae="PACS", called_ae="TESSERA", modality="CT",
                    body_part="ABDOMEN", series_description="Portal venous 1.0 mm",
                    sop_class_uid=CT)


def rule(name: str = "r", quiet: float | None = None, **match: Any) -> RoutingRule:
    return RoutingRule.model_validate({"name": name, "action": "forward",
                                       "destinations": ["pacs"], "quiet_period_s": quiet,
                                       "match": match})


def facts(**changes: Any) -> SeriesFacts:
    values = {k: getattr(FACTS, k) for k in SeriesFacts.__slots__}
    values.update(changes)
    return SeriesFacts(**values)


@pytest.mark.parametrize(("criterion", "hit", "miss"), [
    ("calling_ae", ["PACS"], ["OTHER"]),
    ("called_ae", ["TESSERA"], ["ELSEWHERE"]),
    ("modality", ["CT"], ["MR"]),
    ("body_part", ["ABDOMEN"], ["HEAD"]),
    ("sop_class_uid", [CT], [MR]),
    ("series_description", "venous", "arterial"),
])
def test_each_criterion_matches_and_misses(criterion: str, hit: Any, miss: Any) -> None:
    assert rule_matches(rule(**{criterion: hit}), FACTS)
    assert not rule_matches(rule(**{criterion: miss}), FACTS)


def test_empty_match_matches_everything() -> None:
    assert rule_matches(rule(), FACTS)
    assert rule_matches(rule(), facts(modality=None, body_part=None, calling_ae=None))


@pytest.mark.parametrize("criterion", ["calling_ae", "called_ae", "modality", "body_part"])
def test_missing_value_does_not_match_a_criterion(criterion: str) -> None:
    assert not rule_matches(rule(**{criterion: ["X"]}), facts(**{criterion: None}))


@pytest.mark.parametrize(("criterion", "value"), [
    ("calling_ae", "pacs"), ("called_ae", "tessera"), ("modality", "ct"),
    ("body_part", "abdomen"),
])
def test_ae_titles_modality_body_part_fold_case(criterion: str, value: str) -> None:
    assert rule_matches(rule(**{criterion: [value]}), FACTS)
    assert rule_matches(rule(**{criterion: [value.upper()]}), facts(**{criterion: value}))


def test_values_are_compared_without_padding() -> None:
    assert rule_matches(rule(calling_ae=["PACS"]), facts(calling_ae="PACS  "))


def test_sop_class_compares_exactly() -> None:
    assert not rule_matches(rule(sop_class_uid=[CT + ".1"]), FACTS)
    assert not rule_matches(rule(sop_class_uid=[CT[:-2]]), FACTS)


def test_one_string_is_one_value_and_a_list_is_any_of() -> None:
    assert rule_matches(rule(modality="CT"), FACTS)
    assert rule_matches(rule(modality=["MR", "CT"]), FACTS)
    assert not rule_matches(rule(modality=["MR", "PT"]), FACTS)


def test_series_description_is_a_searched_regex() -> None:
    assert rule_matches(rule(series_description=r"\d\.\d mm$"), FACTS)
    assert rule_matches(rule(series_description="(?i)PORTAL"), FACTS)
    assert not rule_matches(rule(series_description="PORTAL"), FACTS)  # case-sensitive
    assert not rule_matches(rule(series_description="^venous"), FACTS)  # search, anchored
    assert not rule_matches(rule(series_description="venous"), facts(series_description=None))
    assert rule_matches(rule(series_description=".*"), facts(series_description=None))


def test_all_criteria_must_match() -> None:
    both = rule(modality=["CT"], body_part=["ABDOMEN"], series_description="venous")
    assert rule_matches(both, FACTS)
    assert not rule_matches(both, facts(body_part="CHEST"))
    assert not rule_matches(both, facts(series_description="arterial"))


def test_every_matching_rule_applies_in_configuration_order() -> None:
    rules = [rule("ct", modality=["CT"]), rule("mr", modality=["MR"]),
             rule("abdomen", body_part=["ABDOMEN"]), rule("any")]
    assert [r.name for r in matching_rules(rules, FACTS)] == ["ct", "abdomen", "any"]
    assert [r.name for r in matching_rules(rules, facts(modality="MR", body_part=None))] == [
        "mr", "any"]
    assert matching_rules([], FACTS) == []


def test_quiet_period_is_the_longest_of_the_matching_rules() -> None:
    rules = [rule("a", quiet=3, modality=["CT"]), rule("b", quiet=12, modality=["MR"]),
             rule("c", quiet=8), rule("d")]
    assert quiet_period(rules, FACTS, 5) == 8
    assert quiet_period(rules, facts(modality="MR"), 5) == 12
    assert quiet_period([rule("d")], FACTS, 5) == 5
    assert quiet_period([], FACTS, 5) == 5
