"""The node's files are private whatever the umask: directories 0700, the database and
the federation credentials 0600 (a umask of 000 used to leave node.db 0666)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.config import load_config
from dicom_node.hub_enrolment import Credentials
from tests.node.conftest import make_ct_series, node_config_data, storescu, write_node_config
from tests.node.test_malformed import part10
from viewer_bridge.main import build_node

pytestmark = pytest.mark.peers


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_directories_are_0700_and_secrets_0600_under_umask_000(
    tmp_path: Path, umask_000: None,
) -> None:
    series = make_ct_series(tmp_path / "ct", 1)
    data_dir = tmp_path / "srv" / "node"   # "srv" is created by the node too
    config = write_node_config(tmp_path / "node.toml", node_config_data(data_dir))
    node = build_node(load_config(config, env={})).start()
    old_chunked = _config.STORE_SEND_CHUNKED_DATASET
    try:
        sent = storescu(node.port, series.files[0])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _config.STORE_SEND_CHUNKED_DATASET = True
        garbage = tmp_path / "garbage.dcm"
        garbage.write_bytes(part10(b"not DICOM " * 20, CTImageStorage, generate_uid()))
        ae = AE(ae_title="MODES")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
        assert int(assoc.send_c_store(garbage).Status) == 0xC210
        assoc.release()
        Credentials(data_dir / "federation" / "credentials.json").save("n1", "secret", "hub:1")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old_chunked
        node.stop()

    study = data_dir / "instances" / series.study_uid
    for d in (tmp_path / "srv", data_dir, data_dir / "instances", study,
              study / series.series_uid, data_dir / "quarantine", data_dir / "federation"):
        assert _mode(d) == 0o700, f"{d}: {oct(_mode(d))}"
    for f in (data_dir / "node.db", data_dir / "federation" / "credentials.json"):
        assert _mode(f) == 0o600, f"{f}: {oct(_mode(f))}"
    for sidecar in (data_dir / "node.db-wal", data_dir / "node.db-shm"):
        if sidecar.exists():
            assert _mode(sidecar) == 0o600, f"{sidecar}: {oct(_mode(sidecar))}"
    for f in [*study.rglob("*.dcm"), *(data_dir / "quarantine").iterdir()]:
        assert not _mode(f) & 0o007, f"{f} is readable by others: {oct(_mode(f))}"
