"""Routing rules: which completed series go where, and which get segmented."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_node.config import RoutingRule


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """What rules can match on, taken from the series' first instance and association."""

    calling_ae: str | None
    called_ae: str | None
    modality: str | None
    body_part: str | None
    series_description: str | None
    sop_class_uid: str | None


def _one_of(value: str | None, allowed: Sequence[str], *, fold: bool) -> bool:
    if not allowed:
        return True
    if value is None:
        return False
    if fold:
        return value.strip().upper() in {a.strip().upper() for a in allowed}
    return value.strip() in allowed


def rule_matches(rule: RoutingRule, facts: SeriesFacts) -> bool:
    m = rule.match
    if not _one_of(facts.calling_ae, m.calling_ae, fold=True):
        return False
    if not _one_of(facts.called_ae, m.called_ae, fold=True):
        return False
    if not _one_of(facts.modality, m.modality, fold=True):
        return False
    if not _one_of(facts.body_part, m.body_part, fold=True):
        return False
    if not _one_of(facts.sop_class_uid, m.sop_class_uid, fold=False):
        return False
    if m.series_description is not None:
        return re.search(m.series_description, facts.series_description or "") is not None
    return True


def matching_rules(rules: Sequence[RoutingRule], facts: SeriesFacts) -> list[RoutingRule]:
    """Every rule that matches, in configuration order (each one applies)."""
    return [r for r in rules if rule_matches(r, facts)]


def quiet_period(rules: Sequence[RoutingRule], facts: SeriesFacts, default: float) -> float:
    """The longest quiet period among the rules that match (the default if none sets one)."""
    periods = [r.quiet_period_s for r in matching_rules(rules, facts)
               if r.quiet_period_s is not None]
    return max(periods) if periods else default
