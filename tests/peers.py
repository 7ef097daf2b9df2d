"""Finding real third-party peers for integration tests.

Under ``CI=true`` a missing peer is a failure, never a skip: CI installs every peer,
so a missing one means the install step is broken.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import NoReturn

import pytest

from dicom_node.demo.orthanc import free_port

__all__ = [
    "IN_CI", "SYSTEM_PATH", "free_port", "missing", "peer_env", "require_binary", "require_file",
    "venv_tool",
]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"required peer missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


# Where Debian installs the peers. A bare name is looked up here and never on the caller's
# PATH: a virtualenv on PATH shadows dcmtk's storescu/echoscu/storescp with pynetdicom's
# scripts of the same names, and a missing PATH entry would hide an installed peer.
SYSTEM_PATH = os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin",
                               "/usr/sbin", "/sbin"])


def require_binary(path: str) -> str:
    """Return the absolute path of an installed system peer (``dciodvfy`` or ``/usr/bin/storescu``).

    Tools installed into the virtualenv (dcmqi, ``tessera``) are found with :func:`venv_tool`.
    """
    found = path if os.path.isabs(path) else shutil.which(path, path=SYSTEM_PATH)
    if not found or not os.access(found, os.X_OK):
        missing(f"{path} is not installed")
    return found


def scripts_dir() -> Path:
    """The console-scripts directory of the interpreter that runs the tests (``.venv/bin``)."""
    return Path(sysconfig.get_path("scripts"))


def venv_tool(name: str) -> str:
    """A console script installed with the running interpreter (``tessera``, dcmqi's tools).

    Looked up next to ``sys.executable``'s installation, never on ``PATH``: ``make test``
    runs ``.venv/bin/python -m pytest`` without the virtualenv on ``PATH``.
    """
    for folder in (scripts_dir(), Path(sys.executable).parent):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    missing(f"{name} is not installed in {scripts_dir()} (pip install -e '.[test]')")


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


