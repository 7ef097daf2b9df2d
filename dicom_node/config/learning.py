"""``[learning]``: learning from corrections, with the round's training policy in
``[learning.round]`` and rehearsal in ``[learning.rehearsal]``.

The two sub-sections are the policy objects' own fields under the same names
(:class:`~dicom_node.learning.policy.TrainingPolicy`,
:class:`~dicom_node.learning.policy.RehearsalPlan`): each is validated by building
that object, so a rule lives in one place, and :meth:`RoundSettings.policy` /
:meth:`RehearsalSettings.plan` hand the stage the object itself.

Keys that sat flat in ``[learning]`` before these sections existed (``epochs``,
``rehearsal_site``, ...; :data:`RENAMED_KEYS`) are still accepted for one release: they
are moved to their new place with a warning naming it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Literal, Self, TypeVar

from pydantic import Field, field_validator, model_validator

from dicom_node.config.sections import Section
from dicom_node.learning.errors import TrainingError
from dicom_node.learning.policy import NODE_ROUND, RehearsalPlan, TrainingPolicy

__all__ = ["RENAMED_KEYS", "LearningSettings", "RehearsalSettings", "RoundSettings"]

LOGGER = logging.getLogger(__name__)
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")  # model label names
_PLAN = RehearsalPlan()
T = TypeVar("T")

# Old flat [learning] key -> (sub-section, key). Accepted with a warning for one release.
RENAMED_KEYS: dict[str, tuple[str, str]] = {
    **{key: ("round", key) for key in (
        "epochs", "batch_size", "learning_rate", "augment", "time_budget_s",
        "replay_fraction", "encoder_lr_scale", "distill_weight", "distill_other_heads",
        "l2sp_alpha")},
    **{f"rehearsal_{key}": ("rehearsal", key) for key in (
        "site", "subjects", "seed", "fraction", "margin")},
}


def _built(policy: Callable[..., T], **fields: Any) -> T:
    """``policy(**fields)``, its refusal as the ValueError pydantic reports with the key."""
    try:
        return policy(**fields)
    except TrainingError as exc:
        raise ValueError(str(exc)) from None


class RoundSettings(Section):
    """``[learning.round]``: how a local training round runs (Dafne: 5 epochs of Adam at
    1e-3 on the corrected slices), plus what keeps it from forgetting what the model knew
    without any of the data it came from. Each key is the
    :class:`~dicom_node.learning.policy.TrainingPolicy` field of the same name, which
    documents it; the defaults are the node's policy, :data:`NODE_ROUND`."""

    epochs: int = NODE_ROUND.epochs
    batch_size: int = NODE_ROUND.batch_size
    learning_rate: float = NODE_ROUND.learning_rate
    augment: bool = NODE_ROUND.augment
    time_budget_s: float = NODE_ROUND.time_budget_s or 0.0  # NODE_ROUND sets it (50 s)
    replay_fraction: float = NODE_ROUND.replay_fraction
    encoder_lr_scale: float = NODE_ROUND.encoder_lr_scale
    distill_weight: float = NODE_ROUND.distill_weight
    distill_other_heads: float = NODE_ROUND.distill_other_heads
    l2sp_alpha: float = NODE_ROUND.l2sp_alpha

    @model_validator(mode="after")
    def _is_a_policy(self) -> Self:
        self.policy()
        return self

    def policy(self, **runtime: Any) -> TrainingPolicy:
        """The round's :class:`TrainingPolicy`; ``runtime`` adds what the node decides at
        run time (device, threads, the anchors' share of a batch).

        Raises
        ------
        ValueError
            The combination is not a valid policy (the message says which rule).
        """
        return _built(TrainingPolicy, **self.model_dump(), **runtime)


