"""Domain dataclasses the hub service speaks; ``serde`` converts them to and from proto."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class UploadState(enum.StrEnum):
    PARTIAL = "partial"
    RECEIVED = "received"
    MERGED = "merged"
    REJECTED = "rejected"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class UpdateHeader:
    update_id: str
    base_generation: int
    num_samples: int
    trained_groups: tuple[str, ...]
    local_metrics: dict[str, float]
    total_size: int
    sha256: str
    offset: int = 0


@dataclass(frozen=True)
class UploadStatus:
    update_id: str
    state: UploadState
    received_bytes: int = 0
    merged_into: int = -1
    reason: str = ""


@dataclass(frozen=True)
class GenerationView:
    number: int
    parent: int
    sha256: str
    size_bytes: int
    config_json: str
    created_at: datetime
    strategy: str
    status: str
    current: bool
    validation_score: float | None = None
    update_ids: tuple[str, ...] = ()
    node_ids: tuple[str, ...] = ()
    notes: str = ""  # the gate's, when it had more to say (see federated_verdict)


@dataclass(frozen=True)
class NodeView:
    node_id: str
    display_name: str
    enrolled_at: datetime
    revoked: bool
    last_seen: datetime | None
    updates: int
    # Heads of the updates the hub took from this node (partial labels: what it trains).
    trained_heads: tuple[str, ...] = ()
    # sha256 of the client certificate its token is bound to ("" while unbound).
    cert_sha256: str = ""
    # When it last asked for federated evaluation tasks (None: it does not take part).
    evaluator_seen: datetime | None = None


@dataclass(frozen=True)
class RejectionView:
    update_id: str
    node_id: str
    stage: str
    reasons: tuple[str, ...]
    created_at: datetime
    candidate_generation: int = -1


@dataclass(frozen=True)
class EvaluationTaskView:
    task_id: str
    candidate_generation: int
    reference_generation: int
    deadline: datetime


# The kinds of MetricRecord a node sends, one name each for both ends.
SEGMENTATION_RECORD = "segmentation"  # quality figures of one SEG the node made
CORRECTION_RECORD = "correction"      # Dice of our SEG against a radiologist's correction
SITE_CHECK_RECORD = "site-check"      # a site's check of a hub generation (kept, adapted
                                      # or rolled back)


@dataclass(frozen=True)
class MetricRecord:
    """De-identified numbers a node sends about a generation; ``kind`` is one of the
    ``*_RECORD`` names above."""

    kind: str
    generation: int
    values: dict[str, float] = field(default_factory=dict)
    # The node's own name for the record, unique among its records ("" for none): the
    # hub keeps one record per node and key, so a retried report is not counted twice.
    key: str = ""


@dataclass(frozen=True)
class Enrolment:
    node_id: str
    node_token: str
