"""Fixtures of the viewer bridge tests: a node with its HTTP port, a segmented study.

One node per module (a segmented phantom study costs ~15 s on two cores); every port
is picked by the OS on loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from dicom_node.config import load_config
from dicom_node.node import Node
from dicom_node.store.models import Segmentation
from tests.corrections.helpers import TEST_MODEL, Study, segment_rule, tiny_model
from tests.node.conftest import node_config_data, wait_until, write_node_config
from tests.peers import missing, require_binary
from viewer_bridge.main import build_node

REPO = Path(__file__).resolve().parents[2]
OHIF_DIST = REPO / "deploy" / "ohif" / "vendor" / "dist"
ARTIFACTS = REPO / "test-artifacts" / "viewer"


@dataclass
class BridgeNode:
    node: Node
    token: str
    data_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.http_port}"

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicomweb"

    def client(self, token: str | None = None) -> DICOMwebClient:
        return DICOMwebClient(self.dicomweb,
                              headers={"Authorization": f"Bearer {token or self.token}"})

    def request(self, path: str, *, method: str = "GET", data: bytes | None = None,
                headers: dict[str, str] | None = None, auth: bool = True,
                ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; returns (status, headers, body) whatever the status."""
        hdrs = dict(headers or {})
        if auth:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


TOKEN = "test-token-0123456789abcdef"


def start_bridge_node(folder: Path, *, rules: list[dict[str, Any]] | None = None,
                      models: dict[str, str] | None = None,
                      learning: dict[str, Any] | None = None, **http: Any) -> BridgeNode:
    """A node with DICOMweb on; learning off unless ``learning`` gives its section."""
    from viewer_bridge.auth import hash_token

    settings = {"enabled": True, "host": "127.0.0.1", "port": 0,
                "tokens": [hash_token(TOKEN)], "max_stow_mb": 64}
    settings.update(http)
    data = node_config_data(folder / "node", rules=rules, http=settings,
                            learning=learning or {"enabled": False})
    if models:
        data["models"] = models
    config_path = write_node_config(folder / "node.toml", data)
    node = build_node(load_config(config_path, env={})).start()
    return BridgeNode(node, TOKEN, folder / "node")


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeNode]:
    """A node with DICOMweb, no rules."""
    b = start_bridge_node(tmp_path_factory.mktemp("bridge"), max_stow_mb=1)
    yield b
    b.node.stop()


@dataclass
class Segmented:
    bridge: BridgeNode
    study: Study
    ai: Segmentation


def ai_segmentation(node: Node, series_uid: str) -> Segmentation | None:
    with node.parts.db.session() as s:
        return s.execute(select(Segmentation).where(
            Segmentation.series_uid == series_uid)).scalars().first()


def make_segmented(folder: Path, **http: Any) -> Iterator[Segmented]:
    """A node that segmented a 32-slice phantom CT sent to it by STOW-RS."""
    b = start_bridge_node(folder, rules=[segment_rule()],
                          models={TEST_MODEL: str(tiny_model(folder))}, **http)
    try:
        study = Study("A", 3, seed=7400)
        result = b.client().store_instances(study.datasets)
        assert len(result.ReferencedSOPSequence) == len(study.datasets)
        ai = wait_until(lambda: ai_segmentation(b.node, study.series_uid), timeout=120,
                        interval=0.5, what="the AI segmentation")
        yield Segmented(b, study, ai)
    finally:
        b.node.stop()


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Segmented]:
    yield from make_segmented(tmp_path_factory.mktemp("segmented"))


def json_body(body: bytes) -> Any:
    return json.loads(body.decode("utf-8"))


# --------------------------------------------------------------------------- browser

def chromium_path() -> str:
    return require_binary("chromium")


def ensure_ohif() -> Path:
    """OHIF's prebuilt viewer with our app-config.js (fetched with npm once, cached)."""
    with one_at_a_time(OHIF_DIST.parent):  # parallel test workers share the cache
        result = subprocess.run(["bash", str(REPO / "deploy" / "ohif" / "fetch-ohif.sh")],
                                capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not (OHIF_DIST / "index.html").exists():
        missing(f"cannot fetch OHIF: {result.stderr[-2000:]}")
    return OHIF_DIST


def ensure_playwright() -> Path:
    js = Path(__file__).resolve().parent / "js"
    with one_at_a_time(js):
        _install_playwright(js)
    return js


def _install_playwright(js: Path) -> None:
    if not (js / "node_modules" / "playwright-core").exists():
        npm = require_binary("npm")
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=js,
                                capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"})
        if result.returncode != 0:
            missing(f"npm ci failed in {js}: {result.stderr[-2000:]}")


@contextlib.contextmanager
def one_at_a_time(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (``.lock`` inside it) between test processes."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

