"""kill -9 of the node while storescu sends: what was acknowledged survives, the
half-received series is resumed (never deleted) and completes once the rest arrives."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.store.models import SeriesState
from tests.node.conftest import (
    STORESCU,
    Index,
    NodeProcess,
    dataset_bytes,
    make_ct_series,
    node_config_data,
    storescu,
    wait_until,
    write_node_config,
)
from tests.peers import peer_env, require_binary

pytestmark = [pytest.mark.peers, pytest.mark.slow]

COUNT = 150
KILL_AFTER = 40


def send_and_kill(port: int, files: list[Path], node: NodeProcess) -> set[Path]:
    """Send ``files`` with ``storescu -v``; SIGKILL the node after ``KILL_AFTER`` success
    responses. Returns the files whose C-STORE storescu saw answered with Success."""
    exe = require_binary(STORESCU)
    proc = subprocess.Popen(
        [exe, "-v", "-aet", "STORESCU", "-aec", "TESSERA", "127.0.0.1", str(port),
         *[str(f) for f in files]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peer_env())
    assert proc.stdout is not None
    acknowledged: set[Path] = set()
    current: Path | None = None
    killed = False
    for line in proc.stdout:
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line:
            assert current is not None
            acknowledged.add(current)
            if len(acknowledged) >= KILL_AFTER and not killed:
                node.kill()
                killed = True
    proc.wait(60)
    assert killed, "storescu finished before the node could be killed"
    return acknowledged


def test_kill_9_while_receiving_keeps_acknowledged_instances_and_series_completes(
    tmp_path: Path, node_process: Callable[..., NodeProcess],
    open_index: Callable[[Path], Index],
) -> None:
    series = make_ct_series(tmp_path / "ct", COUNT)
    uid_of = dict(zip(series.files, series.sop_uids, strict=True))
    data_dir = tmp_path / "node"
    config = write_node_config(tmp_path / "node.toml", node_config_data(data_dir, quiet_s=3))

    first = node_process(config)
    acknowledged = send_and_kill(first.port, series.files, first)
    assert KILL_AFTER <= len(acknowledged) < COUNT

    second = node_process(config)
    index = open_index(data_dir)
    stored = index.instance_paths()
    for path in acknowledged:
        uid = uid_of[path]
        assert uid in stored, f"acknowledged instance {uid} lost by kill -9"
        assert dataset_bytes(stored[uid]) == dataset_bytes(path)
    # The half-received series is still there, waiting for the rest.
    assert index.series_state(series.series_uid) in (SeriesState.RECEIVING,
                                                     SeriesState.COMPLETE)

    rest = [f for f in series.files if f not in acknowledged]
    result = storescu(second.port, *rest)
    assert result.returncode == 0, result.stdout + result.stderr

    wait_until(lambda: index.series_state(series.series_uid) == SeriesState.COMPLETE
               and index.instance_count(series.series_uid) == COUNT,
               timeout=60, what="the series complete with every instance")
    stored = index.instance_paths()
    assert set(stored) == set(series.sop_uids)
    for path, uid in uid_of.items():
        assert dataset_bytes(stored[uid]) == dataset_bytes(path)
