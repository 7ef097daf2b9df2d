"""What a model outputs: its labels (with their coded concepts), the heads that own them,
and the heads added to a running model (continual classes).

Label and head names follow one rule (:data:`NAME_RE`), which the hub checks too
(``federation_grpc.hub.heads``) when it adds a head.

Heads
-----
Each head is a decoder that owns a set of labels and predicts them plus background with
one softmax (mutually exclusive within the head). Heads are combined into one label map
by confidence: a voxel gets the non-enclosing label whose head is most confident about
it; voxels no such head claims get an *enclosing* label (``body``) if its head claims
them, else background. An enclosing label is a region that contains every other label,
so its head is trained on the union of all labels (the body silhouette) and needs no
knowledge of the organs inside it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicom_node.learning.errors import ModelConfigError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")


@dataclass(frozen=True)
class LabelSpec:
    """One output label: its value in label maps and its SNOMED CT coded concept."""

    name: str
    value: int
    code: str
    meaning: str
    scheme: str = "SCT"
    enclosing: bool = False

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ModelConfigError(f"labels: name {self.name!r} must match {NAME_RE.pattern}")
        if not 1 <= self.value <= 255:
            raise ModelConfigError(f"labels.{self.name}.value must be 1..255, got {self.value}")
        if not self.code or not self.meaning:
            raise ModelConfigError(f"labels.{self.name}: code and meaning are required")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "code": self.code,
            "scheme": self.scheme,
            "meaning": self.meaning,
            "enclosing": self.enclosing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSpec:
        return cls(
            name=str(data["name"]),
            value=int(data["value"]),
            code=str(data["code"]),
            scheme=str(data.get("scheme", "SCT")),
            meaning=str(data["meaning"]),
            enclosing=bool(data.get("enclosing", False)),
        )


@dataclass(frozen=True)
class HeadSpec:
    """A decoder head and the labels it owns (a "task")."""

    name: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ModelConfigError(f"heads: name {self.name!r} must match {NAME_RE.pattern}")
        if not self.labels:
            raise ModelConfigError(f"heads.{self.name} owns no labels")

    @property
    def num_classes(self) -> int:
        """Softmax width: background plus the head's labels."""
        return len(self.labels) + 1


@dataclass(frozen=True)
class AddedHead:
    """A head added to a running model (continual classes): ``tessera hub add-head``.

    ``init_seed`` makes every node initialise the head identically until trained
    weights exist; ``trained`` turns true once they do (a hub merge or a local round
    carried the head). An untrained head is *pending*: it is not run at inference and
    its labels are not written to SEG objects, so it never emits random output.
    """

    name: str
    init_seed: int
    added_in: int = 0
    trained: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.init_seed < 2**63:
            raise ModelConfigError(f"added_heads.{self.name}.init_seed must be 0..2**63-1")

    def to_record(self) -> dict[str, Any]:
        """The ``added_heads`` entry of the model's JSON (keyed by the head's name)."""
        return {"init_seed": self.init_seed, "added_in": self.added_in, "trained": self.trained}

    @classmethod
    def from_record(cls, name: str, record: Mapping[str, Any]) -> AddedHead:
        return cls(
            name=name,
            init_seed=int(record["init_seed"]),
            added_in=int(record.get("added_in", 0)),
            trained=_strict_bool(record.get("trained", False), f"added_heads.{name}"),
        )


def _strict_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ModelConfigError(f"{what}.trained must be true or false, got {value!r}")
    return value
