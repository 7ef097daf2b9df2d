"""Update intake: resumable, idempotent uploads checked before anything is kept.

An upload is staged under its update id; the staged file's size is the offset a client
resumes from. When the declared size has arrived, the bytes are checked (sha256,
safetensors, tensor names, shapes and dtypes against the base generation, groups as
declared) and the update alone passes the gate's per-update checks. A malformed upload
leaves nothing behind but a rejection record; a valid one moves into the blob store
and waits for the aggregator.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from sqlalchemy import bindparam, insert, select
from sqlalchemy import update as update_rows

from federation_grpc.errors import (
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from federation_grpc.hub.blobs import BlobStore, StagingArea
from federation_grpc.hub.config import HubConfig
from federation_grpc.hub.domain import UpdateHeader, UploadState, UploadStatus
from federation_grpc.hub.gate import UpdateGate
from federation_grpc.hub.generations import GenerationLedger
from federation_grpc.hub.heads import new_head_tensors
from federation_grpc.hub.lazy_commit import lazy_connection
from federation_grpc.hub.parameters import groups_of
from federation_grpc.hub.partial_labels import check_trained_groups, generation_groups
from federation_grpc.hub.rejections import RejectionLog
from federation_grpc.hub.reports import check_numbers
from federation_grpc.hub.store import (
    HubStore,
    UpdateRow,
    UpdateStatus,
    utcnow,
)
from federation_grpc.hub.tensorfile import read_tensors

LOGGER = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Complete uploads checked (read, validated, gated) at the same time. A check reads its
# update and the base block by block into buffers of its own (about 3 MB), so this bounds
# memory to a few tens of MB whatever the number of nodes. Fifty uploads of a burst end
# together: two lanes held their responses up to 1.2 s after their last byte (half the
# burst waited 0.46 s or more); eight took that wait to about 0.1 s at worst, at the
# same peak RSS (benchmarks/federation.py --clients 50 --size-mb 10 --hold-merges).
CONCURRENT_CHECKS = 8
_STATE = {
    UpdateStatus.PARTIAL: UploadState.PARTIAL,
    UpdateStatus.RECEIVED: UploadState.RECEIVED,
    UpdateStatus.EVALUATING: UploadState.RECEIVED,
    UpdateStatus.MERGED: UploadState.MERGED,
    UpdateStatus.REJECTED: UploadState.REJECTED,
}


# The columns of an update's row that its status and a resume need.
_KEPT = (UpdateRow.update_id, UpdateRow.node_id, UpdateRow.status, UpdateRow.sha256,
         UpdateRow.total_size, UpdateRow.base_generation, UpdateRow.num_samples,
         UpdateRow.trained_groups, UpdateRow.merged_into, UpdateRow.reason)
# An upload's statements, built once: building a statement cost more than running it
# (a select and an insert: 1.0 ms built per call, 0.38 ms built once, in process).
_FIND = select(*_KEPT).where(UpdateRow.update_id == bindparam("find_id"))
_FIND_LOCKED = _FIND.with_for_update()
_OPEN = insert(UpdateRow)
_MARK_RECEIVED = (update_rows(UpdateRow).where(UpdateRow.update_id == bindparam("mark_id"))
                  .values(status=UpdateStatus.RECEIVED, received_at=bindparam("mark_at")))


class KeptUpdate(Protocol):
    """An update's row, or those of its columns (:data:`_KEPT`) read without the ORM."""

    update_id: str
    node_id: str
    status: str
    sha256: str
    total_size: int
    base_generation: int
    num_samples: int
    trained_groups: list[str]
    merged_into: int | None
    reason: str


