"""The training part of a round on whole volumes: an external (MONAI or TorchScript)
network, or heads on a 3D MONAI encoder.

    pending volume samples + replay volumes (within ``replay_max_slices``)
      --copy of the served network--> train_external (MONAI Dice-CE, partial labels
      merged into background, random ROI windows in 3D) within [learning.round]'s
      epochs and time budget --> candidate, report

Heads on a 3D encoder train instead through ``learning.training.train`` on windows of
the same volumes (:mod:`~dicom_node.learning.volume_windows`), with the node's policy
as in 2D (encoder rate, distillation, an added head alone on the frozen encoder), less
the rehearsal anchors (slices of the 2D starter).

The trainer (:class:`~dicom_node.pipeline.trainer.IncrementalTrainer`) judges the
candidate on the held-out volumes with the same gate as the multi-head U-Net's
(``learning.evaluation.evaluate_samples``, ``accept_candidate``) and commits it the
same way (version row, served if accepted, an update of the one group ``network``).

An external network is one parameter group: what the policy does with separate heads
cannot apply. The node's defaults for it (encoder learning rate scale, distillation of
trained and other heads, rehearsal anchors of the shipped starter) are left out, said
once per model in the log; the same settings written explicitly in
``[learning.round]`` are refused (:class:`ExternalRoundRefused`), since the operator
asked for something this network cannot do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dicom_node.config import LearningSettings
from dicom_node.learning.continual import after_round, continual_policy
from dicom_node.learning.errors import TrainingError
from dicom_node.learning.evaluation import decode_any_sample
from dicom_node.learning.external import WITH_HEADS, ExternalNetwork
from dicom_node.learning.external_training import train_external
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork
from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.training import TrainingReport, train
from dicom_node.learning.volume_samples import VolumeSample
from dicom_node.learning.volume_windows import prepare_volumes
from dicom_node.learning.weights import model_from_bytes, model_to_bytes
from dicom_node.store.models import TrainingSample

__all__ = ["HEAD_SETTINGS", "ExternalRoundRefused", "ExternalRounds", "external_policy"]

LOGGER = logging.getLogger(__name__)

# [learning.round] settings that act on separate heads, with the value that turns each off.
HEAD_SETTINGS: dict[str, float] = {"encoder_lr_scale": 1.0, "distill_weight": 0.0,
                                   "distill_other_heads": 0.0}


class ExternalRoundRefused(TrainingError):
    """The node's policy asks for something an external network cannot do."""


def external_policy(learning: LearningSettings, policy: TrainingPolicy
                    ) -> tuple[TrainingPolicy, list[str]]:
    """``policy`` without what needs separate heads, and the settings left out.

    Raises
    ------
    ExternalRoundRefused
        ``[learning.round]`` sets one of :data:`HEAD_SETTINGS` explicitly to a value
        other than its off value.
    """
    explicit = learning.round.model_fields_set
    asked = [f"{key} = {getattr(policy, key):g}" for key, off in HEAD_SETTINGS.items()
             if key in explicit and getattr(policy, key) != off]
    if asked:
        raise ExternalRoundRefused(
            f"[learning.round] {', '.join(asked)} needs {WITH_HEADS}; an external network "
            "is one group 'network': remove the setting(s) to train it from corrections")
    left_out = [f"{key} = {getattr(policy, key):g}" for key, off in HEAD_SETTINGS.items()
                if getattr(policy, key) != off]
    if policy.anchor_fraction:
        left_out.append(f"rehearsal anchors ({learning.rehearsal.site})")
    return replace(policy, anchor_fraction=0.0, replay_fraction=0.0, heads=None,
                   freeze_encoder=False, encoder_lr_scale=HEAD_SETTINGS["encoder_lr_scale"],
                   distill_weight=HEAD_SETTINGS["distill_weight"],
                   distill_other_heads=HEAD_SETTINGS["distill_other_heads"]), left_out


