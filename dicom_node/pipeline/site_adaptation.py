"""A hub generation fitted to this site, or refused by it.

    hub generation g served (FederationAgent.apply) --generation-adapt job-->
      g + (version served before - the hub generation it descends from)   (rebase:
          what this site learned on top of its last generation, carried to g)
      --train_round on the replay buffer (this site's trained corrections),
          a few epochs--> adapted
      held-out corrected cases scored with: the version served before g, g, adapted
      -> serve adapted (origin "adapted", parent g) unless it scores below g by > margin
      -> roll back to the version served before when the one kept scores below it by
         more than [learning] acceptance_margin (audit event "generation-rolled-back";
         a "site-check" record tells the hub)

Why: the hub merges one site's round into the shared model with a small weight (the
diagnosis in benchmarks/federated_learning.py keeps 1-11 % of a shifted site's gain in
the next generation), and serving that generation as it is throws the site's own
gains away at every swap. The hub still holds one shared model; each site serves its
short fine-tune of it, and its next round's update is sent against g (the adapted
version's parent), so what the site learns still reaches the hub.

The job is idempotent: the outcome is stored on g's row (``metrics["site_check"]``)
in the same transaction as the swap, and a job for a generation that no longer serves
(a newer generation or a local round took over) does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import FederationSettings, LearningSettings
from dicom_node.learning.evaluation import HeldOutSample, evaluate_samples
from dicom_node.learning.incremental import copy_model, train_round
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.network import MultiHeadNetwork, SegmentationNetwork
from dicom_node.learning.slices import SliceSample
from dicom_node.learning.weights import save_model
from dicom_node.pipeline.flow import AdaptPayload, JobKind
from dicom_node.pipeline.model_sources import ModelRegistry
from dicom_node.pipeline.training_samples import (
    beating,
    held_out_rows,
    load_held_out,
    policy_of,
    replay_slices,
    trained_rows,
)
from dicom_node.pipeline.versions import (
    LOCAL_FLOOR,
    hub_base_generation,
    load_version,
    next_generation,
    serving_version,
    version_row,
)
from dicom_node.store.db import Database
from dicom_node.store.jobs import ClaimedJob
from dicom_node.store.models import (
    AuditEvent,
    Job,
    JobState,
    ModelVersion,
    ModelVersionState,
    TrainingSample,
)

LOGGER = logging.getLogger(__name__)

ROLLED_BACK_EVENT = "generation-rolled-back"
SITE_CHECK = "site_check"  # the key on a hub generation's ModelVersion.metrics


def check_pending(s: Session, name: str, generation: int | None = None) -> bool:
    """A ``generation-adapt`` job of ``name`` (of ``generation``, if given) is queued or
    running: what the node serves from a hub generation is not settled yet."""
    q = select(Job.id).where(Job.kind == JobKind.ADAPT.value,
                             Job.state.in_((JobState.PENDING, JobState.RUNNING)))
    if generation is None:
        q = q.where(Job.key.startswith(f"{name}:"))
    else:
        q = q.where(Job.key == AdaptPayload(name, generation).key)
    return s.execute(q).first() is not None


@dataclass(frozen=True)
class SiteCheck:
    """What this site made of hub generation ``generation`` (stored on its row)."""

    generation: int
    previous: int  # the version served before (-1: none)
    cases: int  # held-out corrected cases scored
    replay_slices: int  # slices the fine-tune trained on (0: none)
    scores: dict[str, float]  # held-out mean Dice: "previous", "generation", "adapted"
    served: int  # the version that serves after the check
    adapted: bool
    rolled_back: bool
    verdict: str

    def values(self) -> dict[str, float]:
        """The numbers the hub is told (no UIDs; generation numbers are the hub's own
        or local counters)."""
        out = {f"held_out.{k}": v for k, v in self.scores.items()}
        return {**out, "cases": float(self.cases), "replay_slices": float(self.replay_slices),
                "adapted": float(self.adapted), "rolled_back": float(self.rolled_back)}


@dataclass(frozen=True)
class Lineage:
    """What a site check reads from the version table: the file of the version served
    before, the hub generation that one descends from (and its file), the replay buffer
    and the held-out cases."""

    before_path: str | None
    base: int
    base_path: str | None
    replay_rows: list[TrainingSample]
    held_rows: list[TrainingSample]


class GenerationAdapter:
    """Job handler for ``generation-adapt``."""

    kinds: tuple[JobKind, ...] = (JobKind.ADAPT,)

    def __init__(self, db: Database, learning: LearningSettings,
                 federation: FederationSettings, data_dir: Path, models: ModelRegistry) -> None:
        self.db = db
        self.learning = learning
        self.federation = federation
        self.models = models
        self.data_dir = data_dir

    def run(self, job: ClaimedJob, heartbeat: Callable[[], None]) -> None:
        payload = AdaptPayload.of(job)
        self.adapt(payload.model, payload.generation, payload.previous, heartbeat=heartbeat)

    def on_dead(self, job: ClaimedJob, error: str, s: Session) -> None:
        LOGGER.error("%s job for %s given up (the hub generation keeps serving): %s",
                     job.kind, job.key, error)

    def adapt(self, name: str, generation: int, previous: int = -1, *,
              heartbeat: Callable[[], None] | None = None) -> SiteCheck | None:
        """Check hub ``generation`` here and serve what the check chose (see module)."""
        beat = heartbeat or (lambda: None)
        lineage = self._lineage(name, generation, previous)
        if lineage is None:
            return None
        model, config = self.models.get(name)
        held = [load_held_out(self.data_dir, r) for r in lineage.held_rows]
        replay = (replay_slices(self.data_dir, lineage.replay_rows,
                                self.learning.replay_max_slices)
                  if isinstance(model, MultiHeadNetwork) and config.spatial_dims == 2 else [])
        scores: dict[str, float] = {}
        scorable = bool(held)  # slices or whole volumes (an external network)
        if scorable:
            scores["generation"] = _mean(model, config, held)
        t0 = time.monotonic()
        before_model = load_version(name, previous, lineage.before_path)
        if before_model is not None and scorable:
            scores["previous"] = _mean(*before_model, held)
        adapted = self._fit(name, model, config, before_model, lineage, replay, beat)
        if adapted is not None and scorable:
            scores["adapted"] = _mean(adapted[0], config, held)
        beat()
        margin = self.learning.acceptance_margin
        use_adapted = adapted is not None and (
            "adapted" not in scores or scores["adapted"] >= scores["generation"] - margin)
        kept = scores.get("adapted" if use_adapted else "generation")
        rolled_back = (before_model is not None and kept is not None
                       and kept < scores["previous"] - margin)
        verdict = _verdict(generation, previous, scores, len(held), use_adapted,
                           rolled_back, margin, time.monotonic() - t0)
        check = SiteCheck(generation=generation, previous=previous, cases=len(held),
                          replay_slices=len(replay), scores=scores, served=generation,
                          adapted=use_adapted and not rolled_back, rolled_back=rolled_back,
                          verdict=verdict)
        if rolled_back and before_model is not None:
            return self._roll_back(name, check, *before_model)
        if use_adapted and adapted is not None:
            return self._serve_adapted(name, check, *adapted)
        return self._record(name, check)

    def _lineage(self, name: str, generation: int, previous: int) -> Lineage | None:
        """Where the check starts from; None when ``generation`` no longer serves or was
        checked already (before a crash, or a retry)."""
        with self.db.session() as s:
            row = serving_version(s, name)
            if row is None or row.generation != generation:
                LOGGER.info("%s hub generation %d no longer serves: nothing to adapt", name,
                            generation)
                return None
            if SITE_CHECK in (row.metrics or {}):
                return None
            before = version_row(s, name, previous) if previous >= 0 else None
            base = hub_base_generation(s, name, previous) if previous >= 0 else -1
            base_row = version_row(s, name, base) if 0 <= base != previous else None
            return Lineage(
                before_path=before.path if before is not None and before.path else None,
                base=base,
                base_path=base_row.path if base_row is not None and base_row.path else None,
                replay_rows=trained_rows(s, name), held_rows=held_out_rows(s, name))

    def _fit(self, name: str, model: SegmentationNetwork, config: ModelConfig,
             before_model: tuple[SegmentationNetwork, ModelConfig] | None, lineage: Lineage,
             replay: list[SliceSample], beat: Callable[[], None]
             ) -> tuple[MultiHeadNetwork, ModelConfig] | None:
        """The site's version of the generation: what the site had learned on top of its
        hub generation carried to the new one (rebase), then fine-tuned on the replay
        buffer; None if there is nothing to carry or train on."""
        start = model
        base_model = (load_version(name, lineage.base, lineage.base_path)
                      if before_model is not None else None)
        if isinstance(model, MultiHeadNetwork) and before_model is not None and base_model:
            start = rebase(model, config, before_model[0], base_model[0])
        if replay and isinstance(start, MultiHeadNetwork):
            fs = self.federation
            policy = replace(policy_of(self.learning), epochs=fs.adapt_epochs,
                             time_budget_s=fs.adapt_time_budget_s, anchor_fraction=0.0)
            tuned, _ = train_round(start, config, replay, [], policy,
                                   progress=beating(beat))
            return tuned, config
        if start is not model and isinstance(start, MultiHeadNetwork):
            return start, config
        return None

    # -- outcomes -----------------------------------------------------------------------
    def _record(self, name: str, check: SiteCheck) -> SiteCheck | None:
        with self.db.session() as s:
            row = self._still_serving(s, name, check.generation)
            if row is None:
                return None
            row.metrics = {**(row.metrics or {}), SITE_CHECK: asdict(check)}
        LOGGER.info("%s: %s", name, check.verdict)
        return check

    def _serve_adapted(self, name: str, check: SiteCheck, model: MultiHeadNetwork,
                       config: ModelConfig) -> SiteCheck | None:
        with self.db.session() as s:
            number = next_generation(s, name, check.generation, local_floor=LOCAL_FLOOR)
        config = config.with_generation(number)
        path = save_model(model, config, self.data_dir / "models" / name
                          / f"generation-{number:05d}")
        check = replace(check, served=number)
        now = datetime.now(UTC)
        with self.db.session() as s:
            row = self._still_serving(s, name, check.generation)
            if row is None:
                path.unlink(missing_ok=True)
                return None
            row.state = ModelVersionState.RETIRED
            row.metrics = {**(row.metrics or {}), SITE_CHECK: asdict(check)}
            s.add(ModelVersion(
                name=name, generation=number, parent_generation=check.generation,
                origin="adapted", path=str(path), state=ModelVersionState.SERVING,
                samples=0, sample_ids=[], metrics={SITE_CHECK: asdict(check)},
                created_at=now, activated_at=now))
        self.models.replace(name, model, config)
        LOGGER.info("%s: %s", name, check.verdict)
        return check

    def _roll_back(self, name: str, check: SiteCheck, model: SegmentationNetwork,
                   config: ModelConfig) -> SiteCheck | None:
        """Serve the version served before (``model``, loaded and scored by the check)."""
        with self.db.session() as s:
            row = self._still_serving(s, name, check.generation)
            before = version_row(s, name, check.previous)
            if row is None or before is None:
                return None
            check = replace(check, served=before.generation)
            row.state = ModelVersionState.RETIRED
            row.metrics = {**(row.metrics or {}), SITE_CHECK: asdict(check)}
            before.state = ModelVersionState.SERVING
            before.activated_at = datetime.now(UTC)
            s.add(AuditEvent(kind=ROLLED_BACK_EVENT, reason=check.verdict))
        self.models.replace(name, model, config)
        LOGGER.warning("%s: %s", name, check.verdict)
        return check

    @staticmethod
    def _still_serving(s: Session, name: str, generation: int) -> ModelVersion | None:
        """``generation``'s row if it still serves (a newer one may have come meanwhile)."""
        row = serving_version(s, name)
        if row is None or row.generation != generation or SITE_CHECK in (row.metrics or {}):
            LOGGER.info("%s hub generation %d was replaced while being checked", name,
                        generation)
            return None
        return row


