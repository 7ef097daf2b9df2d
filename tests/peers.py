"""Finding real third-party peers for integration tests.

Under ``CI=true`` a missing peer is a failure, never a skip: CI installs every peer,
so a missing one means the install step is broken.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicom_node.demo.orthanc import free_port

__all__ = ["IN_CI", "free_port", "missing", "peer_env", "require_binary", "require_file"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(reason: str) -> None:
    """Fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"required peer missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(path: str) -> str:
    """Return the absolute path of an installed peer binary (e.g. ``/usr/bin/storescu``)."""
    found = path if os.path.isabs(path) else shutil.which(path)
    if not found or not os.access(found, os.X_OK):
        missing(f"{path} is not installed")
    assert found is not None
    return found


def require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        missing(f"{p} is not installed")
    return p


def peer_env() -> dict[str, str]:
    """Environment for dcmtk tools and Orthanc: TCP_NODELAY avoids ~45 ms stalls per PDU."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