def load_volumes(data_dir: Path, rows: Iterable[TrainingSample], *, strict: bool,
                 budget: int | None = None) -> list[VolumeSample]:
    """The volume samples of ``rows`` in order, within ``budget`` slices; a slice sample
    (written while the model was a U-Net) is left out with a warning, and so is an
    unreadable file unless ``strict`` (then its error propagates: the job is retried)."""
    out: list[VolumeSample] = []
    used = 0
    for row in rows:
        if budget is not None and used + row.slices > budget:
            continue
        try:
            sample = decode_any_sample((data_dir / row.path).read_bytes())
        except (OSError, ValueError, KeyError) as exc:
            if strict:
                raise
            LOGGER.warning("sample %d unreadable, left out: %s", row.id, exc)
            continue
        if not isinstance(sample, VolumeSample):
            LOGGER.warning("sample %d is a slice sample: it cannot train an external "
                           "network, left out", row.id)
            continue
        out.append(sample)
        used += row.slices
    return out


class ExternalRounds:
    """Trains candidates on whole volumes for the trainer (one per node process): of
    external networks, and of heads on a 3D encoder."""

    def __init__(self, learning: LearningSettings, data_dir: Path) -> None:
        self.learning = learning
        self.data_dir = data_dir
        self._told: set[str] = set()  # models whose left-out settings were logged

    def train(self, name: str, model: SegmentationNetwork, config: ModelConfig,
              new_rows: Sequence[TrainingSample], replay_rows: Sequence[TrainingSample],
              policy: TrainingPolicy, code_dirs: Iterable[Path] = ()
              ) -> tuple[SegmentationNetwork, ModelConfig, TrainingReport, dict[str, Any]]:
        """A trained copy of ``model``, its config, its report and the round's figures.

        Raises
        ------
        ExternalRoundRefused
            The policy needs separate heads (see :func:`external_policy`).
        TrainingError
            No pending sample is a volume sample of a label of the model.
        """
        new = load_volumes(self.data_dir, new_rows, strict=True)
        if not new:
            raise TrainingError(f"model {name!r}: no pending volume sample to train on")
        replay = load_volumes(self.data_dir, replay_rows, strict=False,
                              budget=self.learning.replay_max_slices)
        LOGGER.info("training %s gen %d: %d new volumes, %d replay volumes", name,
                    config.generation, len(new), len(replay))
        candidate, _ = model_from_bytes(model_to_bytes(model, config), config,
                                        code_dirs=code_dirs)
        t0 = time.monotonic()
        left_out: list[str] = []
        if isinstance(candidate, MultiHeadNetwork):  # heads on a 3D encoder
            # Labels of an added head: that head alone on the frozen encoder, as in 2D;
            # the anchors are slices of the 2D starter, and replay is among the volumes.
            policy = replace(continual_policy(config, {n for v in new for n in v.annotated},
                                              policy), anchor_fraction=0.0,
                             replay_fraction=0.0)
            report = train(candidate, config, prepare_volumes([*new, *replay], config), policy)
            config = after_round(config, report)
        else:
            policy, left_out = external_policy(self.learning, policy)
            if left_out and name not in self._told:
                self._told.add(name)
                LOGGER.info("training %s (external network, one group 'network'): left out "
                            "of its rounds: %s", name, "; ".join(left_out))
            assert isinstance(candidate, ExternalNetwork)  # the config names an external one
            report = train_external(candidate, config, [*new, *replay], policy)
        training = {"volumes": len(new), "replay_volumes": len(replay),
                    "slices": sum(int(s.image.shape[0]) for s in new),
                    "replay_slices": sum(int(s.image.shape[0]) for s in replay),
                    "steps": report.steps, "epochs": report.epochs_completed,
                    "losses": list(report.epoch_losses),
                    "stopped_by_time_budget": report.stopped_by_time_budget,
                    "seconds": round(time.monotonic() - t0, 2), "left_out": left_out}
        return candidate, config, report, training
