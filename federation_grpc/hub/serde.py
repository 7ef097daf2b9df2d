"""Conversions between the hub's domain dataclasses and the generated proto messages."""

from __future__ import annotations

from federation_grpc._proto import admin_pb2 as apb
from federation_grpc._proto import federation_pb2 as pb
from federation_grpc.hub.domain import (
    EvaluationTaskView,
    GenerationView,
    MetricRecord,
    NodeView,
    RejectionView,
    UpdateHeader,
    UploadState,
    UploadStatus,
)

_STATE_TO_PROTO = {
    UploadState.PARTIAL: pb.UPDATE_STATE_PARTIAL,
    UploadState.RECEIVED: pb.UPDATE_STATE_RECEIVED,
    UploadState.MERGED: pb.UPDATE_STATE_MERGED,
    UploadState.REJECTED: pb.UPDATE_STATE_REJECTED,
    UploadState.UNKNOWN: pb.UPDATE_STATE_UNKNOWN,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def header_from_proto(message: pb.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        update_id=message.update_id,
        base_generation=message.base_generation,
        num_samples=message.num_samples,
        trained_groups=tuple(message.trained_groups),
        local_metrics=dict(message.local_metrics),
        total_size=message.total_size,
        sha256=message.sha256,
        offset=message.offset,
    )


def header_to_proto(header: UpdateHeader) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        update_id=header.update_id,
        base_generation=header.base_generation,
        num_samples=header.num_samples,
        trained_groups=list(header.trained_groups),
        local_metrics=header.local_metrics,
        total_size=header.total_size,
        sha256=header.sha256,
        offset=header.offset,
    )


def upload_status_to_proto(status: UploadStatus) -> pb.UploadUpdateResponse:
    return pb.UploadUpdateResponse(
        update_id=status.update_id,
        state=_STATE_TO_PROTO[status.state],
        received_bytes=status.received_bytes,
        merged_into=status.merged_into,
        reason=status.reason,
    )


def upload_status_from_proto(message: pb.UploadUpdateResponse) -> UploadStatus:
    return UploadStatus(
        update_id=message.update_id,
        state=_STATE_FROM_PROTO.get(message.state, UploadState.UNKNOWN),
        received_bytes=message.received_bytes,
        merged_into=message.merged_into,
        reason=message.reason,
    )


def generation_to_proto(view: GenerationView) -> pb.GenerationInfo:
    message = pb.GenerationInfo(
        number=view.number,
        parent=view.parent,
        sha256=view.sha256,
        size_bytes=view.size_bytes,
        config_json=view.config_json,
        created_at=view.created_at.isoformat(),
        update_ids=list(view.update_ids),
        node_ids=list(view.node_ids),
        strategy=view.strategy,
        status=view.status,
        current=view.current,
        notes=view.notes,
    )
    if view.validation_score is not None:
        message.validation_score = view.validation_score
    return message


def metric_record_from_proto(message: pb.MetricRecord) -> MetricRecord:
    return MetricRecord(
        kind=message.kind,
        generation=message.generation,
        values=dict(message.values),
        key=message.key,
    )


def metric_record_to_proto(record: MetricRecord) -> pb.MetricRecord:
    return pb.MetricRecord(
        kind=record.kind, generation=record.generation, values=record.values, key=record.key
    )


def task_to_proto(task: EvaluationTaskView) -> pb.EvaluationTask:
    return pb.EvaluationTask(
        task_id=task.task_id,
        candidate_generation=task.candidate_generation,
        reference_generation=task.reference_generation,
        deadline=task.deadline.isoformat(),
    )


def node_to_proto(view: NodeView) -> apb.NodeInfo:
    return apb.NodeInfo(
        node_id=view.node_id,
        display_name=view.display_name,
        enrolled_at=view.enrolled_at.isoformat(),
        revoked=view.revoked,
        last_seen=view.last_seen.isoformat() if view.last_seen else "",
        updates=view.updates,
    )


def rejection_to_proto(view: RejectionView) -> apb.Rejection:
    return apb.Rejection(
        update_id=view.update_id,
        node_id=view.node_id,
        stage=view.stage,
        reasons=list(view.reasons),
        created_at=view.created_at.isoformat(),
        candidate_generation=view.candidate_generation,
    )
