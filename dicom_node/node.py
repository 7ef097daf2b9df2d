"""The node: one readable place that wires the pipeline.

The HTTP front end (DICOMweb for viewers, ``/healthz``, ``/metrics``) is the package above
this one (``viewer_bridge``); it is plugged in as an :data:`HttpFrontEnd` by the
composition root, ``viewer_bridge.main`` (the ``tessera`` command), so nothing here
imports it.

Every arrow below is a row in the database: a stage writes rows and queues the next job
in the same transaction, and any worker process that shares the database runs it
(``dicom_node/pipeline/flow.py`` lists each job kind, its payload, who queues it and
who handles it).

    PACS --C-STORE--> SCP ---+--> InstanceStore (intake journal fsync'd, then the file and
    viewer --STOW-RS--> bridge+        index row behind it) --> SeriesAssembler (quiet
                                       period, then the routing rules)
         forward rule --> export job (Exporter) ----------------------------> PACS
         segment rule --> inference job (SegmentationJob: volume -> model -> DICOM-SEG,
                          stored like any instance) --> export job ----------> PACS
                                                    --> quality-metrics job (QualityJob,
                          deferred until the SEG's first delivery attempt ends)
         a completed SEG series --> correction job (CorrectionJob/CorrectionIntake: a SEG
                          that corrects one of our AI results becomes a training sample;
                          one that cannot is flagged with its reason)
         train_every samples --> training job (IncrementalTrainer: candidate, gate,
                          serve) --> update outbox --> FederationAgent --gRPC--> hub
    hub generation --watch--> FederationAgent --> ModelVersion row (serving)
                          --> generation-adapt job (GenerationAdapter: the site's own
                          fine-tune, or a rollback if the generation is worse here)
    every process serves what the version table says (ServingFollower polls it; a CLI
                          rollback also queues a model-activate job)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dicom_node.config import NodeConfig
from dicom_node.dicom.receiver_pool import ReceiverPool, replay_retired_journals
from dicom_node.dicom.scp import RunningSCP, start_scp
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.learning.errors import ModelConfigError
from dicom_node.learning.partial_labels import check_annotated_labels
from dicom_node.loop_health import LoopHealth
from dicom_node.pipeline.assembler import SeriesAssembler
from dicom_node.pipeline.corrections import CorrectionIntake, CorrectionJob
from dicom_node.pipeline.export import Exporter
from dicom_node.pipeline.model_sources import ModelNotBuilt, ModelRegistry
from dicom_node.pipeline.quality_job import QualityInputs, QualityJob
from dicom_node.pipeline.segmentation import SegmentationJob
from dicom_node.pipeline.site_adaptation import GenerationAdapter
from dicom_node.pipeline.trainer import IncrementalTrainer
from dicom_node.pipeline.versions import ServingFollower
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore
from dicom_node.store.jobs import Backoff, JobQueue
from dicom_node.store.opening import journal_dir, open_store
from dicom_node.worker import JobHandler, JobWorker

LOGGER = logging.getLogger(__name__)
SLOW_STOP_STEP_S = 2.0  # a stop step that takes longer is named in the log


class RunningHttp(Protocol):
    """A started HTTP front end."""

    @property
    def port(self) -> int: ...

    def shutdown(self, timeout: float = ...) -> None: ...


class HttpFrontEnd(Protocol):
    """Starts the HTTP front end of a node on ``[http]``; ``viewer_bridge.server.start_bridge``."""

    def __call__(self, config: NodeConfig, db: Database, files: InstanceFiles,
                 store: InstanceStore) -> RunningHttp: ...


@dataclass(frozen=True)
class FrontEnds:
    """What the composition root plugs into a node; the ``tessera`` command hands it to
    its subcommands as click's context object (``ctx.obj``)."""

    http: HttpFrontEnd | None = None


