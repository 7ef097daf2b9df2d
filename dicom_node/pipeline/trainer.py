"""The incremental trainer job: pending corrected samples -> candidate -> gate -> serve.

    pending samples + replay buffer --train_round--> candidate (generation g+1)
      --held-out corrected cases--> accept (Dice falls <= margin) or reject
      --> ModelVersion row (lineage), weights under data_dir/models,
          update artifact in the update outbox, ModelRegistry.replace (hot swap)

The multi-head U-Net trains on slices (``learning.incremental``); an external network
(MONAI, TorchScript) on whole corrected volumes (``pipeline.external_round``). Both are
judged by ``learning.evaluation.evaluate_samples`` and committed the same way.

Nothing is replaced before the new version is committed, so a crash at any point
leaves the serving model as it was and the job is retried (at-least-once). A retry
of a round that did commit (same base generation and samples, so the same update id)
only re-applies its outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import LearningSettings
from dicom_node.errors import DicomNodeError
from dicom_node.learning import optimiser_state
from dicom_node.learning.continual import after_round, continual_policy
from dicom_node.learning.device import resolve_device
from dicom_node.learning.evaluation import HeldOutSample, evaluate_samples
from dicom_node.learning.incremental import (
    StoredSample,
    accept_candidate,
    train_round,
    trained_groups,
)
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork
from dicom_node.learning.rehearsal import AnchorGate, anchor_set, anchor_slices
from dicom_node.learning.slices import SliceSample
from dicom_node.learning.training import TrainingProgress, TrainingReport
from dicom_node.learning.weights import save_model
from dicom_node.pipeline.flow import ActivatePayload, JobKind, TrainingPayload
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.round_update import hub_origin, write_update
from dicom_node.pipeline.seg import deterministic_uid
from dicom_node.pipeline.training_samples import (
    beating,
    held_out_rows,
    load_held_out,
    load_sample,
    policy_of,
    replay_slices,
    trained_rows,
)
from dicom_node.pipeline.versions import (
    LOCAL_FLOOR,
    activate_serving,
    ensure_base_version,
    next_generation,
)
from dicom_node.store.db import Database
from dicom_node.store.jobs import ClaimedJob
from dicom_node.store.models import (
    ModelVersion,
    ModelVersionState,
    SampleState,
    TrainingSample,
    UpdateOutboxItem,
)
from dicom_node.worker import PermanentJobError

if TYPE_CHECKING:
    from dicom_node.pipeline.external_round import ExternalRounds

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundSlices:
    """A round's new slices (from ``corrections`` corrections) and its replayed ones."""

    new: list[SliceSample]
    replay: list[SliceSample]
    corrections: int


@dataclass(frozen=True)
class TrainedCandidate:
    """A round's trained copy, before it is judged: its config, report and figures, and
    the rehearsal gate that judges it (multi-head U-Net only)."""

    model: SegmentationNetwork
    config: ModelConfig
    report: TrainingReport
    training: dict[str, Any]
    gate: AnchorGate | None = None
    anchor_slices: int = 0


@dataclass(frozen=True)
class RoundOutcome:
    """A trained round, judged, before anything is written."""

    name: str
    base_config: ModelConfig  # the generation the round started from
    config: ModelConfig  # the candidate's (a pending head it trained is active)
    model: SegmentationNetwork
    report: TrainingReport
    sample_ids: tuple[int, ...]
    update_id: str
    accepted: bool
    verdict: str
    metrics: dict[str, Any]
    hub_round: TrainedCandidate | None = None  # trained from the hub generation, to send
    replayed: int = 0  # corrections replayed in the round


