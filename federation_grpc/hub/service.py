"""The hub's collaborators, built from one config, behind one facade for the transport.

Each decision lives in its collaborator: :mod:`nodes` (enrolment, tokens, revocation),
:mod:`generations` (generations, lineage, the current pointer, change notices),
:mod:`uploads` (update intake), :mod:`aggregator` (merge and gate), :mod:`evaluations`
(federated evaluation tasks), :mod:`rejections` and :mod:`reports` (metrics from nodes).
:class:`HubService` builds them and gives the servicers and the CLI one object; its
methods only delegate. Imports no grpc.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from federation_grpc.errors import PermissionDenied
from federation_grpc.hub import strategies as agg
from federation_grpc.hub.aggregator import Aggregator
from federation_grpc.hub.blobs import BlobStore, StagingArea
from federation_grpc.hub.config import HubConfig
from federation_grpc.hub.domain import (
    Enrolment,
    EvaluationTaskView,
    GenerationView,
    MetricRecord,
    NodeView,
    RejectionView,
)
from federation_grpc.hub.evaluations import EvaluationTasks
from federation_grpc.hub.gate import Evaluator, GatePolicy, UpdateGate, load_evaluator
from federation_grpc.hub.generations import GenerationLedger
from federation_grpc.hub.nodes import NodeRegistry
from federation_grpc.hub.private import private_dir, warn_if_shared
from federation_grpc.hub.rejections import RejectionLog
from federation_grpc.hub.reports import MetricReports
from federation_grpc.hub.store import GenerationStatus, HubStore
from federation_grpc.hub.uploads import UploadIntake
from federation_grpc.hub.watch import CurrentState, CurrentWatch


def make_gate(config: HubConfig, evaluator: Evaluator | None = None) -> UpdateGate:
    """The update gate of ``[gate]`` (its evaluator loaded unless one is given)."""
    if evaluator is None and config.gate.evaluator:
        evaluator = load_evaluator(config.gate.evaluator)
    return UpdateGate(
        GatePolicy(
            max_update_norm=config.gate.max_update_norm,
            max_relative_update_norm=config.gate.max_relative_update_norm,
            validation_margin=config.gate.validation_margin,
        ),
        evaluator,
    )


class HubService:
    """The hub's collaborators and the operations the servicers and the CLI call."""

    def __init__(
        self,
        config: HubConfig,
        *,
        evaluator: Evaluator | None = None,
        strategy: agg.Strategy | None = None,
    ) -> None:
        self.config = config
        warn_if_shared(private_dir(config.data_dir))
        self.store = HubStore(config.resolved_database_url)
        self.blobs = BlobStore(config.data_dir / "blobs")
        self.staging = StagingArea(config.data_dir / "staging")
        self.gate = make_gate(config, evaluator)
        self.strategy = strategy or agg.make_strategy(
            config.aggregation.strategy, **config.aggregation.strategy_options()
        )
        self.nodes = NodeRegistry(self.store, config)
        self.ledger = GenerationLedger(self.store, self.blobs, config.data_dir)
        self.watch = CurrentWatch(self.ledger)
        self.rejections = RejectionLog(self.store)
        self.evaluations = EvaluationTasks(self.store)
        self.reports = MetricReports(self.store)
        self.aggregator = Aggregator(
            store=self.store,
            ledger=self.ledger,
            rejections=self.rejections,
            evaluations=self.evaluations,
            blobs=self.blobs,
            config=config,
            gate=self.gate,
            strategy=self.strategy,
        )
        self.uploads = UploadIntake(
            store=self.store,
            ledger=self.ledger,
            rejections=self.rejections,
            staging=self.staging,
            blobs=self.blobs,
            config=config,
            gate=self.gate,
            on_received=self.aggregator.wake,
        )

    def close(self) -> None:
        self.aggregator.stop()
        self.ledger.close()
        self.store.dispose()

    # --- nodes (federation_grpc.hub.nodes) ----------------------------------------------

    def create_enrolment_token(self, ttl_s: int = 0, note: str = "") -> tuple[str, datetime]:
        return self.nodes.create_enrolment_token(ttl_s, note)

    def enrol(
        self,
        enrolment_token: str,
        display_name: str = "",
        cert_sha256: str = "",
        request_id: str = "",
    ) -> Enrolment:
        return self.nodes.enrol(enrolment_token, display_name, cert_sha256, request_id)

    def authenticate(self, node_token: str, cert_sha256: str = "") -> str:
        return self.nodes.authenticate(node_token, cert_sha256)

    def check_admin(self, admin_token: str) -> None:
        self.nodes.check_admin(admin_token)

    def list_nodes(self) -> list[NodeView]:
        return self.nodes.list_nodes()

    def rebind_node(self, node_id: str, cert_sha256: str) -> NodeView:
        return self.nodes.rebind_node(node_id, cert_sha256)

    def revoke_node(self, node_id: str) -> NodeView:
        return self.nodes.revoke_node(node_id)

    # --- generations (federation_grpc.hub.generations) ----------------------------------

    def init_model(self, weights: bytes | Path, config_json: str) -> GenerationView:
        return self.ledger.init(weights, config_json)

    def current_number(self) -> int | None:
        return self.ledger.current_number()

    def state_version(self) -> int:
        return self.ledger.state_version()

    def current_generation(self) -> GenerationView | None:
        return self.ledger.current_generation()

    def require_current(self) -> GenerationView:
        return self.ledger.require_current()

    def generation(self, number: int) -> GenerationView:
        return self.ledger.generation(number)

    def list_generations(self) -> list[GenerationView]:
        return self.ledger.list_generations()

    def lineage(self, number: int) -> list[int]:
        return self.ledger.lineage(number)

    def generation_config(self, number: int) -> str:
        return self.ledger.generation_config(number)

    def generation_tensors(self, number: int) -> dict[str, np.ndarray]:
        return self.ledger.generation_tensors(number)

    def promote(self, number: int) -> GenerationView:
        return self.ledger.promote(number)

    def rollback(self, to_generation: int = -1) -> GenerationView:
        return self.ledger.rollback(to_generation)

    def wait_for_change(self, known_version: int, timeout: float) -> int:
        return self.ledger.wait_for_change(known_version, timeout)

    def watch_state(self, known_version: int, timeout: float) -> CurrentState:
        """For watch streams: the state version and current generation, shared."""
        return self.watch.wait(known_version, timeout)

    def download_source(self, number: int, node_id: str | None) -> tuple[Path, GenerationView]:
        """Blob path of a generation a node may download (candidates only while evaluated)."""
        path, view = self.ledger.blob_of(number)
        if view.status == GenerationStatus.REJECTED:
            raise PermissionDenied(f"generation {number} was rejected")
        if view.status == GenerationStatus.CANDIDATE and not self.evaluations.is_open_for(number):
            raise PermissionDenied(f"generation {number} is a candidate not open for evaluation")
        return path, view

    # --- metrics, rejections, evaluation ------------------------------------------------

    def report_metrics(self, node_id: str, records: Sequence[MetricRecord]) -> int:
        return self.reports.add(node_id, records)

    def metric_records(self, kind: str | None = None) -> list[tuple[str, MetricRecord]]:
        return self.reports.records(kind)

    def list_rejections(self, limit: int = 100) -> list[RejectionView]:
        return self.rejections.list(limit)

    def fetch_evaluation_tasks(self, node_id: str) -> list[EvaluationTaskView]:
        return self.evaluations.fetch(node_id)

    def submit_evaluation_result(
        self, node_id: str, task_id: str, candidate: float, reference: float, num_cases: int
    ) -> bool:
        accepted = self.evaluations.submit(node_id, task_id, candidate, reference, num_cases)
        if accepted:
            self.aggregator.wake()
        return accepted