@dataclass
class NodeParts:
    """The pieces of a node, built from one configuration without starting anything."""

    config: NodeConfig
    db: Database
    files: InstanceFiles
    store: InstanceStore
    queue: JobQueue
    assembler: SeriesAssembler
    handlers: list[JobHandler] = field(default_factory=list)
    models: ModelRegistry = field(default_factory=ModelRegistry)
    corrections: CorrectionIntake | None = None  # run by the correction job
    federation: Any = None  # dicom_node.federation.FederationAgent when [federation] is on

    @classmethod
    def build(cls, config: NodeConfig) -> NodeParts:
        store = open_store(config)
        db, files, node = store.db, store.files, config.node
        queue = JobQueue(db, lease_s=config.jobs.lease_s)
        parts = cls(config=config, db=db, files=files, store=store,
                    queue=queue, assembler=SeriesAssembler(
                        db, queue, config.assembler, config.rules,
                        export_attempts=config.export.max_attempts))
        parts.handlers.append(Exporter(db, files, config.export, config.destinations,
                                       config.dicom.ae_title))
        parts.models = ModelRegistry(dict(config.models), config.built_models_dir)
        parts.check_models()
        parts.handlers.append(SegmentationJob(
            db, files, parts.store, queue, node.data_dir, parts.models,
            inference=config.inference, dicom=config.dicom, rules=config.rules,
            export_attempts=config.export.max_attempts))
        parts.corrections = CorrectionIntake(db, files, parts.store, queue, node.data_dir,
                                             parts.models, config.learning)
        parts.handlers += [CorrectionJob(parts.corrections),
                           IncrementalTrainer(db, config.learning, node.data_dir, parts.models,
                                              federated=config.federation.enabled),
                           GenerationAdapter(db, config.learning, config.federation,
                                             node.data_dir, parts.models),
                           QualityJob(db, QualityInputs(config.node.data_dir),
                                      delivery_wait_s=config.export.connect_timeout_s)]
        if config.federation.enabled:
            # Imported here: a node without a hub never loads the gRPC client.
            from dicom_node.federation import FederationAgent

            parts.federation = FederationAgent(config.federation, db, parts.models, queue,
                                               node.data_dir)
        return parts

    def check_models(self) -> None:
        """Every model a rule names must load now, not at the first study; a model the
        node builds itself and has not built yet is only warned about (its rule's series
        are refused with the command that builds it)."""
        for i, rule in enumerate(self.config.rules):
            if rule.model is None:
                continue
            try:
                self.models.get(rule.model)
            except ModelNotBuilt as exc:
                LOGGER.warning("rule %r: %s", rule.name, exc)
            except (DicomNodeError, OSError) as exc:
                raise ConfigError(f"invalid configuration: rules.{i}.model: {exc}") from exc
        self.check_annotated_labels()

    def check_annotated_labels(self) -> None:
        """``learning.annotated_labels`` must name labels of the models the node serves."""
        names = {r.model for r in self.config.rules if r.model is not None}
        if self.config.federation.enabled:
            names.add(self.config.federation.model)
        configs = []
        for name in sorted(names):
            try:
                configs.append(self.models.get(name)[1])
            except (DicomNodeError, OSError):
                continue  # a federated model may arrive from the hub later
        try:
            check_annotated_labels(self.config.learning.annotated_labels, configs)
        except ModelConfigError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from exc


