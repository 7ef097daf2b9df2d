"""A hub as a real process (`tessera hub serve` with mutual TLS) and its admin CLI, for
the tests that run nodes as processes too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from federation_grpc.hub.config import load_config
from federation_grpc.hub.generations import UNPUBLISHED as UNPUBLISHED
from federation_grpc.hub.service import HubService
from tests.federation.hubproc import REPO, write_config

from .conftest import model_json


def hub_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "federation_grpc.hub.cli", *args],
                            capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def make_site_certs(folder: Path, nodes: int) -> dict[str, Any]:
    hub_cli("certs", str(folder), *[a for i in range(nodes) for a in ("--node", f"site{i}")])
    made: dict[str, Any] = {"ca": folder / "ca.pem"}
    for name in ("hub", *(f"site{i}" for i in range(nodes))):
        made[name] = (folder / f"{name}.pem", folder / f"{name}.key")
    assert all(p.exists() for v in made.values() for p in (v if isinstance(v, tuple) else (v,)))
    return made


class CertPaths(dict):  # type: ignore[type-arg]
    """The shape hubproc.write_config expects: certs["ca"].cert, certs["hub"].key."""

    class Pair:
        def __init__(self, cert: Path, key: Path | None = None) -> None:
            self.cert, self.key = cert, key


def hub_with_model(tmp_path: Path, certs: dict[str, Any], model_file: Path,
                   extra_toml: str = "") -> tuple[Path, HubService]:
    """The hub's TOML (plus ``extra_toml``) with ``model_file`` as generation 0, and a
    service on its database for the test to read."""
    shaped = CertPaths(ca=CertPaths.Pair(certs["ca"]), hub=CertPaths.Pair(*certs["hub"]))
    config = write_config(tmp_path / "hub.toml", tmp_path / "hubdata", shaped)
    if extra_toml:
        config.write_text(config.read_text() + "\n" + extra_toml)
    (tmp_path / "model.json").write_text(model_json(model_file))
    hub_cli("init-model", "--weights", str(model_file), "--config",
            str(tmp_path / "model.json"), "--hub-config", str(config))
    return config, HubService(load_config(config))
