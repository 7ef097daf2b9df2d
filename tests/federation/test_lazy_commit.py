"""The row an upload opens commits without waiting for the disk, and nothing else does."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, text

from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.lazy_commit import lazy_connection
from federation_grpc.hub.service import HubService
from federation_grpc.hub.store import UpdateRow, UpdateStatus
from tests.federation.conftest import enrol, make_update, small_model

_NORMAL, _FULL = 1, 2  # PRAGMA synchronous


def _pooled_synchronous(service: HubService, count: int = 20) -> set[int]:
    """``PRAGMA synchronous`` of every connection the pool hands out at once."""
    connections = [service.store.engine.connect() for _ in range(count)]
    try:
        return {c.exec_driver_sql("PRAGMA synchronous").scalar() for c in connections}
    finally:
        for connection in connections:
            connection.close()


def test_an_opened_upload_is_kept_lazily_and_every_pooled_connection_stays_synced(
    service: HubService,
) -> None:
    node = enrol(service)
    payload, header = make_update(small_model())
    opened = service.uploads.begin(node, header)
    with service.store.session() as session:
        row = session.get(UpdateRow, header.update_id)
        assert row is not None and row.status == UpdateStatus.PARTIAL
    with lazy_connection(service.store) as connection:
        assert connection.execute(text("PRAGMA synchronous")).scalar() == _NORMAL
    with pytest.raises(KeyError), lazy_connection(service.store) as connection:
        connection.execute(insert(UpdateRow).values(
            update_id="not-kept", node_id=node, base_generation=0, num_samples=1,
            trained_groups=["encoder"], local_metrics={}, total_size=1, sha256="0" * 64,
            status=UpdateStatus.PARTIAL))
        raise KeyError("the transaction fails")
    with service.store.session() as session:
        assert session.get(UpdateRow, "not-kept") is None
    # Every later transaction (an update received above all) still waits for the disk.
    assert _pooled_synchronous(service) == {_FULL}
    opened.write(payload)  # type: ignore[union-attr]
    assert opened.finish().state == UploadState.RECEIVED  # type: ignore[union-attr]