class Node:
    """A running node: SCP, assembler loop and job workers."""

    def __init__(self, config: NodeConfig, *, extra_handlers: Sequence[JobHandler] = (),
                 serve_dicom: bool = True, http: HttpFrontEnd | None = None) -> None:
        """``serve_dicom=False`` runs only the assembler and job workers: a worker process
        that shares the database (PostgreSQL) and the instance store with others.
        ``http`` starts the HTTP front end when ``[http] enabled`` (the composition root
        passes the viewer bridge); without it the node serves DICOM only."""
        self.serve_dicom = serve_dicom
        self.http = http
        self.parts = NodeParts.build(config)
        self.parts.handlers.extend(extra_handlers)
        self.config = config
        self._stop = threading.Event()
        self._assembler_thread: threading.Thread | None = None
        self.scp: RunningSCP | None = None
        self.receivers: ReceiverPool | None = None  # with [dicom] receivers above 1
        self.bridge: RunningHttp | None = None  # the HTTP front end, when started
        self.worker = JobWorker(
            self.parts.queue, self.parts.handlers, threads=config.jobs.workers,
            backoff=Backoff(config.export.backoff_initial_s, config.export.backoff_max_s),
            poll_interval_s=config.jobs.poll_interval_s, heartbeat_s=config.jobs.heartbeat_s,
        )
        self.parts.queue.add_listener(self.worker.wake)
        # Workers (and this process after a rollback from the CLI) follow the table.
        self.follower = ServingFollower(self.parts.db, self.parts.models,
                                        max(1.0, config.jobs.poll_interval_s))

    @property
    def port(self) -> int:
        assert self.scp is not None, "node not started"
        return self.scp.port

    @property
    def http_port(self) -> int:
        assert self.bridge is not None, "node not started, or [http] not enabled"
        return int(self.bridge.port)

    def start(self) -> Node:
        if self.serve_dicom:
            # The receiving process owns the intake journal: what an earlier run
            # acknowledged but had not yet checkpointed is replayed first.
            self.parts.store.open_journal(journal_dir(self.config, 0))
            replay_retired_journals(self.config, self.parts.store)
            # Only the process that receives may restart quiet periods; workers that
            # join a running node must not delay its series.
            self.parts.assembler.resume_after_restart()
        self.worker.start()
        self.follower.start()
        self._assembler_thread = threading.Thread(target=self._assemble_loop,
                                                  name="series-assembler", daemon=True)
        self._assembler_thread.start()
        if self.serve_dicom:
            self.scp = start_scp(self.config.dicom, self.parts.store,
                                 share=self.config.dicom.receivers)
            if self.config.dicom.receivers > 1:
                self.receivers = ReceiverPool(self.config, store=self.parts.store).start(
                    self.scp.server)
            if self.config.http.enabled and self.http is not None:
                self.bridge = self.http(self.config, self.parts.db, self.parts.files,
                                        self.parts.store)
            elif self.config.http.enabled:
                LOGGER.warning("[http] is enabled but this process was started without the "
                               "HTTP front end (start the node with `tessera node serve`); "
                               "serving DICOM only")
            if self.parts.federation is not None:
                self.parts.federation.start()
        return self

    def _assemble_loop(self) -> None:
        health = LoopHealth("series assembler", self.config.assembler.poll_interval_s,
                            logger=LOGGER)
        wait = health.interval_s
        while not self._stop.wait(wait):
            try:
                if self.parts.assembler.tick():
                    self.worker.wake()
            except Exception as exc:
                wait = health.failed(exc)
            else:
                wait = health.succeeded()

    def stop(self) -> None:
        """Stop taking work, finish what was received (the journal's final checkpoint),
        let go of the database; each step that takes long is named in the log."""
        started = time.monotonic()
        self._stop.set()
        if self.receivers is not None:
            self.receivers.stopping()
        steps: list[tuple[str, Callable[[], object] | None]] = [
            ("federation", self.parts.federation.stop if self.parts.federation else None),
            ("viewer bridge", self.bridge.shutdown if self.bridge else None),
            ("SCP", self.scp.shutdown if self.scp else None),
            ("receivers", self.receivers.stop if self.receivers else None),
            ("serving follower", self.follower.stop),
            ("job workers", self.worker.stop),
            ("assembler", self._join_assembler),
            ("intake journal", self.parts.store.close_journal),
            ("database", self.parts.db.dispose),
        ]
        for name, step in steps:
            if step is None:
                continue
            began = time.monotonic()
            step()
            if time.monotonic() - began > SLOW_STOP_STEP_S:
                LOGGER.warning("stopping: %s took %.1f s", name, time.monotonic() - began)
        LOGGER.info("node stopped in %.1f s", time.monotonic() - started)

    def _join_assembler(self) -> None:
        if self._assembler_thread is not None:
            self._assembler_thread.join(5)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
