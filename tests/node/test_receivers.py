"""Receiving processes (``[dicom] receivers``, issue 24): the node's process admits every
connection and hands it to the receiver holding the fewest; each receiver journals what
it acknowledges, so kill -9 of a receiver, or of the whole node, loses nothing."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.config import NodeConfig, load_config
from dicom_node.config.example import EXAMPLE_CONFIG
from dicom_node.dicom.receiver_pool import ReceiverPool
from dicom_node.dicom.scp import serve_handed
from dicom_node.node import Node
from dicom_node.prometheus import add_count
from dicom_node.status import journal_status, node_status, render_status
from dicom_node.store.journal import read_segment
from dicom_node.store.opening import journal_dir, open_store
from tests.node.conftest import (
    CT_IMAGE_STORAGE,
    Index,
    NodeProcess,
    dataset_bytes,
    make_ct_series,
    node_config_data,
    status_json,
    storescu,
    tessera,
    wait_until,
    write_node_config,
)
from tests.node.test_intake_journal import REPEATS, SEED, send_and_kill_after
from tests.peers import require_binary

RECEIVED = "tessera_node_instances_received_total"
EXITS = "tessera_node_dicom_receiver_exits_total"
READY = "tessera_node_dicom_receivers_ready"


def two_receivers(data_dir: Path, **dicom: Any) -> dict[str, Any]:
    return node_config_data(data_dir, quiet_s=3, dicom={"receivers": 2, **dicom})


def pool_of(node: Node) -> ReceiverPool:
    assert node.receivers is not None, "the node started no receiving process"
    return node.receivers


def associate(port: int) -> Association:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CT_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESSERA")
    assert assoc.is_established
    return assoc


def received_count() -> float:
    return REGISTRY.get_sample_value(RECEIVED, {"source": "dicom"}) or 0.0


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid``, whichever of its threads started them."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


@pytest.fixture
def open_node(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Node]]:
    """In-process nodes (their receivers are real processes); stopped at teardown."""
    nodes: list[Node] = []

    def _open(data: dict[str, Any]) -> Node:
        config = load_config(write_node_config(tmp_path / f"n{len(nodes)}.toml", data), env={})
        nodes.append(Node(config).start())
        return nodes[-1]

    yield _open
    for node in nodes:
        node.stop()


def test_connections_go_to_the_receiver_holding_fewest_and_every_instance_is_indexed(
    tmp_path: Path, open_node: Callable[[dict[str, Any]], Node],
) -> None:
    node = open_node(two_receivers(tmp_path / "node"))
    pool = pool_of(node)
    assert pool.ready() == 1
    series = make_ct_series(tmp_path / "ct", 6)
    before = received_count()

    first = associate(node.port)   # a tie: the receiving process takes it
    wait_until(lambda: pool.held() == {1: 1}, what="the first association in receiver 1")
    second = associate(node.port)  # the receiver holds more: the node's process serves
    third = associate(node.port)   # a tie again: the receiver
    wait_until(lambda: pool.held() == {1: 2}, what="the third association in receiver 1")
    for i, assoc in enumerate((first, second, third, first, second, third)):
        status = assoc.send_c_store(dcmread(series.files[i]))
        assert status.Status == 0x0000, f"C-STORE {i}: {status}"
    for assoc in (first, second, third):
        assoc.release()
    wait_until(lambda: pool.held() == {1: 0}, what="the receiver's closes reported")

    index = Index(tmp_path / "node")
    try:
        wait_until(lambda: index.instance_count() == 6, what="every instance indexed")
        assert index.sop_uids() == set(series.sop_uids)
    finally:
        index.close()
    # The receiver's counts reach the node's /metrics (4 of the 6 were its own).
    assert received_count() - before == 6


def test_a_receiver_killed_mid_send_is_restarted_and_what_it_acknowledged_is_indexed(
    tmp_path: Path, open_node: Callable[[dict[str, Any]], Node],
) -> None:
    node = open_node(two_receivers(tmp_path / "node"))
    pool = pool_of(node)
    (old_pid,) = pool.pids().values()
    series = make_ct_series(tmp_path / "ct", 120)
    uid_of = dict(zip(series.files, series.sop_uids, strict=True))

    class Receiver:  # the one association goes to the receiving process (a tie)
        @staticmethod
        def kill() -> None:
            os.kill(old_pid, signal.SIGKILL)

    exits = REGISTRY.get_sample_value(EXITS) or 0.0
    acknowledged = send_and_kill_after(node.port, series.files, Receiver(), 40)
    assert 40 <= len(acknowledged) < len(series.files)
    # A dead process leaves pids() at once, its ready flag only once its exit is handled:
    # wait for the exit counted and a new process ready.
    wait_until(lambda: REGISTRY.get_sample_value(EXITS) == exits + 1 and pool.ready() == 1
               and len(pool.pids()) == 1 and old_pid not in pool.pids().values(),
               timeout=60, what="receiver 1 started again")
    assert REGISTRY.get_sample_value(READY) == 1
    index = Index(tmp_path / "node")
    try:
        stored = wait_until(lambda: (s := index.instance_paths()).keys() >= {
            uid_of[f] for f in acknowledged} and s, timeout=60,
            what="every acknowledged instance indexed after the restart")
        for path in acknowledged:
            assert dataset_bytes(stored[uid_of[path]]) == dataset_bytes(path)
        send_the_rest(node.port, series.files, acknowledged, index)  # the new receiver
    finally:
        index.close()


def send_the_rest(port: int, files: list[Path], acknowledged: set[Path], index: Index) -> None:
    """Send what was not acknowledged; then the whole series is indexed."""
    result = storescu(port, *[f for f in files if f not in acknowledged])
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: index.instance_count() == len(files), timeout=60,
               what="the whole series indexed")


def test_a_receiver_that_cannot_start_again_leaves_nothing_it_acknowledged_unindexed(
    tmp_path: Path, open_node: Callable[[dict[str, Any]], Node],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node's process replays an exited receiver's journal at once: a receiver that
    never comes back (here: no process can be started for it) holds nothing back."""
    data_dir = tmp_path / "node"
    node = open_node(two_receivers(data_dir))
    pool = pool_of(node)
    (old_pid,) = pool.pids().values()
    journals = {0: journal_dir(node.config, 0), 1: journal_dir(node.config, 1)}
    before = journal_status(journals, 2)
    assert [j["held_by"] for j in before] == [os.getpid(), old_pid]
    monkeypatch.setattr(pool, "_spawn", lambda receiver: False)
    series = make_ct_series(tmp_path / "ct", 120)
    uid_of = dict(zip(series.files, series.sop_uids, strict=True))

    class Receiver:
        @staticmethod
        def kill() -> None:
            os.kill(old_pid, signal.SIGKILL)

    acknowledged = send_and_kill_after(node.port, series.files, Receiver(), 40)
    assert 40 <= len(acknowledged) < len(series.files)
    index = Index(data_dir)
    try:
        wait_until(lambda: index.instance_paths().keys() >= {uid_of[f] for f in acknowledged},
                   timeout=60, what="what the receiver acknowledged indexed without it")
        assert pool.ready() == 0 and pool.pids() == {}
        # Replayed, checkpointed and let go by the node's process (it holds its own).
        after = wait_until(lambda: (j := {j["receiver"]: j for j in journal_status(
            journals, 2)})[1]["held_by"] is None and j, what="receiver 1's journal let go")
        assert after[0]["held_by"] == os.getpid() and after[1]["records"] == 0
        assert "not held, 0 record(s)" in render_status(
            {**node_status(node.parts.db), "intake_journals": list(after.values())})
        send_the_rest(node.port, series.files, acknowledged, index)  # the node's own SCP
    finally:
        index.close()