class IncrementalTrainer:
    """Job handler for ``training`` (a round) and ``model-activate`` (follow the table)."""

    kinds: tuple[JobKind, ...] = (JobKind.TRAINING, JobKind.ACTIVATE)

    def __init__(self, db: Database, learning: LearningSettings, data_dir: Path,
                 models: ModelRegistry, *, federated: bool) -> None:
        """``federated``: local rounds are numbered from ``LOCAL_FLOOR`` up, clear of the
        hub's generation numbers."""
        self.db = db
        self.learning = learning
        self.models = models
        self.data_dir = data_dir
        self.local_floor = LOCAL_FLOOR if federated else 0
        self._gates: dict[tuple[object, ...], AnchorGate] = {}
        self._external: ExternalRounds | None = None  # built at an external model's round
        # Called with (attempt, progress) at every training step (tests inject crashes here).
        self.step_hooks: list[Callable[[int, TrainingProgress], None]] = []
        activate_serving(db, models)  # local versions survive a restart

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        if job.kind == JobKind.ACTIVATE:
            activate_serving(self.db, self.models, ActivatePayload.of(job).model)
            return
        self.train(TrainingPayload.of(job).model, attempt=job.attempts, heartbeat=heartbeat)

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        LOGGER.error("%s job for %s given up: %s", job.kind, job.key, error)

    # -- a round ---------------------------------------------------------------------
    def train(self, name: str, *, attempt: int = 1,
              heartbeat: Callable[[], None] | None = None) -> ModelVersion | None:
        """One round on ``name``'s pending samples: train, judge, commit (served only if
        accepted); None without pending samples."""
        beat = heartbeat or (lambda: None)
        base_model, base_config = self.models.get(name)
        new_rows, replay_rows, held_rows = self._rows(name, base_config)
        if not new_rows:
            LOGGER.info("training %s: no pending samples", name)
            return None
        sample_ids = [r.id for r in new_rows]
        update_id = deterministic_uid("tessera-update", name, base_config.generation,
                                      *sample_ids)
        done = self._committed(name, update_id)
        if done is not None:
            return done
        held = [load_held_out(self.data_dir, r) for r in held_rows]
        t0 = time.monotonic()
        slices = None
        if isinstance(base_model, MultiHeadNetwork) and not base_config.trains_on_volumes:
            slices = self._round_slices(new_rows, replay_rows)
            trained = self._slice_round(base_model, base_config, slices, attempt, beat)
        else:  # an external network or heads on a 3D encoder: whole volumes
            trained = self._volume_round(name, base_model, base_config, new_rows,
                                         replay_rows)
        beat()
        accepted, verdict, scores = self._judge(base_model, base_config, trained, held)
        trained.training["seconds"] = round(time.monotonic() - t0, 2)
        beat()
        origin = hub_origin(self.db, name, base_config.generation) if (
            accepted and slices is not None) else None
        hub_round = None if origin is None or slices is None else self._slice_round(
            *origin, slices, attempt, beat, moments=False,
            l2sp=self.learning.hub_round_l2sp)
        return self._commit(RoundOutcome(
            name=name, base_config=base_config, config=trained.config, model=trained.model,
            report=trained.report, sample_ids=tuple(sample_ids), update_id=update_id,
            accepted=accepted, verdict=verdict,
            metrics={**scores, "training": trained.training, "verdict": verdict},
            hub_round=hub_round, replayed=len(replay_rows)))

    def _round_slices(self, new_rows: list[TrainingSample],
                      replay_rows: list[TrainingSample]) -> RoundSlices:
        """The round's new and replayed slices, read once for every training of it."""
        return RoundSlices([x for r in new_rows for x in self._load(r).slice_samples()],
                           self._replay(replay_rows), len(new_rows))

    def _slice_round(self, base_model: MultiHeadNetwork, base_config: ModelConfig,
                     slices: RoundSlices, attempt: int, beat: Callable[[], None], *,
                     moments: bool = True, l2sp: float = 0.0) -> TrainedCandidate:
        """Train a copy of the multi-head U-Net on the new and replayed slices (Adam's
        moments of the served rounds kept, unless ``moments`` is false; ``l2sp``, when
        set, the L2-SP pull toward ``base_model``)."""
        new, replay = slices.new, slices.replay
        # Labels of an added head: train that head alone on the frozen encoder.
        policy = continual_policy(base_config, {n for x in new for n in x.annotated},
                                  policy_of(self.learning))
        if l2sp:
            policy = replace(policy, l2sp_alpha=l2sp)
        LOGGER.info("training %s gen %d: %d new slices from %d corrections, %d replay slices",
                    base_config.name, base_config.generation, len(new), slices.corrections,
                    len(replay))
        anchors, gate = self._rehearsal(base_config)
        state = (optimiser_state.load(self._moments_path(base_config.name))
                 if moments and self.learning.keep_optimiser_state else None)
        candidate, report = train_round(base_model, base_config, new, replay, policy,
                                        anchors=anchors, progress=self._progress(attempt, beat),
                                        optimiser_state=state)
        return TrainedCandidate(
            candidate, after_round(base_config, report),  # a pending head it trained is active
            report, {"slices": len(new), "replay_slices": len(replay), "steps": report.steps,
                     "epochs": report.epochs_completed, "losses": list(report.epoch_losses),
                     "stopped_by_time_budget": report.stopped_by_time_budget},
            gate, len(anchors))

    def _volume_round(self, name: str, base_model: SegmentationNetwork,
                      base_config: ModelConfig, new_rows: list[TrainingSample],
                      replay_rows: list[TrainingSample]) -> TrainedCandidate:
        """Train a copy of an external network, or of heads on a 3D encoder, on the new
        and replayed volumes (pipeline.external_round); a policy an external network
        cannot follow is refused for good (the samples stay pending)."""
        from dicom_node.pipeline.external_round import ExternalRoundRefused, ExternalRounds

        if self._external is None:  # MONAI is imported here, for nodes that train one
            self._external = ExternalRounds(self.learning, self.data_dir)
        try:
            model, config, report, training = self._external.train(
                name, base_model, base_config, new_rows, replay_rows,
                policy_of(self.learning), self.models.code_dirs(name))
        except ExternalRoundRefused as exc:
            raise PermanentJobError(f"training {name}: {exc}") from exc
        return TrainedCandidate(model, config, report, training)

    def _rows(self, name: str, base_config: ModelConfig
              ) -> tuple[list[TrainingSample], list[TrainingSample], list[TrainingSample]]:
        """The round's pending samples, its replay buffer and the held-out cases."""
        with self.db.session() as s:
            ensure_base_version(s, self.models, base_config)
            new_rows = list(s.execute(select(TrainingSample).where(
                TrainingSample.model_name == name,
                TrainingSample.state == SampleState.PENDING).order_by(TrainingSample.id)
            ).scalars())
            return new_rows, trained_rows(s, name), held_out_rows(s, name)

    def _committed(self, name: str, update_id: str) -> ModelVersion | None:
        """The version this round committed before a crash (then served again), if any."""
        with self.db.session() as s:
            done = s.execute(select(ModelVersion).where(
                ModelVersion.update_id == update_id)).scalar_one_or_none()
        if done is not None:
            LOGGER.info("round %s already committed as generation %d", update_id,
                        done.generation)
            activate_serving(self.db, self.models, name)
        return done

    def _judge(self, base_model: SegmentationNetwork, base_config: ModelConfig,
               trained: TrainedCandidate, held: list[HeldOutSample]
               ) -> tuple[bool, str, dict[str, Any]]:
        """Whether the candidate may serve: held-out Dice within the acceptance margin of
        the base's, and the rehearsal anchors not forgotten; with the scores."""
        device = str(resolve_device(self.learning.device))
        base_dice = evaluate_samples(base_model, base_config, held, device=device) \
            if held else None
        cand_dice = evaluate_samples(trained.model, trained.config, held, device=device) \
            if held else None
        accepted, verdict = accept_candidate(base_dice, cand_dice,
                                             self.learning.acceptance_margin)
        gate = trained.gate
        check = (gate.check(base_model, base_config, trained.model, trained.config)
                 if gate is not None and isinstance(base_model, MultiHeadNetwork)
                 and isinstance(trained.model, MultiHeadNetwork) else None)
        if check is not None:  # a round that forgets the anchors is not served
            accepted, verdict = accepted and check.accepted, f"{verdict}; {check.verdict}"
        return accepted, verdict, {
            "held_out": {"base": base_dice, "candidate": cand_dice, "cases": len(held)},
            "anchors": None if check is None else {
                "base": check.base, "candidate": check.candidate,
                "slices": trained.anchor_slices}}

    def _commit(self, outcome: RoundOutcome) -> ModelVersion:
        """Record the round: weights, the version row, the update (if served), the samples
        trained, and the hot swap last (a crash before it leaves the old model serving)."""
        name, base_config, candidate = outcome.name, outcome.base_config, outcome.model
        report, accepted, metrics = outcome.report, outcome.accepted, outcome.metrics
        sample_ids, update_id = list(outcome.sample_ids), outcome.update_id
        with self.db.session() as s:
            generation = next_generation(
                s, name, base_config.generation,
                local_floor=self.local_floor)
        config = outcome.config.with_generation(generation)
        path = save_model(candidate, config,
                          self.data_dir / "models" / name / f"generation-{generation:05d}")
        groups = trained_groups(report, config)
        update_path, meta = (self._write_update(outcome, generation, groups) if accepted
                             else (None, {}))
        now = datetime.now(UTC)
        with self.db.session() as s:
            if accepted:
                for row in s.execute(select(ModelVersion).where(
                        ModelVersion.name == name,
                        ModelVersion.state == ModelVersionState.SERVING)).scalars():
                    row.state = ModelVersionState.RETIRED
            version = ModelVersion(
                name=name, generation=generation, parent_generation=base_config.generation,
                origin="local", path=str(path), update_id=update_id,
                state=ModelVersionState.SERVING if accepted else ModelVersionState.REJECTED,
                samples=len(sample_ids), sample_ids=sample_ids,
                metrics={**metrics, "trained_groups": groups}, created_at=now,
                activated_at=now if accepted else None)
            s.add(version)
            for sample in s.execute(select(TrainingSample).where(
                    TrainingSample.id.in_(sample_ids))).scalars():
                sample.state, sample.trained_generation = SampleState.TRAINED, generation
            if update_path is not None:
                s.add(UpdateOutboxItem(update_id=update_id, model_name=name,
                                       base_generation=base_config.generation,
                                       path=str(update_path), meta=meta))
            evicted = self._evict(s, name)
        for rel in evicted:
            (self.data_dir / rel).unlink(missing_ok=True)
        if accepted:
            self.models.replace(name, candidate, config)
            self._keep_moments(name, generation, report)
        LOGGER.info("%s generation %d (from %d) %s: %s", name, generation,
                    base_config.generation, "serves" if accepted else "rejected", outcome.verdict)
        return version

    def _write_update(self, outcome: RoundOutcome, generation: int, groups: list[str]
                      ) -> tuple[Path, dict[str, str]]:
        """The served round's update for the hub, durable, and its metadata: the round
        trained from the hub generation when it started from a local version
        (``pipeline.round_update``), for every correction it trained on."""
        sent, hub_round = outcome.model, outcome.hub_round
        if hub_round is not None:
            sent, groups = hub_round.model, trained_groups(hub_round.report, hub_round.config)
        return write_update(self.data_dir, outcome.update_id, sent, groups, {
            "update_id": outcome.update_id, "model": outcome.name,
            "base_generation": outcome.base_config.generation, "local_generation": generation,
            "num_samples": len(outcome.sample_ids) + outcome.replayed,
            "num_slices": outcome.metrics["training"]["slices"], "trained_groups": groups,
            "validation": outcome.metrics["held_out"],
            "trained_from": "hub generation" if hub_round is not None else "served version"})

    def _keep_moments(self, name: str, generation: int, report: TrainingReport) -> None:
        if report.optimiser_state is None:  # a refused round's moments are dropped
            return
        try:
            optimiser_state.save(self._moments_path(name), report.optimiser_state,
                                 {"model": name, "generation": str(generation)})
        except OSError as exc:  # the round is committed; moments are only a head start
            LOGGER.warning("optimiser state of %s not kept: %s", name, exc)

    def _moments_path(self, name: str) -> Path:
        """Adam's moments after the last served round of ``name`` (local only)."""
        return self.data_dir / "optimiser" / f"{name}.safetensors"

    # -- samples ---------------------------------------------------------------------
    def _rehearsal(self, config: ModelConfig) -> tuple[list[SliceSample], AnchorGate | None]:
        """Anchor slices for ``config``'s labels and the gate scoring them (none if off)."""
        plan = self.learning.rehearsal.plan()
        if not plan.enabled:
            return [], None
        try:
            anchors = anchor_set(config, plan)
        except (DicomNodeError, OSError) as exc:  # e.g. the MR atlas package is missing
            LOGGER.warning("rehearsal off for %s: %s", config.name, exc)
            return [], None
        key = (config.name, config.preprocessing, tuple(config.labels), plan)
        if key not in self._gates:
            self._gates[key] = AnchorGate(anchors, plan.margin)
        return anchor_slices(anchors), self._gates[key]

    def _load(self, row: TrainingSample) -> StoredSample:
        return load_sample(self.data_dir, row)

    def _replay(self, rows: list[TrainingSample]) -> list[SliceSample]:
        return replay_slices(self.data_dir, rows, self.learning.replay_max_slices)

    def _evict(self, s: Session, name: str) -> list[str]:
        """Keep the replay buffer within ``replay_max_slices`` (newest kept)."""
        budget = self.learning.replay_max_slices
        used, evicted = 0, []
        for row in s.execute(select(TrainingSample).where(
                TrainingSample.model_name == name, TrainingSample.state == SampleState.TRAINED)
                .order_by(TrainingSample.id.desc())).scalars():
            used += row.slices
            if used > budget:
                row.state = SampleState.EVICTED
                evicted.append(row.path)
        return evicted

    def _progress(self, attempt: int, beat: Callable[[], None]
                  ) -> Callable[[TrainingProgress], None]:
        def step_hooks(p: TrainingProgress) -> None:
            for step_hook in self.step_hooks:
                step_hook(attempt, p)

        return beating(beat, step_hooks)
