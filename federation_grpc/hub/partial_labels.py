"""Partial labels on the hub: which groups an update may declare, and who trains what.

A node declares what it annotates through the ``trained_groups`` of each update header
(``encoder`` plus ``heads.<h>`` for the heads owning its labels; the labels of a head
are in the generation's config, which the hub holds). No other channel is needed: the
hub merges a head only from the updates that carry it (:mod:`strategies`), and the
groups a node has contributed are what ``tessera hub nodes`` shows.

Hostile or stale headers are refused before any byte is accepted: every declared group
must be a parameter group of the base generation (its tensors) or a head added to it
and still pending (``tessera hub add-head``). The bytes are checked against the same
groups when they have arrived (``uploads.validate_tensors``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub.heads import pending_heads
from federation_grpc.hub.parameters import HEADS_PREFIX, groups_of, is_head_group


def generation_groups(tensor_names: Iterable[str], config_json: str) -> set[str]:
    """Groups an update trained from this generation may carry."""
    groups = set(groups_of(list(tensor_names)))
    return groups | {f"{HEADS_PREFIX}{h}" for h in pending_heads(config_json)}


def check_trained_groups(trained_groups: Sequence[str], known: set[str],
                         base_generation: int) -> None:
    """Refuse a header declaring a group its base generation does not have.

    Raises
    ------
    InvalidRequest
        Naming the unknown groups, the base generation and its groups.
    """
    unknown = sorted(set(trained_groups) - known)
    if unknown:
        raise InvalidRequest(
            f"trained_groups {unknown} are not parameter groups of base generation "
            f"{base_generation} (it has {sorted(known)}); a head must exist in the model "
            "(or be added with 'tessera hub add-head') before nodes can train it")


def head_labels(config_json: str) -> dict[str, tuple[str, ...]]:
    """``{head: labels}`` from a generation's config (``{}`` if it has no heads)."""
    try:
        heads = json.loads(config_json).get("heads") or {}
    except (json.JSONDecodeError, AttributeError, TypeError):
        return {}
    if not isinstance(heads, dict):
        return {}
    return {str(h): tuple(str(x) for x in labs) for h, labs in heads.items()
            if isinstance(labs, list)}


def trained_heads(group_lists: Iterable[Sequence[str]]) -> tuple[str, ...]:
    """Sorted head names over several updates' ``trained_groups``."""
    return tuple(sorted({g[len(HEADS_PREFIX):] for groups in group_lists for g in groups
                         if is_head_group(g)}))


def describe_heads(heads: Sequence[str], labels: Mapping[str, Sequence[str]]) -> str:
    """``liver (liver), kidneys (kidney_left, kidney_right)`` for operators."""
    return ", ".join(f"{h} ({', '.join(labels[h])})" if labels.get(h) else h for h in heads)
