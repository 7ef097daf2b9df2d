"""Two hub processes on one PostgreSQL and one blob store: uploads to both at once
merge exactly once each into one strictly increasing chain of generations; both
replicas answer /metrics and /healthz with the same federation-wide numbers."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.numpy import save
from sqlalchemy import select

from federation_grpc.client import FederationClient
from federation_grpc.connection import RetryPolicy
from federation_grpc.hub.config import load_config
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.service import HubService
from federation_grpc.hub.store import UpdateRow, UpdateStatus
from federation_grpc.uploading import UpdateMetadata
from tests.deploy.conftest import PYTHON, REPO, subprocess_env
from tests.federation.conftest import ALL_GROUPS, MODEL_CONFIG, nudged, small_model

UPLOADS_PER_HUB = 6


class Hub:
    """``tessera hub serve --insecure-loopback --json-logs``; reads both port lines."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "federation_grpc.hub.cli", "serve", "--config", str(config),
             "--insecure-loopback", "--json-logs"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, env=subprocess_env())
        lines: list[str] = []
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            lines.append(stdout.readline().decode())
            lines.append(stdout.readline().decode())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(90)
        if len(lines) < 2 or "metrics on" not in lines[1]:
            self.stop()
            pytest.fail(f"hub did not start ({lines!r}); see {log}")
        self.port = int(lines[0].rsplit(":", 1)[1])
        self.metrics_port = int(lines[1].rsplit(":", 1)[1])

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def test_two_hubs_on_one_postgres_merge_each_update_once(tmp_path: Path, pg_database) -> None:  # type: ignore[no-untyped-def]
    url = pg_database()
    config = tmp_path / "hub.toml"
    config.write_text(f"""
[hub]
host = "127.0.0.1"
port = 0
data_dir = "{tmp_path / 'shared'}"
database_url = "{url}"
max_workers = 16

[metrics]
enabled = true
host = "127.0.0.1"
port = 0
""")
    setup = HubService(load_config(config))
    base = small_model()
    setup.init_model(save(base), MODEL_CONFIG)
    tokens = [setup.create_enrolment_token()[0] for _ in range(2 * UPLOADS_PER_HUB)]
    setup.close()

    hubs = [Hub(config, tmp_path / f"hub-{i}.log") for i in range(2)]
    clients: list[FederationClient] = []
    try:
        def upload(i: int) -> str:
            hub = hubs[i % 2]
            client = FederationClient(f"127.0.0.1:{hub.port}", insecure=True, timeout_s=60,
                                      retry=RetryPolicy(attempts=5, initial_backoff_s=0.1,
                                                        max_backoff_s=1.0))
            clients.append(client)
            client.enrol(tokens[i], f"site {i}")
            meta = UpdateMetadata(str(uuid.uuid4()), 0, 8, ALL_GROUPS, {"dice.liver": 0.9})
            status = client.upload(save(nudged(base, ALL_GROUPS, seed=100 + i)), meta)
            assert status.state in (UploadState.RECEIVED, UploadState.MERGED), status
            return meta.update_id

        with ThreadPoolExecutor(max_workers=2 * UPLOADS_PER_HUB) as pool:
            update_ids = list(pool.map(upload, range(2 * UPLOADS_PER_HUB)))

        check = HubService(load_config(config))
        try:
            def all_settled() -> bool:
                with check.store.session() as session:
                    states = session.scalars(select(UpdateRow.status)).all()
                return len(states) == len(update_ids) and all(
                    s in (UpdateStatus.MERGED, UpdateStatus.REJECTED) for s in states)

            deadline = time.monotonic() + 120
            while not all_settled():
                assert time.monotonic() < deadline, "updates not merged in time"
                time.sleep(0.2)
            generations = check.list_generations()
            rejections = check.list_rejections()
        finally:
            check.close()
        assert not rejections, rejections
        numbers = [g.number for g in generations]
        assert numbers == list(range(len(numbers))), numbers
        # One chain: every generation builds on the one before it.
        assert [g.parent for g in generations[1:]] == numbers[:-1]
        merged = [u for g in generations for u in g.update_ids]
        assert sorted(merged) == sorted(update_ids), "an update lost or merged twice"

        for hub in hubs:
            status, body = hub.get("/healthz")
            assert status == 200 and json.loads(body)["status"] == "ok"
            status, body = hub.get("/metrics")
            assert f"tessera_hub_current_generation {float(numbers[-1])}" in body
            assert f'tessera_hub_updates{{status="merged"}} {float(len(update_ids))}' in body
            assert "# TYPE tessera_hub_rejections_total counter" in body
        for i in range(len(hubs)):
            for line in (tmp_path / f"hub-{i}.log").read_text().splitlines():
                if line.strip():
                    json.loads(line)  # --json-logs: every line one JSON document
    finally:
        for client in clients:
            client.close()
        for hub in hubs:
            hub.stop()
