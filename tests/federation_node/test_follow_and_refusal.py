"""Against a real mTLS hub: a worker process sharing the node's database serves a new
hub generation while it runs; a hub that refuses the node (revoked, unknown token) is
not retried, and ``tessera node status`` says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.config import load_config
from dicom_node.federation import REFUSED_EVENT
from dicom_node.node import Node
from dicom_node.status import node_status, render_status
from dicom_node.store.models import AuditEvent
from federation_grpc.errors import PermissionDenied
from tests.node.conftest import wait_until, write_node_config

from .conftest import TEST_MODEL, WireRecorder, federated_node_data, node_tls, outbox, seed_update


def _node(tmp_path: Path, data: dict[str, Any], name: str, **kw: Any) -> Node:
    return Node(load_config(write_node_config(tmp_path / f"{name}.toml", data), env={}), **kw)


def test_a_running_worker_serves_the_new_hub_generation(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    hub = start_hub()
    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs))
    data["jobs"] = {**data.get("jobs", {}), "poll_interval_s": 0.2}
    node = _node(tmp_path, data, "node").start()
    # `tessera node worker`: same database and data_dir, no SCP, no federation agent.
    worker = _node(tmp_path, data, "worker", serve_dicom=False).start()
    try:
        assert worker.parts.models.get(TEST_MODEL)[1].generation == 0
        seed_update(node.config.node.resolved_database_url(), model_file,
                    node.config.node.data_dir)
        wait_until(lambda: node.parts.models.loaded_generation(TEST_MODEL) == 1, timeout=60,
                   what="the serving process to swap in hub generation 1")
        wait_until(lambda: worker.parts.models.loaded_generation(TEST_MODEL) == 1, timeout=30,
                   what="the worker to follow to hub generation 1")
        model, config = worker.parts.models.get(TEST_MODEL)
        served, _ = node.parts.models.get(TEST_MODEL)
        assert config.generation == 1
        for (name, mine), theirs in zip(model.state_dict().items(),
                                        served.state_dict().values(), strict=True):
            assert bool((mine == theirs).all()), name  # the same weights, not only the number
    finally:
        worker.stop()
        node.stop()


def _wire_node(tmp_path: Path, data: dict[str, Any]) -> tuple[Node, WireRecorder]:
    node = _node(tmp_path, data, "node")
    wire = WireRecorder()
    node.parts.federation.interceptors.append(wire)
    return node.start(), wire


def test_a_revoked_node_stops_federating_and_says_so(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    hub = start_hub()
    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs))
    node, _ = _wire_node(tmp_path, data)
    agent = node.parts.federation
    url = node.config.node.resolved_database_url()
    try:
        wait_until(lambda: hub.service.list_nodes(), timeout=30, what="enrolment")
        # A request-level PERMISSION_DENIED (a generation no longer offered) is not a
        # refusal of the node: the probe passes with valid credentials.
        assert agent.refused_by_hub(PermissionDenied("generation 7 was rejected")) is False
        assert agent.refused is None

        hub.service.revoke_node(agent.node_id)
        update = seed_update(url, model_file, node.config.node.data_dir)
        agent.wake()
        wait_until(lambda: agent.refused, timeout=30, what="the node to take the refusal")
        assert "revoked" in agent.refused
        # The node stops federating by itself: both loops end (a node that retried would
        # keep them running and count attempts every 0.3 s upload interval).
        wait_until(lambda: not agent.running, timeout=30, what="the federation threads to end")
        [(uid, state, attempts, error)] = outbox(url)
        assert (uid, state) == (update, "pending")  # kept for after re-enrolment
        assert attempts <= 1, f"the refused update was tried {attempts} times"
        if attempts:  # refused on its upload, not first by the watch stream
            assert "refuses this node" in (error or "")
        with node.parts.db.session() as s:
            refusals = [e.reason for e in s.scalars(
                select(AuditEvent).where(AuditEvent.kind == REFUSED_EVENT))]
        assert len(refusals) == 1 and "revoked" in refusals[0], refusals
        report = node_status(node.parts.db)
        refused = report["federation"]["refused"]
        assert refused is not None and "revoked" in refused["reason"]
        assert refused["hub"] == hub.target
        text = render_status(report)
        assert "REFUSED by hub" in text and "revoked" in text
        json.dumps(report, default=str)
    finally:
        node.stop()


def test_an_unknown_node_token_is_a_refusal_too(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    hub = start_hub()
    data = federated_node_data(tmp_path / "site", model_file, hub.target,
                               tls=node_tls(certs))
    credentials = tmp_path / "site" / "federation" / "credentials.json"
    credentials.parent.mkdir(parents=True, exist_ok=True)
    credentials.write_text(json.dumps({"node_id": "node-forged", "node_token": "not-a-token"}))
    node, _ = _wire_node(tmp_path, data)
    try:
        agent = node.parts.federation
        wait_until(lambda: agent.refused, timeout=30, what="the refusal")
        assert "UNAUTHENTICATED" in agent.refused
        wait_until(lambda: not agent.running, timeout=30, what="the federation threads to end")
        refused = node_status(node.parts.db)["federation"]["refused"]
        assert refused is not None and "unknown node token" in refused["reason"]
    finally:
        node.stop()


@pytest.mark.parametrize("kind", ["hub-refused", "hub-enrolled"])
def test_status_shows_the_latest_of_refusal_and_enrolment(
    tmp_path: Path, model_file: Path, kind: str
) -> None:
    data = federated_node_data(tmp_path / "site", model_file, "127.0.0.1:1", insecure=True)
    node = _node(tmp_path, data, "node")
    try:
        with node.parts.db.session() as s:
            s.add(AuditEvent(kind="hub-refused" if kind == "hub-enrolled" else "hub-enrolled",
                             peer_address="hub:1", reason="earlier"))
            s.flush()
            s.add(AuditEvent(kind=kind, peer_address="hub:1", reason="PermissionDenied: x"))
        refused = node_status(node.parts.db)["federation"]["refused"]
        assert (refused is not None) == (kind == "hub-refused")
    finally:
        node.parts.db.dispose()