class RehearsalSettings(Section):
    """``[learning.rehearsal]``: anchor slices of phantom ``site`` (the starter's origin;
    ``""`` turns rehearsal off), made on the node, fill ``fraction`` of each batch; a round
    whose anchor Dice falls by more than ``margin`` is refused. The fields are
    :class:`~dicom_node.learning.policy.RehearsalPlan`'s, with its defaults."""

    site: str = _PLAN.site
    subjects: int = _PLAN.subjects
    seed: int = _PLAN.seed
    fraction: float = _PLAN.fraction
    margin: float = _PLAN.margin

    @model_validator(mode="after")
    def _is_a_plan(self) -> Self:
        self.plan()
        return self

    def plan(self) -> RehearsalPlan:
        return _built(RehearsalPlan, **self.model_dump())

    @property
    def anchor_fraction(self) -> float:
        """The share of each batch the anchors take (0 with rehearsal off)."""
        return self.fraction if self.site else 0.0


class LearningSettings(Section):
    """Learning from corrections: which corrections become samples, when a round runs,
    and when its result may serve; the round itself is ``round``, rehearsal
    ``rehearsal``."""

    enabled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where training rounds run
    # Labels this hospital annotates; only their heads train (masked loss). Empty: all.
    annotated_labels: tuple[str, ...] = ()
    train_every: int = Field(1, ge=1)          # queue training after every N corrections
    threads: int = Field(2, ge=1, le=64)
    neighbour_slices: int = Field(2, ge=0)      # stored around each touched slice
    replay_max_slices: int = Field(600, ge=0)   # replay buffer budget (earlier local slices)
    # Adam's moments are kept from one round to the next (data_dir/optimiser/<model>),
    # as a federated client keeps its optimiser while weights come from the hub: a
    # fresh Adam's first steps are full-size whatever the gradient, and rounds are
    # short (benchmarks/partial_labels.py). They never leave the node.
    keep_optimiser_state: bool = True
    # A federated round that started from a local version sends, as its update, a second
    # round trained from the hub generation (pipeline/round_update.py); that round is
    # pulled toward the generation with this L2-SP strength (FedProx's proximal term),
    # so a site's update carries less that undoes what other sites taught the shared
    # model (benchmarks/federated_learning.py --hub-round-l2sp). 0: off.
    hub_round_l2sp: float = Field(1.0, ge=0)
    validation_every: int = Field(5, ge=0)      # every Nth correction is held out; 0: none
    acceptance_margin: float = Field(0.01, ge=0, le=1)
    max_correction_mb: float = Field(256.0, gt=0)  # larger SEGs are flagged, not read
    max_correction_frames: int = Field(20000, ge=1)
    round: RoundSettings = RoundSettings()
    rehearsal: RehearsalSettings = RehearsalSettings()

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not RENAMED_KEYS.keys() & data.keys():
            return data
        data = dict(data)
        for old, (section, key) in RENAMED_KEYS.items():
            if old not in data:
                continue
            table = data.get(section, {})
            if not isinstance(table, dict):
                continue  # the section's own validation names the problem
            if key in table:
                raise ValueError(f"{old} and {section}.{key} are both set: keep "
                                 f"[learning.{section}] {key} (the old name is deprecated)")
            LOGGER.warning("configuration: [learning] %s is deprecated and will be refused "
                           "after the next release; write it as [learning.%s] %s",
                           old, section, key)
            data[section] = {**table, key: data.pop(old)}
        return data

    @field_validator("annotated_labels")
    @classmethod
    def _label_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # Whether each is a label of a served model is checked when the models load.
        for name in v:
            if not _LABEL_RE.match(name):
                raise ValueError(f"{name!r} is not a label name (a model label such as "
                                 f"'liver': {_LABEL_RE.pattern})")
        repeated = sorted({n for n in v if v.count(n) > 1})
        if repeated:
            raise ValueError(f"labels repeat: {repeated}")
        return v

    @model_validator(mode="after")
    def _batch_has_new_samples(self) -> Self:
        self.round.policy(anchor_fraction=self.rehearsal.fraction)
        return self