def rebase(generation: MultiHeadNetwork, config: ModelConfig, served: SegmentationNetwork,
           base: SegmentationNetwork) -> MultiHeadNetwork:
    """``generation + (served - base)``: the change this site made on top of hub
    generation ``base`` (its rounds and fine-tunes), applied to the new generation.
    Tensors the three do not share with the same shape (a head the hub added) are the
    generation's."""
    out = copy_model(generation, config)
    state = out.state_dict()
    mine, old = served.state_dict(), base.state_dict()
    for key, tensor in state.items():
        if (key in mine and key in old and tensor.is_floating_point()
                and mine[key].shape == old[key].shape == tensor.shape):
            tensor += mine[key].to(tensor.dtype) - old[key].to(tensor.dtype)
    out.load_state_dict(state)
    return out


def _mean(model: SegmentationNetwork, config: ModelConfig,
          held: list[HeldOutSample]) -> float:
    return round(evaluate_samples(model, config, held).get("mean", 0.0), 4)


def _verdict(generation: int, previous: int, scores: dict[str, float], cases: int,
             adapted: bool, rolled_back: bool, margin: float, seconds: float) -> str:
    figures = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    judged = (f"held-out Dice on {cases} corrected case(s): {figures}" if scores
              else "no held-out corrected cases here: not judged")
    if rolled_back:
        return (f"hub generation {generation} rolled back: it scores below generation "
                f"{previous} by more than the margin {margin} ({judged}); serving "
                f"{previous} again")
    kept = "its fine-tune on this site's corrections" if adapted else "it as received"
    return f"hub generation {generation}: serving {kept} ({judged}; {seconds:.1f} s)"
