"""LimitReporter (pure logic): every refusal counted, one log line and one audit row per
kind and address per interval, the next one saying how many were left out."""

from __future__ import annotations

import logging

import pytest

from dicom_node.dicom.connections import LimitReporter
from dicom_node.store.instances import Peer


def test_reports_once_per_interval_then_says_how_many_were_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    audited: list[tuple[str, str, Peer]] = []
    reporter = LimitReporter(lambda k, r, p: audited.append((k, r, p)), 60,
                             clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="dicom_node.dicom.connections")
    for _ in range(5):
        reporter.report("connection-refused", "too many", "10.0.0.1")
    reporter.report("connection-refused", "too many", "10.0.0.2")
    reporter.report("pdu-oversized", "big\nFORGED", "10.0.0.1", "EV\x00IL")
    assert [(k, p.address) for k, _, p in audited] == [
        ("connection-refused", "10.0.0.1"), ("connection-refused", "10.0.0.2"),
        ("pdu-oversized", "10.0.0.1")]
    assert audited[2][2].ae_title == "EV\\x00IL"
    now[0] += 61
    reporter.report("connection-refused", "too many", "10.0.0.1")
    assert audited[-1][1] == "too many (4 more like this since the last report)"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert not [m for m in messages if "\n" in m or "\x00" in m]
