"""The node's federation glue against a real mTLS hub in this process: enrol once,
upload from the outbox, serve the hub's generation without a restart, keep local
version numbers apart from the hub's, resume an interrupted download by offset."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from dicom_node.config import load_config
from dicom_node.federation import REFUSED_EVENT, FederationAgent, hub_update_id
from dicom_node.node import Node
from dicom_node.pipeline.versions import LOCAL_FLOOR, next_generation
from dicom_node.status import node_status
from dicom_node.store.models import AuditEvent, ModelVersion
from federation_grpc._proto import federation_pb2 as pb
from federation_grpc.errors import HubUnavailable, PermissionDenied
from tests.federation.hubproc import REPO
from tests.node.conftest import wait_swapped, wait_until, write_node_config

from .conftest import (
    TEST_MODEL,
    WireRecorder,
    federated_node_data,
    node_tls,
    outbox,
    seed_update,
    serving,
    settled_outbox,
)


def _node(tmp_path: Path, data: dict[str, Any], name: str = "node") -> Node:
    return Node(load_config(write_node_config(tmp_path / f"{name}.toml", data), env={}))


def test_node_enrols_once_uploads_and_serves_the_new_hub_generation(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    hub = start_hub()
    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs))
    node = _node(tmp_path, data).start()
    url = node.config.node.resolved_database_url()
    try:
        update = seed_update(url, model_file, node.config.node.data_dir)
        wait_until(lambda: hub.current() >= 1, timeout=60, what="hub generation 1")
        wait_until(lambda: serving(url) == (1, "hub"), timeout=60,
                   what="the node to serve hub generation 1")
        wait_swapped(node, TEST_MODEL, 1)  # hot swapped
        [(uid, state, attempts, error)] = settled_outbox(url)
        assert (uid, state, attempts, error) == (update, "sent", 1, None)
        generation = hub.service.list_generations()[-1]
        node_id = node.parts.federation.node_id
        assert generation.update_ids == (hub_update_id(node_id, update),)

        creds = node.parts.federation.credentials.path
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    finally:
        node.stop()

    # A restart uses the stored credentials (the one-time token is spent) and serves
    # generation 1 from its table before it hears from the hub.
    again = _node(tmp_path, data, "again")
    assert again.parts.models.get(TEST_MODEL)[1].generation == 1
    again.start()
    try:
        seed_update(url, model_file, again.config.node.data_dir, base=1, seed=3)
        wait_until(lambda: serving(url) == (2, "hub"), timeout=60, what="hub generation 2")
        assert again.parts.federation.node_id == node_id
        assert [n.node_id for n in hub.service.list_nodes()] == [node_id]
    finally:
        again.stop()


class _LostEnrolAnswers(grpc.UnaryUnaryClientInterceptor):
    """Lets an Enrol call reach the hub, then loses its answer, as a connection that
    drops after the hub committed: the node sees UNAVAILABLE."""

    def __init__(self, lose: int) -> None:
        self.lose = lose

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith("/Enrol") and self.lose > 0:
            outcome.result()  # the hub has answered
            self.lose -= 1
            raise _Unavailable()
        return outcome


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection lost after the request (test)"


def _agent(tmp_path: Path, hub: Any, certs: Any, model_file: Path, name: str,
           token: str, lose: int) -> FederationAgent:
    data = federated_node_data(tmp_path / name, model_file, hub.target, token=token,
                               tls=node_tls(certs))
    agent = _node(tmp_path, data, name).parts.federation
    agent.interceptors.append(_LostEnrolAnswers(lose))
    return agent


def _works(agent: FederationAgent) -> None:
    """The agent's saved token is the one the hub takes."""
    assert agent.client().upload_status(str(uuid.uuid4())).state.name == "UNKNOWN"
    agent.stop()


