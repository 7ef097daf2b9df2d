"""What a model is, as data: architecture name, hyper-parameters, heads, labels, preprocessing.

A model travels as safetensors weights plus this configuration as JSON (invariant 4:
no code from the network). The JSON layout (``format`` ``tessera-model/1``)::

    {"format": "tessera-model/1", "name": "tessera-abdomen-ct", "generation": 0,
     "architecture": "unet2d-multihead",
     "hyperparameters": {"channels": [8, 16, 32, 64, 128], "decoder_convs": 1,
                         "norm_groups": 4},
     "labels": [{"name": "liver", "value": 2, "code": "10200004", "scheme": "SCT",
                 "meaning": "Liver", "enclosing": false}, ...],
     "heads": {"body": ["body"], "liver": ["liver"], ...},
     "preprocessing": {"modality": "CT", "input_size": 128,
                       "ct_windows": [[-1000, 1000], [-160, 240]], "mr_percentiles": [1, 99]},
     "added_heads": {"kidneys": {"init_seed": 81234, "added_in": 3, "trained": false}}}

``added_heads`` is present only once ``tessera hub add-head`` has added a head
(continual classes, see :mod:`dicom_node.learning.continual`).

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

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from dicom_node.learning.errors import ModelConfigError

FORMAT = "tessera-model/1"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")


class Modality(StrEnum):
    CT = "CT"
    MR = "MR"


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
        if not _NAME_RE.match(self.name):
            raise ModelConfigError(f"labels: name {self.name!r} must match {_NAME_RE.pattern}")
        if not 1 <= self.value <= 255:
            raise ModelConfigError(f"labels.{self.name}.value must be 1..255, got {self.value}")
        if not self.code or not self.meaning:
            raise ModelConfigError(f"labels.{self.name}: code and meaning are required")


@dataclass(frozen=True)
class HeadSpec:
    """A decoder head and the labels it owns (a "task")."""

    name: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ModelConfigError(f"heads: name {self.name!r} must match {_NAME_RE.pattern}")
        if not self.labels:
            raise ModelConfigError(f"heads.{self.name} owns no labels")

    @property
    def num_classes(self) -> int:
        """Softmax width: background plus the head's labels."""
        return len(self.labels) + 1


@dataclass(frozen=True)
class UNetHyperparameters:
    """Channels per encoder level (the last one is the bottleneck) and decoder shape."""

    channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    decoder_convs: int = 1
    norm_groups: int = 4

    def __post_init__(self) -> None:
        if len(self.channels) < 2:
            raise ModelConfigError("hyperparameters.channels needs at least 2 levels")
        for c in self.channels:
            if c <= 0 or c % self.norm_groups:
                raise ModelConfigError(
                    f"hyperparameters.channels: {c} must be positive and divisible by "
                    f"norm_groups={self.norm_groups}"
                )
        if self.decoder_convs < 1:
            raise ModelConfigError("hyperparameters.decoder_convs must be >= 1")

    @property
    def depth(self) -> int:
        return len(self.channels)


