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

Its parts: labels and heads in :mod:`~dicom_node.learning.label_specs`, the input in
:mod:`~dicom_node.learning.preprocessing_spec`, external networks in
:mod:`~dicom_node.learning.external`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.external import (
    MONAI_HEADS_PREFIX,
    NETWORK_HEAD,
    WITH_HEADS,
    NetworkOutput,
    NetworkSpec,
    check_architecture,
    is_external,
    monai_class_name,
)
from dicom_node.learning.label_specs import AddedHead, HeadSpec, LabelSpec
from dicom_node.learning.preprocessing_spec import Preprocessing

FORMAT = "tessera-model/1"


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": list(self.channels),
            "decoder_convs": self.decoder_convs,
            "norm_groups": self.norm_groups,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetHyperparameters:
        return cls(
            channels=tuple(int(c) for c in data["channels"]),
            decoder_convs=int(data["decoder_convs"]),
            norm_groups=int(data["norm_groups"]),
        )


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
    network: NetworkSpec | None = None

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
        if self.is_external:
            self._check_external()
            return
        if self.has_monai_encoder:
            self._check_monai_encoder()
            return
        if self.network is not None:
            raise ModelConfigError(f"network: not used by architecture {self.architecture!r}")
        size, depth = self.preprocessing.input_size, self.hyperparameters.depth
        if size % 2 ** (depth - 1):
            raise ModelConfigError(
                f"preprocessing.input_size {size} must be divisible by 2**(depth-1)"
            )

    def _check_external(self) -> None:
        check_architecture(self.architecture)
        net = self.network
        if net is None:
            raise ModelConfigError(f"architecture {self.architecture!r} needs a 'network' object")
        if len(self.heads) != 1 or self.heads[0].name != NETWORK_HEAD:
            raise ModelConfigError(
                f"heads: an external network has one head {NETWORK_HEAD!r} owning every label "
                f"(separate heads need {WITH_HEADS})")
        if self.added_heads:
            raise ModelConfigError(f"added_heads: continual heads need {WITH_HEADS}")
        labels = self.heads[0].labels
        if net.out_channels != len(labels) + 1:
            raise ModelConfigError(
                f"labels: the network has {net.out_channels} output channels (background + "
                f"{net.out_channels - 1} labels) but {len(labels)} labels are given")
        self._check_input(net)

    def _check_input(self, net: NetworkSpec) -> None:
        """A 3D network takes one channel of a volume prepared by ``preprocessing.volume``;
        a 2D one the channels the slice preprocessing makes."""
        if net.spatial_dims == 3:
            if self.preprocessing.volume is None:
                raise ModelConfigError("preprocessing.volume is required for a 3D network")
            if net.in_channels != 1:
                raise ModelConfigError("network.args.in_channels: 3D networks take 1 channel")
        elif net.in_channels != self.preprocessing.in_channels:
            raise ModelConfigError(
                f"network.args.in_channels is {net.in_channels}, preprocessing gives "
                f"{self.preprocessing.in_channels}")

    def _check_monai_encoder(self) -> None:
        monai_class_name(self.architecture)
        net = self.network
        if net is None:
            raise ModelConfigError(f"architecture {self.architecture!r} needs a 'network' object "
                                   "(the encoder's arguments)")
        self._check_input(net)
        if net.output is not NetworkOutput.LOGITS:
            raise ModelConfigError("network.output: an encoder's output feeds the heads; "
                                   "it must be 'logits' (features)")
        groups = self.hyperparameters.norm_groups
        if net.out_channels % groups:
            raise ModelConfigError(
                f"network.args.out_channels {net.out_channels} (the features each head "
                f"reads) must be divisible by hyperparameters.norm_groups {groups}")

    @property
    def has_monai_encoder(self) -> bool:
        """A MONAI network as the shared encoder of named heads (``monai-heads:<Class>``)."""
        return self.architecture.startswith(MONAI_HEADS_PREFIX)

    @property
    def is_external(self) -> bool:
        """A MONAI or TorchScript network (one head, one parameter group)."""
        return is_external(self.architecture)

    @property
    def spatial_dims(self) -> int:
        return 2 if self.network is None else self.network.spatial_dims

    @property
    def trains_on_volumes(self) -> bool:
        """Corrections are kept and trained as whole volumes (an external network, or
        heads on a 3D encoder); else as slices."""
        return self.is_external or self.spatial_dims == 3

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
        """Groups the hub merges separately: ``encoder`` and ``heads.<name>``; an
        external network is the one group ``network``."""
        if self.is_external:
            return (NETWORK_HEAD,)
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
        return {
            "format": FORMAT,
            "name": self.name,
            "generation": self.generation,
            "architecture": self.architecture,
            "hyperparameters": self.hyperparameters.to_dict(),
            "labels": [lab.to_dict() for lab in self.labels],
            "heads": {h.name: list(h.labels) for h in self.heads},
            "preprocessing": self.preprocessing.to_dict(),
            **({"network": self.network.to_dict()} if self.network is not None else {}),
            **({"added_heads": {a.name: a.to_record() for a in self.added_heads}}
               if self.added_heads else {}),
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
                hyperparameters=UNetHyperparameters.from_dict(hp),
                labels=tuple(LabelSpec.from_dict(lab) for lab in data["labels"]),
                heads=tuple(
                    HeadSpec(name=str(name), labels=tuple(str(x) for x in labs))
                    for name, labs in dict(data["heads"]).items()
                ),
                preprocessing=Preprocessing.from_dict(pp),
                network=(NetworkSpec.from_dict(data["network"])
                         if data.get("network") is not None else None),
                added_heads=tuple(
                    AddedHead.from_record(str(name), rec)
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


def _unique(what: str, items: list[Any]) -> None:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise ModelConfigError(f"{what} {item!r} is not unique")
        seen.add(item)


def external_config(
    name: str,
    architecture: str,
    network: NetworkSpec,
    labels: Iterable[LabelSpec],
    preprocessing: Preprocessing,
    *,
    generation: int = 0,
) -> ModelConfig:
    """A MONAI/TorchScript model: labels in output-channel order (channel 0 background)."""
    labels = tuple(labels)
    return ModelConfig(
        name=name, generation=generation, labels=labels,
        heads=(HeadSpec(NETWORK_HEAD, tuple(lab.name for lab in labels)),),
        architecture=architecture, preprocessing=preprocessing, network=network)


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
