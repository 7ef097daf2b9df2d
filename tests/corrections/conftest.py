"""Fixtures of the correction tests: the node fixtures of tests/node, reused."""

from __future__ import annotations

from tests.node.conftest import start_node  # noqa: F401 - pytest fixture