@dataclass(frozen=True)
class Preprocessing:
    """Input geometry and intensity normalisation.

    CT: one input channel per HU window, each mapped linearly to [-1, 1] and clipped.
    MR: one channel, the volume's ``mr_percentiles`` mapped to [-1, 1] and clipped.
    """

    modality: Modality = Modality.CT
    input_size: int = 128
    ct_windows: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-160.0, 240.0))
    mr_percentiles: tuple[float, float] = (1.0, 99.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", Modality(self.modality))
        if self.input_size < 16:
            raise ModelConfigError("preprocessing.input_size must be >= 16")
        if not self.ct_windows:
            raise ModelConfigError("preprocessing.ct_windows needs at least one window")
        for lo, hi in self.ct_windows:
            if not lo < hi:
                raise ModelConfigError(f"preprocessing.ct_windows: {lo} must be < {hi}")
        lo, hi = self.mr_percentiles
        if not 0 <= lo < hi <= 100:
            raise ModelConfigError("preprocessing.mr_percentiles must be 0 <= low < high <= 100")

    @property
    def in_channels(self) -> int:
        return len(self.ct_windows) if self.modality is Modality.CT else 1


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


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model from its weights; validated when built."""

    name: str
    generation: int
    labels: tuple[LabelSpec, ...]
    heads: tuple[HeadSpec, ...]
    architecture: str = "unet2d-multihead"
    hyperparameters: UNetHyperparameters = field(default_factory=UNetHyperparameters)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    added_heads: tuple[AddedHead, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64:
            raise ModelConfigError("name must be 1-64 characters")
        if self.generation < 0:
            raise ModelConfigError(f"generation must be >= 0, got {self.generation}")
        _unique("labels: name", [lab.name for lab in self.labels])
        _unique("labels: value", [lab.value for lab in self.labels])
        _unique("heads: name", [h.name for h in self.heads])
        if not self.heads:
            raise ModelConfigError("heads: at least one head is required")
        known = {lab.name for lab in self.labels}
        owned: dict[str, str] = {}
        for head in self.heads:
            for lab in head.labels:
                if lab not in known:
                    raise ModelConfigError(f"heads.{head.name}: unknown label {lab!r}")
                if lab in owned:
                    raise ModelConfigError(
                        f"heads.{head.name}: label {lab!r} is already owned by {owned[lab]!r}"
                    )
                owned[lab] = head.name
        _unique("added_heads: name", [a.name for a in self.added_heads])
        for added in self.added_heads:
            if added.name not in {h.name for h in self.heads}:
                raise ModelConfigError(f"added_heads.{added.name} is not a head")
        orphans = known - owned.keys()
        if orphans:
            raise ModelConfigError(f"labels {sorted(orphans)} are owned by no head")
        size, depth = self.preprocessing.input_size, self.hyperparameters.depth
        if size % 2 ** (depth - 1):
            raise ModelConfigError(
                f"preprocessing.input_size {size} must be divisible by 2**(depth-1)"
            )

    # -- lookups -------------------------------------------------------------------
    def label(self, name: str) -> LabelSpec:
        for lab in self.labels:
            if lab.name == name:
                return lab
        raise KeyError(name)

    def head(self, name: str) -> HeadSpec:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def label_values(self) -> dict[str, int]:
        """``{label name: value in label maps}``."""
        return {lab.name: lab.value for lab in self.labels}

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    def head_of(self, label: str) -> str:
        for h in self.heads:
            if label in h.labels:
                return h.name
        raise KeyError(label)

    def parameter_groups(self) -> tuple[str, ...]:
        """Groups the hub merges separately: ``encoder`` and ``heads.<name>``."""
        return ("encoder", *(f"heads.{h.name}" for h in self.heads))

    @property
    def pending_heads(self) -> tuple[str, ...]:
        """Added heads without trained weights yet: not run, not written to SEG."""
        return tuple(a.name for a in self.added_heads if not a.trained)

    @property
    def continual_heads(self) -> tuple[str, ...]:
        """Heads added to the running model; they train on the frozen encoder only."""
        return tuple(a.name for a in self.added_heads)

    @property
    def active_head_names(self) -> tuple[str, ...]:
        """Heads that inference runs: every head but the pending ones."""
        pending = set(self.pending_heads)
        return tuple(h.name for h in self.heads if h.name not in pending)

    @property
    def active_labels(self) -> tuple[LabelSpec, ...]:
        """Labels of the active heads (what a SEG of this model can contain)."""
        pending = {lab for h in self.heads if h.name in self.pending_heads for lab in h.labels}
        return tuple(lab for lab in self.labels if lab.name not in pending)

    def added_head(self, name: str) -> AddedHead:
        for added in self.added_heads:
            if added.name == name:
                return added
        raise KeyError(name)

    # -- derived configurations ----------------------------------------------------
    def with_generation(self, generation: int) -> ModelConfig:
        return replace(self, generation=generation)

    def with_head(self, head: HeadSpec, labels: Iterable[LabelSpec] = ()) -> ModelConfig:
        """A new configuration with one more head (continual classes) and its new labels."""
        return replace(self, labels=(*self.labels, *labels), heads=(*self.heads, head))

    def with_added_head(
        self, head: HeadSpec, labels: Iterable[LabelSpec], *, init_seed: int, added_in: int = 0
    ) -> ModelConfig:
        """:meth:`with_head` recorded as a pending added head (what ``add-head`` does)."""
        added = AddedHead(head.name, init_seed, added_in, trained=False)
        return replace(self.with_head(head, labels), added_heads=(*self.added_heads, added))

    def with_trained_heads(self, names: Iterable[str]) -> ModelConfig:
        """Mark added heads as trained (their weights now come from training)."""
        wanted = set(names)
        return replace(self, added_heads=tuple(
            replace(a, trained=True) if a.name in wanted else a for a in self.added_heads))

    # -- JSON ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        hp, pp = self.hyperparameters, self.preprocessing
        return {
            "format": FORMAT,
            "name": self.name,
            "generation": self.generation,
            "architecture": self.architecture,
            "hyperparameters": {
                "channels": list(hp.channels),
                "decoder_convs": hp.decoder_convs,
                "norm_groups": hp.norm_groups,
            },
            "labels": [
                {
                    "name": lab.name,
                    "value": lab.value,
                    "code": lab.code,
                    "scheme": lab.scheme,
                    "meaning": lab.meaning,
                    "enclosing": lab.enclosing,
                }
                for lab in self.labels
            ],
            "heads": {h.name: list(h.labels) for h in self.heads},
            "preprocessing": {
                "modality": pp.modality.value,
                "input_size": pp.input_size,
                "ct_windows": [list(w) for w in pp.ct_windows],
                "mr_percentiles": list(pp.mr_percentiles),
            },
            **({"added_heads": {
                a.name: {"init_seed": a.init_seed, "added_in": a.added_in, "trained": a.trained}
                for a in self.added_heads}} if self.added_heads else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from the JSON layout; raises :class:`ModelConfigError` naming the field."""
        if not isinstance(data, Mapping):
            raise ModelConfigError("model config must be a JSON object")
        if data.get("format") != FORMAT:
            raise ModelConfigError(f"format must be {FORMAT!r}, got {data.get('format')!r}")
        try:
            hp = data["hyperparameters"]
            pp = data["preprocessing"]
            return cls(
                name=str(data["name"]),
                generation=int(data["generation"]),
                architecture=str(data.get("architecture", "unet2d-multihead")),
                hyperparameters=UNetHyperparameters(
                    channels=tuple(int(c) for c in hp["channels"]),
                    decoder_convs=int(hp["decoder_convs"]),
                    norm_groups=int(hp["norm_groups"]),
                ),
                labels=tuple(
                    LabelSpec(
                        name=str(lab["name"]),
                        value=int(lab["value"]),
                        code=str(lab["code"]),
                        scheme=str(lab.get("scheme", "SCT")),
                        meaning=str(lab["meaning"]),
                        enclosing=bool(lab.get("enclosing", False)),
                    )
                    for lab in data["labels"]
                ),
                heads=tuple(
                    HeadSpec(name=str(name), labels=tuple(str(x) for x in labs))
                    for name, labs in dict(data["heads"]).items()
                ),
                preprocessing=Preprocessing(
                    modality=Modality(pp.get("modality", "CT")),
                    input_size=int(pp.get("input_size", 128)),
                    ct_windows=tuple(
                        (float(lo), float(hi))
                        for lo, hi in pp.get("ct_windows", ((-1000, 1000), (-160, 240)))
                    ),
                    mr_percentiles=tuple(float(p) for p in pp.get("mr_percentiles", (1, 99))),  # type: ignore[arg-type]
                ),
                added_heads=tuple(
                    AddedHead(
                        name=str(name),
                        init_seed=int(rec["init_seed"]),
                        added_in=int(rec.get("added_in", 0)),
                        trained=_strict_bool(rec.get("trained", False), f"added_heads.{name}"),
                    )
                    for name, rec in dict(data.get("added_heads") or {}).items()
                ),
            )
        except ModelConfigError:
            raise
        except KeyError as exc:
            raise ModelConfigError(f"model config: missing field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"model config: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"model config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _strict_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ModelConfigError(f"{what}.trained must be true or false, got {value!r}")
    return value


def _unique(what: str, items: list[Any]) -> None:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise ModelConfigError(f"{what} {item!r} is not unique")
        seen.add(item)


def abdomen_ct_config(
    *, input_size: int = 128, name: str = "tessera-abdomen-ct", generation: int = 0
) -> ModelConfig:
    """The starter model's configuration.

    One head per organ group, so that a hospital annotating only the liver trains only
    ``heads.liver`` (partial labels, issue 8) and a new structure is a new head on the
    frozen encoder (continual classes). The two kidneys share a head because they are
    annotated together and their laterality is mutually exclusive at every voxel.
    """
    labels = (
        LabelSpec("body", 1, "38266002", "Entire body", enclosing=True),
        LabelSpec("liver", 2, "10200004", "Liver"),
        LabelSpec("spleen", 3, "78961009", "Spleen"),
        LabelSpec("kidney_left", 4, "18639004", "Left kidney"),
        LabelSpec("kidney_right", 5, "9846003", "Right kidney"),
    )
    heads = (
        HeadSpec("body", ("body",)),
        HeadSpec("liver", ("liver",)),
        HeadSpec("spleen", ("spleen",)),
        HeadSpec("kidneys", ("kidney_left", "kidney_right")),
    )
    return ModelConfig(
        name=name,
        generation=generation,
        labels=labels,
        heads=heads,
        preprocessing=Preprocessing(input_size=input_size),
    )