def test_an_enrolment_whose_answer_was_lost_is_answered_again(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    """The one-time enrolment token is spent at the hub before the node has saved its
    credentials. A retried call, and a node killed before the save and started again,
    enrol once more under the same request id and get the same answer."""
    hub = start_hub()
    # The call's own retry gets the answer the first attempt lost.
    retried = _agent(tmp_path, hub, certs, model_file, "retried", hub.token(), lose=1)
    retried.client()
    _works(retried)
    assert not retried.credentials.request_path.exists()

    # Every attempt's answer lost: the node gives up, as if killed before the save ...
    token = hub.token()
    killed = _agent(tmp_path, hub, certs, model_file, "killed", token, lose=3)
    with pytest.raises(HubUnavailable):
        killed.client()
    assert killed.credentials.load() is None and killed.credentials.request_path.exists()
    assert len(hub.service.list_nodes()) == 2  # ... after the hub enrolled it
    # ... and started again, with the same data directory and token.
    restarted = _agent(tmp_path, hub, certs, model_file, "killed", token, lose=0)
    restarted.client()
    _works(restarted)
    assert {n.node_id for n in hub.service.list_nodes()} == {
        retried.node_id, restarted.node_id}
    # Someone else with the spent token (another request id) is still refused.
    other = _agent(tmp_path, hub, certs, model_file, "other", token, lose=0)
    with pytest.raises(PermissionDenied, match="already used"):
        other.client()


def test_a_crash_while_enrolling_never_leaves_credentials_beside_an_old_refusal(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node refused before is enrolled again with a new enrolment token. Killed between its two
    writes (the event, the credentials), it must not keep credentials while its status
    still shows the refusal; started again, it enrols as the same node."""
    hub = start_hub()
    token = hub.token()
    agent = _agent(tmp_path, hub, certs, model_file, "site", token, lose=0)
    with agent.db.session() as s:
        s.add(AuditEvent(kind=REFUSED_EVENT, peer_address="hub", reason="revoked (before)"))

    def killed(kind: str, reason: str) -> None:
        raise SystemExit("killed while writing the event (test)")

    monkeypatch.setattr(agent, "_audit", killed)
    with pytest.raises(SystemExit):
        agent.client()
    if agent.credentials.load() is not None:
        assert node_status(agent.db)["federation"]["refused"] is None, "credentials kept, " \
            "yet the status shows the old refusal"
    again = _agent(tmp_path, hub, certs, model_file, "site", token, lose=0)
    again.client()
    _works(again)
    assert node_status(again.db)["federation"]["refused"] is None
    assert [n.node_id for n in hub.service.list_nodes()] == [again.node_id]


def test_local_versions_are_numbered_apart_from_hub_generations(
    tmp_path: Path, certs: Any, model_file: Path
) -> None:
    data = federated_node_data(tmp_path / "site", model_file, "127.0.0.1:1", insecure=True)
    node = _node(tmp_path, data)
    try:
        with node.parts.db.session() as s:
            s.add(ModelVersion(name=TEST_MODEL, generation=3, origin="hub", state="serving"))
            s.flush()
            first = next_generation(s, TEST_MODEL, 3, local_floor=LOCAL_FLOOR)
            s.add(ModelVersion(name=TEST_MODEL, generation=first, parent_generation=3,
                               origin="local", state="serving"))
            s.flush()
            second = next_generation(s, TEST_MODEL, first, local_floor=LOCAL_FLOOR)
            from dicom_node.pipeline.versions import hub_base_generation

            s.add(ModelVersion(name=TEST_MODEL, generation=second, parent_generation=first,
                               origin="local", state="serving"))
            s.flush()
            base = hub_base_generation(s, TEST_MODEL, second)
        assert (first, second, base) == (LOCAL_FLOOR + 1, LOCAL_FLOOR + 2, 3)
    finally:
        node.parts.db.dispose()


def test_an_update_whose_bytes_changed_on_disk_is_refused_by_the_hub_and_kept_out(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    """The upload declares the sha256 kept since the update was written, so bytes that
    changed on disk since (a bad sector, a hand edit) are refused at the hub, and the
    outbox row says why instead of retrying for ever."""
    hub = start_hub()
    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs), watch=False)
    node = _node(tmp_path, data)
    url = node.config.node.resolved_database_url()
    try:
        update = seed_update(url, model_file, node.config.node.data_dir)
        path = node.config.node.data_dir / "updates" / f"{update}.safetensors"
        changed = bytearray(path.read_bytes())
        changed[-1] ^= 0x01  # one bit of the last tensor
        path.write_bytes(bytes(changed))
        assert node.parts.federation.upload_pending() == 0
        [(uid, state, _, error)] = outbox(url)
        assert (uid, state) == (update, "dead") and "sha256" in (error or ""), error
        assert hub.current() == 0
    finally:
        node.parts.db.dispose()


def test_interrupted_download_resumes_by_offset(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    hub = start_hub()
    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs), chunk_kb=8, watch=False)
    node = _node(tmp_path, data)
    url = node.config.node.resolved_database_url()
    seed_update(url, model_file, node.config.node.data_dir)
    agent: FederationAgent = node.parts.federation
    assert agent.upload_pending() == 1
    wait_until(lambda: hub.current() == 1, timeout=60, what="hub generation 1")
    generation = next(g for g in agent.client().watch(0) if g.number == 1)

    class Crash(BaseException):
        """Stands in for the process dying: nothing below catches it."""

    def crash_at_half(received: int) -> None:
        if received >= generation.size_bytes // 2:
            raise Crash

    part = (agent.dir / "downloads" /
            f"{TEST_MODEL}-generation-00001.safetensors.part")
    part.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(Crash):
        agent.client().download_to(1, part.with_suffix(""), on_chunk=crash_at_half)
    held = part.stat().st_size
    assert 0 < held < generation.size_bytes
    node.stop()

    # A new process: fresh agent and channel, the .part file on disk.
    resumed = _node(tmp_path, data, "resumed")
    wire = WireRecorder()
    resumed.parts.federation.interceptors.append(wire)
    resumed.parts.federation.apply(generation)
    assert serving(url) == (1, "hub")
    assert resumed.parts.models.get(TEST_MODEL)[1].generation == 1
    offsets = [pb.DownloadGenerationRequest.FromString(r).offset
               for r in wire.requests("DownloadGeneration")]
    assert offsets == [held]
    assert not part.exists()
    resumed.parts.db.dispose()


def test_node_process_killed_mid_download_resumes_by_offset(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    import subprocess
    import sys

    hub = start_hub()
    helper = federated_node_data(tmp_path / "helper", model_file, hub.target,
                                 token=hub.token(), tls=node_tls(certs))
    seeder = _node(tmp_path, helper, "helper")
    seed_update(seeder.config.node.resolved_database_url(), model_file,
                seeder.config.node.data_dir)
    assert seeder.parts.federation.upload_pending() == 1
    seeder.parts.db.dispose()
    wait_until(lambda: hub.current() == 1, timeout=60, what="hub generation 1")
    size = hub.service.list_generations()[-1].size_bytes

    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs), chunk_kb=8)
    config = write_node_config(tmp_path / "site.toml", data)
    serve = ["node", "serve", "--config", str(config)]
    command = [sys.executable, "-m", "viewer_bridge.main", *serve]
    log = tmp_path / "site.log"
    with log.open("ab") as err:
        crashed = subprocess.run(
            [sys.executable, "-m", "tests.federation_node.killed_mid_download", str(size // 2),
             *serve], stdout=subprocess.DEVNULL, stderr=err, timeout=120, cwd=REPO)
    assert crashed.returncode == 137
    part = next((tmp_path / "site" / "federation" / "downloads").glob("*.part"))
    held = part.stat().st_size
    assert size // 2 <= held < size

    with log.open("ab") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = f"sqlite:///{(tmp_path / 'site' / 'node.db').resolve()}"
        wait_until(lambda: serving(url) == (1, "hub"), timeout=90,
                   what="the restarted node serving generation 1")
    finally:
        proc.terminate()
        proc.wait(30)
    assert f"resuming download of generation 1 at byte {held}" in log.read_text()
    assert not part.exists()