def validate_tensors(
    update: dict[str, np.ndarray], base: dict[str, np.ndarray], trained_groups: tuple[str, ...]
) -> None:
    """Names, shapes, dtypes and groups of an update against its base generation.

    Raises
    ------
    InvalidRequest
        Unknown tensor names, a shape or dtype that differs from the base, a group
        carried but not declared (or declared but not carried), an incomplete group.
    """
    unknown = sorted(set(update) - set(base))
    if unknown:
        raise InvalidRequest(f"unknown tensor names: {unknown[:5]}")
    for name, value in update.items():
        expected = base[name]
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise InvalidRequest(
                f"tensor {name!r} is {value.dtype}{list(value.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            )
    carried = groups_of(update)
    if set(carried) != set(trained_groups):
        raise InvalidRequest(
            f"tensors carry groups {sorted(carried)} "
            f"but the header declares {sorted(trained_groups)}"
        )
    base_groups = groups_of(base)
    for group, names in carried.items():
        missing = sorted(set(base_groups[group]) - set(names))
        if missing:
            raise InvalidRequest(f"group {group!r} is incomplete; missing {missing[:5]}")


class UploadSession:
    """One stream's writes into the staged file of an update."""

    def __init__(self, intake: UploadIntake, node_id: str, header: UpdateHeader, offset: int):
        self.intake = intake
        self.node_id = node_id
        self.header = header
        self.received = offset
        self._fd = intake.staging.open_at(header.update_id, offset)
        # Hash as bytes arrive; a resumed upload first hashes what the hub already holds.
        self._digest = hashlib.sha256()
        if offset:
            try:
                with intake.staging.path(header.update_id).open("rb") as held:
                    remaining = offset
                    while remaining and (block := held.read(min(remaining, 1 << 20))):
                        self._digest.update(block)
                        remaining -= len(block)
            except BaseException:
                self.close()
                raise

    def write(self, chunk: bytes | memoryview) -> None:
        if self.received + len(chunk) > self.header.total_size:
            try:  # discarded under the staged file's lock, then let go
                self.intake.discard(
                    self.header, self.node_id, "more bytes than the declared total_size"
                )
            finally:
                self.close()
        self._digest.update(chunk)
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.received += len(chunk)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self.intake.staging.close(self.header.update_id, fd)

    def finish(self) -> UploadStatus:
        """Check and keep a complete update; report the offset of an incomplete one."""
        try:
            if self.received < self.header.total_size:
                os.fsync(self._fd)
                return UploadStatus(self.header.update_id, UploadState.PARTIAL, self.received)
            os.fsync(self._fd)
            return self.intake.complete(self.node_id, self.header, self._digest.hexdigest())
        finally:
            self.close()


class UploadIntake:
    """Uploads from nodes, checked against their base generation before anything is kept;
    ``on_received`` is called after a valid update has been stored."""

    def __init__(
        self,
        *,
        store: HubStore,
        ledger: GenerationLedger,
        rejections: RejectionLog,
        staging: StagingArea,
        blobs: BlobStore,
        config: HubConfig,
        gate: UpdateGate,
        on_received: Callable[[], None],
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.rejections = rejections
        self.staging = staging
        self.blobs = blobs
        self.config = config
        self.gate = gate
        self.on_received = on_received
        self._checking = threading.BoundedSemaphore(CONCURRENT_CHECKS)

    def status(self, node_id: str, update_id: str) -> UploadStatus:
        update_id = _canonical_id(update_id)
        with self.store.session() as session:
            row = session.get(UpdateRow, update_id)
            if row is None:
                return UploadStatus(update_id, UploadState.UNKNOWN)
            if row.node_id != node_id:
                raise PermissionDenied(f"update {update_id} belongs to another node")
            return self._status(row)

    def _status(self, row: KeptUpdate) -> UploadStatus:
        received = row.total_size
        if row.status == UpdateStatus.PARTIAL:
            received = self.staging.size(row.update_id)
        return UploadStatus(
            row.update_id,
            _STATE[UpdateStatus(row.status)],
            received,
            -1 if row.merged_into is None else row.merged_into,
            row.reason,
        )

    def begin(self, node_id: str, header: UpdateHeader) -> UploadSession | UploadStatus:
        """Open a session at ``header.offset``, or return the final status of a known update."""
        try:
            header = self._validated(header)
            refusal = self._samples_refusal(header) or self._groups_refusal(header)
        except InvalidRequest:
            settled = self._settled(node_id, header.update_id)
            if settled is None:
                raise
            return settled
        if refusal:
            # An update the hub has taken keeps its outcome whatever the operator has
            # tightened since: a node resending it (its "sent" mark lost) is told that.
            settled = self._settled(node_id, header.update_id)
            if settled is not None:
                return settled
            with self.store.session() as session:
                self.rejections.record(
                    session, header.update_id, node_id, "validation", [refusal]
                )
            raise InvalidRequest(refusal)
        with lazy_connection(self.store) as connection:  # the row only serves a resume
            row = connection.execute(_FIND, {"find_id": header.update_id}).one_or_none()
            if row is not None:
                if row.node_id != node_id:
                    raise PermissionDenied(f"update {header.update_id} belongs to another node")
                if row.status != UpdateStatus.PARTIAL:
                    return self._status(row)
                _check_same(row, header)
                held = self.staging.size(header.update_id)
                if header.offset < held:
                    # A node that starts over (its first attempt sends from byte 0 without
                    # asking first) is told where to resume instead of sending it all again.
                    return UploadStatus(header.update_id, UploadState.PARTIAL, held)
            else:
                if header.offset != 0:
                    raise FailedPrecondition(
                        f"update {header.update_id} is unknown; start at offset 0"
                    )
                held = 0
                connection.execute(_OPEN, {
                    "update_id": header.update_id,
                    "node_id": node_id,
                    "base_generation": header.base_generation,
                    "num_samples": header.num_samples,
                    "trained_groups": list(header.trained_groups),
                    "local_metrics": header.local_metrics,
                    "total_size": header.total_size,
                    "sha256": header.sha256,
                    "status": UpdateStatus.PARTIAL,
                })
        if header.offset > held:
            raise FailedPrecondition(
                f"hub holds {held} bytes of update {header.update_id}; resume from there"
            )
        # The staged file's lock keeps a second stream of this update out (StagingBusy),
        # from this process or another replica sharing the data folder.
        return UploadSession(self, node_id, header, header.offset)

    def _settled(self, node_id: str, update_id: str) -> UploadStatus | None:
        """The status of an update the hub has taken (received, merged or rejected), or
        None for one it has not (unknown, or partly uploaded)."""
        status = self.status(node_id, update_id)
        if status.state in (UploadState.UNKNOWN, UploadState.PARTIAL):
            return None
        return status

    def _samples_refusal(self, header: UpdateHeader) -> str:
        """``num_samples`` weighs an update in the merge: a value outside
        1..``max_num_samples`` is refused before any byte is taken, and recorded."""
        limit = self.config.limits.max_num_samples
        if 1 <= header.num_samples <= limit:
            return ""
        return (
            f"num_samples {header.num_samples} is outside 1..{limit} "
            "([limits] max_num_samples)"
        )

    def _groups_refusal(self, header: UpdateHeader) -> str:
        """Partial labels: a declared group must exist in the base generation (or be a
        pending added head); refused before any byte is taken, and recorded."""
        number = header.base_generation
        known = generation_groups(
            self.ledger.generation_tensors(number), self.ledger.generation_config(number)
        )
        try:
            check_trained_groups(header.trained_groups, known, number)
        except InvalidRequest as exc:
            return str(exc)
        return ""

    def _validated(self, header: UpdateHeader) -> UpdateHeader:
        limit = self.config.limits.max_update_bytes
        if header.total_size <= 0:
            raise InvalidRequest("total_size must be positive")
        if header.total_size > limit:
            raise InvalidRequest(f"update of {header.total_size} bytes exceeds the limit {limit}")
        if not 0 <= header.offset <= header.total_size:
            raise InvalidRequest("offset must lie within total_size")
        if not _SHA256.match(header.sha256):
            raise InvalidRequest("sha256 must be 64 lowercase hex digits")
        if not header.trained_groups or len(set(header.trained_groups)) != len(
            header.trained_groups
        ):
            raise InvalidRequest("trained_groups must be non-empty and without repeats")
        check_numbers(header.local_metrics, "local_metrics")
        if not self.ledger.is_published(header.base_generation):
            raise InvalidRequest(f"base_generation {header.base_generation} is not a generation")
        return UpdateHeader(
            update_id=_canonical_id(header.update_id),
            base_generation=header.base_generation,
            num_samples=header.num_samples,
            trained_groups=tuple(header.trained_groups),
            local_metrics=dict(header.local_metrics),
            total_size=header.total_size,
            sha256=header.sha256,
            offset=header.offset,
        )

    def discard(self, header: UpdateHeader, node_id: str, reason: str) -> None:
        """Drop a malformed upload entirely (row and bytes), record why, raise InvalidRequest."""
        self.staging.discard(header.update_id)
        with self.store.session() as session:
            row = session.get(UpdateRow, header.update_id)
            if row is not None and row.status == UpdateStatus.PARTIAL:
                session.delete(row)
            self.rejections.record(
                session, header.update_id, node_id, "validation", [reason]
            )
        raise InvalidRequest(reason)

    def complete(self, node_id: str, header: UpdateHeader, digest: str) -> UploadStatus:
        staged = self.staging.path(header.update_id)
        if digest != header.sha256:
            self.discard(header, node_id, "sha256 of the received bytes does not match the header")
        # A burst of uploads ends at once: checking them a few at a time keeps the blocks
        # in memory to a few, whatever the number of nodes.
        with self._checking:
            return self._checked(node_id, header, staged)

    def _checked(self, node_id: str, header: UpdateHeader, staged: Path) -> UploadStatus:
        try:
            update = read_tensors(staged)
            base = self.ledger.generation_tensors(header.base_generation)
            # The first weights of an added head have no base: checked against the config.
            fresh = new_head_tensors(
                update, base, self.ledger.generation_config(header.base_generation)
            )
            validate_tensors(update, {**base, **fresh}, header.trained_groups)
        except InvalidRequest as exc:
            self.discard(header, node_id, str(exc))
        reasons = self.gate.check_update(
            {k: v for k, v in update.items() if k not in fresh}, base)
        if reasons:
            with self.store.session() as session:
                row = session.get(UpdateRow, header.update_id, with_for_update=True)
                if row is None:
                    raise NotFound(f"update {header.update_id} vanished during upload")
                self.rejections.reject(session, row, "gate", reasons)
                self.staging.discard(header.update_id)
                return self._status(row)
        # Received: one row's state, in two Core statements (the commit waits for the
        # disk: the node is told RECEIVED only once the row and the blob are durable).
        with self.store.engine.begin() as connection:
            found = connection.execute(
                _FIND_LOCKED, {"find_id": header.update_id}).one_or_none()
            if found is None:
                raise NotFound(f"update {header.update_id} vanished during upload")
            if found.status != UpdateStatus.PARTIAL:  # a replica's stream took it first
                self.staging.discard(header.update_id)  # this stream's copy (locked)
                return self._status(found)
            self.blobs.adopt(staged, header.sha256)
            connection.execute(_MARK_RECEIVED,
                               {"mark_id": header.update_id, "mark_at": utcnow()})
        LOGGER.info(
            "update %s from %s received (%d bytes)",
            header.update_id,
            node_id,
            header.total_size,
        )
        self.on_received()
        return UploadStatus(header.update_id, UploadState.RECEIVED, header.total_size)


def _canonical_id(update_id: str) -> str:
    try:
        return str(uuid.UUID(update_id))
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidRequest(f"update_id {update_id[:40]!r} is not a UUID") from exc


def _check_same(row: KeptUpdate, header: UpdateHeader) -> None:
    if (
        row.sha256 != header.sha256
        or row.total_size != header.total_size
        or row.base_generation != header.base_generation
        or row.num_samples != header.num_samples
        or sorted(row.trained_groups) != sorted(header.trained_groups)
    ):
        raise InvalidRequest(f"update {row.update_id} was started with a different header")
