"""Fixtures of the deploy tests: fresh PostgreSQL databases on the node tests' cluster."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.node.conftest import Postgres, _as_postgres, postgres  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
_numbers = itertools.count(1)


@pytest.fixture
def pg_database(postgres: Postgres) -> Callable[[], str]:  # noqa: F811
    """Make an empty database on the shared cluster; returns its SQLAlchemy URL."""

    def _make() -> str:
        parts = urlsplit(postgres.url)
        name = f"deploy_{os.getpid()}_{next(_numbers)}"
        made = _as_postgres([str(postgres.bindir / "createdb"), "-h", "127.0.0.1", "-p",
                             str(parts.port), "-U", "tessera", name])
        if made.returncode != 0:
            pytest.fail(f"createdb {name} failed: {made.stderr}")
        return postgres.url.rsplit("/", 1)[0] + "/" + name

    return _make


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


PYTHON = sys.executable
