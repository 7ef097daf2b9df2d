"""Continual classes on the hub: add a head to the model, accept and merge its first weights.

The hub has no torch and does not know the architecture, so it never makes weights.
``tessera hub add-head`` publishes a generation whose *tensors are the current ones
unchanged* and whose config gains the head, its labels and a record in
``added_heads``::

    "added_heads": {"kidneys": {"init_seed": 81234, "added_in": 3, "trained": false}}

Nodes build the head and initialise it from ``init_seed`` (numpy PCG64, identical on
every node; ``dicom_node.learning.continual``). While ``trained`` is false the head is
*pending*: nodes do not run it and write none of its labels to SEG objects.

A node whose corrections annotate the new labels trains only that head on the frozen
encoder and uploads the group ``heads.<name>``. The base generation holds no tensors
for it, so :func:`new_head_tensors` checks such a group against the config instead:
the head must be pending in the base generation's config, its tensors must have the
names of an existing head and the same shapes, except the output layer (the tensors
whose first axis is the template head's class count), whose first axis must be the
new head's class count. When a merge first carries the head, the candidate takes its
weights (there is no prior to mix with; several updates in one batch are averaged by
sample count and staleness, see ``aggregation``) and :func:`mark_trained` flips
``trained`` in the new generation's config, so nodes start to use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from federation_grpc.errors import FailedPrecondition, InvalidRequest
from federation_grpc.hub.generations import NewGeneration
from federation_grpc.hub.parameters import (
    HEADS_PREFIX,
    groups_of,
    is_head_group,
    non_finite_tensors,
)

if TYPE_CHECKING:
    from federation_grpc.hub.domain import GenerationView
    from federation_grpc.hub.generations import GenerationLedger

LOGGER = logging.getLogger(__name__)

MODEL_FORMAT = "tessera-model/1"
ADD_HEAD_STRATEGY = "add-head"
# The node's rule for head and label names (dicom_node.learning.label_specs.NAME_RE).
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# DICOM Coding Scheme Designator (SH) and Code Meaning (LO) limits.
SCHEME_RE = re.compile(r"^[A-Z0-9_.-]{1,16}$")
_LABEL_KEYS = {"name", "value", "code", "meaning", "scheme"}

# Verhoeff tables (SNOMED CT identifiers end in a Verhoeff check digit).
_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6), (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4), (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2), (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_valid(digits: str) -> bool:
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _D[check][_P[i % 8][int(ch)]]
    return check == 0


def snomed_concept_problem(code: str) -> str | None:
    """Why ``code`` is not a SNOMED CT concept identifier, or ``None`` when it is one.

    An SCTID is 6-18 digits without a leading zero, ends in a Verhoeff check digit,
    and its partition identifier (the two digits before the check digit) is ``00``
    (international concept) or ``10`` (extension concept).
    """
    if not code.isascii() or not code.isdigit():
        return "must be digits only"
    if not 6 <= len(code) <= 18 or code[0] == "0":
        return "must be 6-18 digits without a leading zero"
    if code[-3:-1] not in ("00", "10"):
        return f"has partition {code[-3:-1]!r}, which is not a concept (00 or 10)"
    if not verhoeff_valid(code):
        return "fails its Verhoeff check digit (a typo?)"
    return None


@dataclass(frozen=True)
class NewLabel:
    """A label of an added head, validated when built."""

    name: str
    value: int
    code: str
    meaning: str
    scheme: str = "SCT"

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise InvalidRequest(f"label name {self.name!r} must match {NAME_RE.pattern}")
        if not 1 <= self.value <= 255:
            raise InvalidRequest(f"label {self.name}: value must be 1..255, got {self.value}")
        if not SCHEME_RE.match(self.scheme):
            raise InvalidRequest(f"label {self.name}: scheme {self.scheme!r} is not a coding "
                                 "scheme designator (SCT, or up to 16 of A-Z 0-9 _ . -)")
        if self.scheme == "SCT":
            problem = snomed_concept_problem(self.code)
            if problem:
                raise InvalidRequest(f"label {self.name}: SNOMED CT code {self.code!r} {problem}")
        elif not 1 <= len(self.code) <= 16 or "\\" in self.code or not self.code.isprintable():
            raise InvalidRequest(f"label {self.name}: code must be 1-16 printable characters")
        meaning = self.meaning
        if not 1 <= len(meaning) <= 64 or "\\" in meaning or not meaning.isprintable():
            raise InvalidRequest(
                f"label {self.name}: meaning must be 1-64 printable characters without '\\'"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "code": self.code,
                "scheme": self.scheme, "meaning": self.meaning, "enclosing": False}


@dataclass(frozen=True)
class NewHead:
    """A head to add: its name and labels (one softmax: labels exclusive within it)."""

    name: str
    labels: tuple[NewLabel, ...]

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise InvalidRequest(f"head name {self.name!r} must match {NAME_RE.pattern}")
        if not self.labels:
            raise InvalidRequest(f"head {self.name}: at least one label is required")
        for what, items in (("name", [lab.name for lab in self.labels]),
                            ("value", [lab.value for lab in self.labels]),
                            ("code", [(lab.scheme, lab.code) for lab in self.labels])):
            if len(set(items)) != len(items):
                raise InvalidRequest(f"head {self.name}: label {what}s repeat: {items}")

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1


def parse_labels(text: str) -> tuple[NewLabel, ...]:
    """Labels from JSON: a list of ``{"name", "value", "code", "meaning"[, "scheme"]}``.

    Raises
    ------
    InvalidRequest
        Not JSON, not a list of objects, unknown or missing keys, wrong types, or a
        label that fails :class:`NewLabel`'s rules.
    """
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"labels are not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise InvalidRequest("labels must be a JSON list of objects")
    labels = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidRequest(f"labels[{i}] must be an object, got {type(item).__name__}")
        unknown = set(item) - _LABEL_KEYS
        missing = {"name", "value", "code", "meaning"} - set(item)
        if unknown or missing:
            raise InvalidRequest(f"labels[{i}]: unknown keys {sorted(unknown)}, "
                                 f"missing keys {sorted(missing)}")
        value = item["value"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"labels[{i}].value must be an integer, got {value!r}")
        texts = {k: item.get(k, "SCT") for k in ("name", "code", "meaning", "scheme")}
        for key, text_value in texts.items():
            if not isinstance(text_value, str):
                raise InvalidRequest(f"labels[{i}].{key} must be a string, got {text_value!r}")
        labels.append(NewLabel(texts["name"], value, texts["code"], texts["meaning"],
                               texts["scheme"]))
    return tuple(labels)


# -- the model config as JSON ---------------------------------------------------------------
def _model_config(config_json: str) -> dict[str, Any]:
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(f"the current generation's config is not JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise FailedPrecondition(
            f"the current generation's config is not a {MODEL_FORMAT} model; heads cannot "
            "be added to it")
    if not isinstance(config.get("heads"), dict) or not isinstance(config.get("labels"), list):
        raise FailedPrecondition("the current generation's config has no heads/labels")
    return config


def default_seed(model_name: str, head: str, generation: int) -> int:
    """A reproducible init seed: the same add-head on the same hub gives the same head."""
    digest = hashlib.sha256(f"{model_name}/{head}/{generation}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def config_with_head(
    config_json: str, head: NewHead, *, init_seed: int, added_in: int
) -> str:
    """The config JSON with ``head`` added as pending.

    Raises
    ------
    InvalidRequest
        The head name exists, a label name, value or (scheme, code) is already used by
        the model (the label message names the head that owns it).
    FailedPrecondition
        The config is not a Tessera model config.
    """
    config = _model_config(config_json)
    heads: dict[str, list[str]] = config["heads"]
    if head.name in heads:
        raise InvalidRequest(f"head {head.name!r} already exists (labels {heads[head.name]})")
    owner = {lab: h for h, labs in heads.items() for lab in labs}
    existing = [lab for lab in config["labels"] if isinstance(lab, dict)]
    for new in head.labels:
        for old in existing:
            where = f"label {old.get('name')!r} of head {owner.get(str(old.get('name')), '?')!r}"
            if old.get("name") == new.name:
                raise InvalidRequest(f"label {new.name!r} already exists: it is {where}")
            if old.get("value") == new.value:
                raise InvalidRequest(f"label value {new.value} is already used by {where}")
            if (old.get("scheme", "SCT"), old.get("code")) == (new.scheme, new.code):
                raise InvalidRequest(f"code {new.scheme} {new.code} ({new.meaning}) already "
                                     f"denotes {where}")
    if not 0 <= init_seed < 2**63:
        raise InvalidRequest("init_seed must be 0..2**63-1")
    out = dict(config)
    out["labels"] = [*config["labels"], *(lab.to_dict() for lab in head.labels)]
    out["heads"] = {**heads, head.name: [lab.name for lab in head.labels]}
    out["added_heads"] = {**dict(config.get("added_heads") or {}), head.name: {
        "init_seed": init_seed, "added_in": added_in, "trained": False}}
    return json.dumps(out, indent=2)


def pending_heads(config_json: str) -> dict[str, int]:
    """``{head: class count}`` of the pending added heads (``{}`` for any other config)."""
    try:
        config = json.loads(config_json)
    except (json.JSONDecodeError, TypeError):
        return {}
    if not isinstance(config, dict):
        return {}
    added = config.get("added_heads") or {}
    heads = config.get("heads") or {}
    if not isinstance(added, dict) or not isinstance(heads, dict):
        return {}
    return {name: len(heads.get(name, [])) + 1 for name, rec in added.items()
            if isinstance(rec, dict) and rec.get("trained") is False and name in heads}


def head_classes(config_json: str) -> dict[str, int]:
    try:
        heads = json.loads(config_json).get("heads") or {}
    except (json.JSONDecodeError, AttributeError, TypeError):
        return {}
    return {str(k): len(v) + 1 for k, v in heads.items() if isinstance(v, list)}


def mark_trained(config_json: str, tensors: Mapping[str, np.ndarray]) -> str:
    """``config_json`` with every pending head that ``tensors`` now carry marked trained."""
    pending = pending_heads(config_json)
    carried = {g[len(HEADS_PREFIX):] for g in groups_of(tensors) if is_head_group(g)}
    now_trained = sorted(set(pending) & carried)
    if not now_trained:
        return config_json
    config = json.loads(config_json)
    for name in now_trained:
        config["added_heads"][name] = {**config["added_heads"][name], "trained": True}
    LOGGER.info("added head(s) %s trained: nodes start to run them", ", ".join(now_trained))
    return json.dumps(config, indent=2)


# -- the first weights of a new head --------------------------------------------------------
def new_head_tensors(
    update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], config_json: str
) -> dict[str, np.ndarray]:
    """The tensors of ``update`` that belong to heads the base generation does not hold.

    Such a head must be pending in ``config_json`` (the base generation's config); its
    tensors are checked against an existing head of the base (see the module text).

    Raises
    ------
    InvalidRequest
        A new group that is no pending head, tensor names or shapes that do not follow
        the template head, a dtype other than the base's, non-finite values.
    """
    base_groups = groups_of(base)
    fresh_groups = {g: names for g, names in groups_of(update).items()
                    if g not in base_groups}
    if not fresh_groups:
        return {}
    pending = pending_heads(config_json)
    classes = head_classes(config_json)
    template = next((g for g in base_groups if is_head_group(g)
                     and g[len(HEADS_PREFIX):] in classes), None)
    out: dict[str, np.ndarray] = {}
    for group, names in fresh_groups.items():
        head = group[len(HEADS_PREFIX):] if is_head_group(group) else None
        if head is None or head not in pending:
            raise InvalidRequest(f"unknown tensor names: {names[:5]} (group {group!r} is not "
                                 "in the base generation nor a pending added head)")
        if template is None:
            raise InvalidRequest(f"no existing head to check {group!r} against")
        _check_like_template(update, group, names, base, template,
                             classes[template[len(HEADS_PREFIX):]], pending[head])
        out.update({name: update[name] for name in names})
    bad = non_finite_tensors(out)
    if bad:
        raise InvalidRequest(f"non-finite values in new head tensors {bad[:5]}")
    return out


def _check_like_template(
    update: Mapping[str, np.ndarray], group: str, names: Sequence[str],
    base: Mapping[str, np.ndarray], template: str, template_classes: int, classes: int,
) -> None:
    rel = {name[len(group) + 1:]: name for name in names}
    expected = {name[len(template) + 1:]: name for name in base if name.startswith(template + ".")}
    if set(rel) != set(expected):
        missing, extra = sorted(set(expected) - set(rel)), sorted(set(rel) - set(expected))
        raise InvalidRequest(f"new head {group!r} does not have the tensors of {template!r}: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
    for suffix, name in rel.items():
        value, like = update[name], base[expected[suffix]]
        want = list(like.shape)
        if want and want[0] == template_classes:
            want[0] = classes  # the output layer: one channel per class
        if list(value.shape) != want or value.dtype != like.dtype:
            raise InvalidRequest(f"tensor {name!r} is {value.dtype}{list(value.shape)}, "
                                 f"expected {like.dtype}{want}")


# -- the admin operation ---------------------------------------------------------------------
def add_head(ledger: GenerationLedger, head: NewHead, *, init_seed: int | None = None,
             dry_run: bool = False) -> tuple[GenerationView | None, str]:
    """Publish a generation that adds ``head`` (pending) on top of the current one.

    Holds the merge lock, so no merge can publish on the old parent meanwhile. Returns
    the new generation (``None`` for ``dry_run``) and its config JSON.

    Raises
    ------
    InvalidRequest
        See :func:`config_with_head`.
    FailedPrecondition
        No model yet, a candidate under federated evaluation (it would drop the head
        when promoted), or a config that is not a Tessera model.
    """
    with ledger.merge_lock():
        current = ledger.require_current()
        evaluating = ledger.candidate_number()
        number = ledger.next_number()
        if evaluating is not None:
            raise FailedPrecondition(f"candidate generation {evaluating} is under federated "
                                     "evaluation; add the head once it is settled")
        name = str(json.loads(current.config_json).get("name", "")) if current.config_json else ""
        seed = default_seed(name, head.name, number) if init_seed is None else init_seed
        config_json = config_with_head(current.config_json, head, init_seed=seed,
                                       added_in=number)
        if dry_run:
            return None, config_json
        new = NewGeneration(current.number, current.sha256, current.size_bytes, config_json,
                            ADD_HEAD_STRATEGY)
        with ledger.store.session() as session:
            number = ledger.publish(session, new)
    LOGGER.warning("head %s (%s) added as generation %d on top of %d", head.name,
                   ", ".join(lab.name for lab in head.labels), number, current.number)
    return ledger.generation(number), config_json