class WholeNode:
    """kill -9 of a node process and its receivers, all at once."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.receivers = children_of(node.proc.pid)

    def kill(self) -> None:
        for pid in self.receivers:
            os.kill(pid, signal.SIGKILL)
        self.node.kill()


@pytest.mark.peers
def test_kill_9_of_the_whole_node_then_fewer_receivers_replays_the_retired_journal(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
) -> None:
    data_dir = tmp_path / "node"
    two = write_node_config(tmp_path / "two.toml", two_receivers(data_dir))
    one = write_node_config(tmp_path / "one.toml", node_config_data(data_dir, quiet_s=3))
    series = make_ct_series(tmp_path / "ct", 120)
    uid_of = dict(zip(series.files, series.sop_uids, strict=True))

    first = node_process(two)
    whole = WholeNode(first)
    assert len(whole.receivers) == 1, "one receiving process beside the node's"
    acknowledged = send_and_kill_after(first.port, series.files, whole, 50)
    assert 50 <= len(acknowledged) < len(series.files)
    # The receiving process took the association: its journal holds the records (no
    # checkpoint within the first 10 s has dropped them).
    journaled = [intent for segment in sorted((data_dir / "intake-1").glob("*.journal"))
                 for intent, _ in read_segment(segment)]
    assert len(journaled) >= 50
    # What an operator sees before starting again: nobody holds receiver 1's journal,
    # and the next start (one receiver) replays what it holds.
    journals = {j["receiver"]: j for j in status_json(one)["intake_journals"]}
    assert journals[1] == {"receiver": 1, "journal": "intake-1", "held_by": None,
                           "records": len(journaled), "retired": True}
    assert journals[0]["held_by"] is None
    text = tessera("node", "status", "--config", str(one)).stdout
    assert "intake-1   not held, " f"{len(journaled)} record(s) (replayed at the node's " \
        "next start" in text

    node_process(one)  # receivers = 1: receiver 1's journal is replayed here
    index = Index(data_dir)
    try:
        stored = index.instance_paths()
        missing = {uid_of[f] for f in acknowledged} - set(stored)
        assert not missing, f"acknowledged, not indexed: {sorted(missing)[:3]}"
        for path in acknowledged:
            assert dataset_bytes(stored[uid_of[path]]) == dataset_bytes(path)
        assert not (data_dir / "intake-1").exists(), "the retired journal is removed"
    finally:
        index.close()


@pytest.mark.peers
@pytest.mark.slow
def test_kill_9_of_the_whole_node_at_random_points_acknowledged_equals_indexed(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
) -> None:
    """Issue 24's invariant with two receivers: kill -9 of the node and its receiver
    after a random number of answers, REPEATS times; each start replays both journals."""
    rng = random.Random(SEED)
    data_dir = tmp_path / "node"
    config = write_node_config(tmp_path / "node.toml", two_receivers(data_dir))
    acknowledged: dict[str, Path] = {}
    sent: set[str] = set()
    index = Index(data_dir)
    try:
        for rep in range(REPEATS):
            node = node_process(config)
            series = make_ct_series(tmp_path / f"ct{rep}", 60)
            uid_of = dict(zip(series.files, series.sop_uids, strict=True))
            kill_after = rng.randint(1, 59)
            acked = send_and_kill_after(node.port, series.files, WholeNode(node), kill_after)
            where = f"seed {SEED}, rep {rep}, killed after {kill_after}"
            assert len(acked) >= kill_after, where
            acknowledged.update({uid_of[f]: f for f in acked})
            sent.update(series.sop_uids)
        node_process(config)  # replays what the last kill left
        stored = wait_until(lambda: (s := index.instance_paths()).keys() >= set(acknowledged)
                            and s, timeout=60, what="every acknowledged instance indexed")
        assert set(stored) <= sent
        for uid, path in acknowledged.items():
            assert dataset_bytes(stored[uid]) == dataset_bytes(path), uid
    finally:
        index.close()


@pytest.mark.peers
def test_receivers_stop_when_the_node_process_dies(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
) -> None:
    node = node_process(write_node_config(tmp_path / "node.toml",
                                          two_receivers(tmp_path / "node")))
    (receiver,) = children_of(node.proc.pid)
    series = make_ct_series(tmp_path / "ct", 5)
    result = storescu(node.port, *series.files)
    assert result.returncode == 0, result.stdout + result.stderr
    node.kill()
    deadline = time.monotonic() + 30
    while alive(receiver) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(receiver), "the receiver outlived the node's process"


def test_max_associations_is_shared_among_the_receivers(
    tmp_path: Path, open_node: Callable[[dict[str, Any]], Node],
) -> None:
    node = open_node(two_receivers(tmp_path / "node", max_associations=2))
    pool = pool_of(node)
    first = associate(node.port)   # receiver 1 (its share: 1)
    wait_until(lambda: pool.held() == {1: 1}, what="the first association in receiver 1")
    second = associate(node.port)  # the node's process (its share: 1)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CT_IMAGE_STORAGE)
    third = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert third.is_rejected, "a third association past max_associations = 2"
    for assoc in (first, second):
        assoc.release()


@contextmanager
def handed_receiver(data: dict[str, Any], tmp_path: Path,
                    ) -> Iterator[tuple[socket.socket, socket.socket, threading.Event]]:
    """A receiving process's SCP in this process: the node's end of its control socket,
    a listener to make connections to hand it, and its ended event."""
    config = load_config(write_node_config(tmp_path / "node.toml", data), env={})
    store = open_store(config)
    store.open_journal(journal_dir(config, 1))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(10)
    scp, ended = serve_handed(config.dicom, store, theirs, ("127.0.0.1", 0), share=2)
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield ours, listener, ended
    finally:
        listener.close()
        ours.close()
        scp.shutdown()
        store.close_journal()
        store.db.dispose()


def hand(ours: socket.socket, number: int, sock: socket.socket) -> None:
    address = sock.getpeername()
    header = json.dumps({"id": number, "address": [address[0], address[1]]}).encode()
    socket.send_fds(ours, [header], [sock.fileno()])
    sock.close()


def test_a_receiver_survives_an_unreadable_hand_off(tmp_path: Path) -> None:
    with handed_receiver(two_receivers(tmp_path / "node"), tmp_path) as (ours, listener,
                                                                          ended):
        garbage = socket.socket()
        for message in (b"\xff not json", b'{"id": "1", "address": 5}', b"[]",
                        b'{"id": 1, "address": ["' + b"\x1b" * 2000 + b'", 1]}',
                        b"[" * 1000, b""):
            socket.send_fds(ours, [message], [garbage.fileno()])
        ours.send(b'{"id": 7, "address": ["127.0.0.1", 1]}')  # no socket with it
        assert ours.recv(4096) == b'{"closed": 7}'
        garbage.close()
        # A well-formed hand-off after all that is served.
        client = socket.create_connection(listener.getsockname())
        hand(ours, 8, listener.accept()[0])
        client.close()  # closed before associating: the receiver reports it closed
        assert ours.recv(4096) == b'{"closed": 8}'
        assert not ended.is_set()
        ours.shutdown(socket.SHUT_WR)
        wait_until(ended.is_set, timeout=10, what="the receiver to see the node's end")


def test_a_tls_connection_reset_before_the_receiver_wraps_it_gives_its_place_back(
    tmp_path: Path,
) -> None:
    """A peer that connects and resets at once (a load balancer's health check): the TLS
    wrap fails in the receiver, which must still say the connection closed, or its place
    in the node's guard would never come back."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run([require_binary("/usr/bin/openssl"), "req", "-x509", "-newkey",
                           "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                           "-days", "1", "-subj", "/CN=localhost"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    data = two_receivers(tmp_path / "node", tls_cert=str(cert), tls_key=str(key))
    with handed_receiver(data, tmp_path) as (ours, listener, _):
        client = socket.create_connection(listener.getsockname())
        accepted = listener.accept()[0]
        address = accepted.getpeername()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        assert select.select([accepted], [], [], 10)[0], "the reset never arrived"
        header = json.dumps({"id": 9, "address": [address[0], address[1]]}).encode()
        socket.send_fds(ours, [header], [accepted.fileno()])
        accepted.close()
        assert ours.recv(4096) == b'{"closed": 9}'


def test_only_the_ingest_counters_can_be_forwarded() -> None:
    for name, labels in (("jobs", ("x",)), ("received", ()), ("received", ("a", "b")),
                         ("refused", ("dicom", 5))):
        with pytest.raises(ValueError, match="not an ingest counter"):
            add_count(name, labels)  # type: ignore[arg-type]
    before = received_count()
    add_count("received", ("dicom",))
    assert received_count() == before + 1


def test_the_configuration_reaches_a_receiver_unchanged(tmp_path: Path) -> None:
    """A receiving process gets the node's configuration as JSON on stdin (never a
    pickle): every section of the example, overrides included, survives the trip."""
    path = tmp_path / "node.toml"
    path.write_text(EXAMPLE_CONFIG, encoding="utf-8")
    config = load_config(path, env={"TESSERA_DICOM__RECEIVERS": "3"},
                         overrides={"dicom.port": 0, "node.data_dir": str(tmp_path / "n")})
    assert config.rules and config.destinations and config.dicom.receivers == 3
    assert NodeConfig.model_validate_json(config.model_dump_json()) == config


def test_a_retired_journal_still_held_by_its_receiver_is_left_for_a_later_start(
    tmp_path: Path, open_node: Callable[[dict[str, Any]], Node],
) -> None:
    """A node killed with kill -9 leaves its receiver finishing its associations; a node
    started meanwhile with fewer receivers must start, and leave that journal to it."""
    data_dir = tmp_path / "node"
    config = load_config(write_node_config(tmp_path / "two.toml", two_receivers(data_dir)),
                         env={})
    held = open_store(config)
    held.open_journal(journal_dir(config, 1))  # the outliving receiver
    try:
        node = open_node(node_config_data(data_dir, quiet_s=3))
        assert node.receivers is None
        assert (data_dir / "intake-1" / "LOCK").exists()
    finally:
        held.close_journal()
        held.db.dispose()
