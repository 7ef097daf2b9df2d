"""Node observability: /metrics on the HTTP port with the named series, JSON logs that
parse line by line, and no patient name or ID anywhere in the node's log output."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom

from federation_grpc.jsonlog import JsonFormatter
from tests.node.conftest import (  # noqa: F401  (fixtures)
    NodeProcess,
    StoreSCP,
    forward_rule,
    make_ct_series,
    node_config_data,
    node_process,
    storescp_factory,
    storescu,
    wait_until,
    write_node_config,
)
from tests.peers import free_port

PATIENT_NAME = "Zyxwquorth^Belphegora"
PATIENT_ID = "PID-7Q4X9-TESSERA"


def test_json_formatter_escapes_quotes_newlines_and_controls() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1,
                               'he said "hi"\nnext line \x07 and \\ %s', ("ü",), None)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == 'he said "hi"\nnext line \x07 and \\ ü'
    assert doc["level"] == "WARNING" and doc["logger"] == "x"


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def test_metrics_and_no_patient_data_in_logs(
        tmp_path: Path, node_process: Callable[..., NodeProcess],  # noqa: F811
        storescp_factory: Callable[..., StoreSCP]) -> None:  # noqa: F811
    pacs = storescp_factory()
    series = make_ct_series(tmp_path / "series", 3, description="obs test")
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.OtherPatientIDs = PATIENT_ID
        ds.save_as(path, enforce_file_format=True)
    http_port = free_port()
    config = write_node_config(tmp_path / "node.toml", node_config_data(
        tmp_path / "node", destinations={"pacs": {"ae_title": "STORESCP", "host": "127.0.0.1",
                                                  "port": pacs.port}},
        rules=[forward_rule("all", "pacs")],
        http={"enabled": True, "host": "127.0.0.1", "port": http_port}))
    node = node_process(config, "--log-level", "DEBUG", "--json-logs")
    result = storescu(node.port, *series.files)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(pacs.received()) == 3, timeout=60, what="the forwarded series")

    body = wait_until(lambda: (lambda b: b if 'kind="export",state="done"' in b else "")(
        get(http_port, "/metrics")), timeout=30, what="export jobs done in /metrics")
    assert 'tessera_node_instances_received_total{source="dicom"} 3.0' in body
    assert "# TYPE tessera_node_instances_refused_total counter" in body
    assert 'tessera_node_outbox_items{destination="pacs",state="sent"} 3.0' in body
    assert "# TYPE tessera_node_serving_generation gauge" in body
    assert "# TYPE tessera_node_job_seconds histogram" in body
    assert "# TYPE tessera_node_jobs_finished_total counter" in body
    assert json.loads(get(http_port, "/healthz"))["status"] == "ok"
    node.stop()

    log = node.log.read_text(encoding="utf-8", errors="replace")
    assert log.strip(), "the node logged nothing"
    for line in log.splitlines():
        if line.strip():
            json.loads(line)
    lowered = log.lower()
    for secret in (PATIENT_NAME, PATIENT_ID, *PATIENT_NAME.split("^"),
                   PATIENT_NAME.replace("^", " ")):
        assert secret.lower() not in lowered, f"patient data {secret!r} in the node log"
    assert series.series_uid in log or "stored" in log  # it did log about the study
