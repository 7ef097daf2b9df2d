"""Quality monitoring at the hub: the numpy model, hostile records, and the whole path
(real client over gRPC with TLS -> hub -> ``tessera hub quality --json`` in a real
process and the ``/status`` page over real HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from federation_grpc.hub.domain import MetricRecord
from federation_grpc.hub.quality import Case, QualityPolicy, assess, cases_from_records
from federation_grpc.hub.ridge import calibrate_threshold, fit_ridge

from .hubproc import REPO, write_config


def test_ridge_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * [1.0, 5.0, 0.1] + [0.0, 10.0, 2.0]
    y = 0.7 + 0.05 * x[:, 0] - 0.01 * x[:, 1] + 0.8 * x[:, 2] + rng.normal(0, 0.005, 200)
    fit = fit_ridge(x, y, alphas=(1e-4, 1e-2, 1.0, 100.0))
    assert fit.raw_coef == pytest.approx([0.05, -0.01, 0.8], abs=0.01)
    assert fit.predict(x[:5]) == pytest.approx(y[:5], abs=0.02)
    assert fit.r2 > 0.98 and fit.loo_r2 > 0.98
    # Ridge with a huge alpha shrinks toward the mean; LOO picks the small one here.
    assert fit.alpha < 100.0
    shrunk = fit_ridge(x, y, alphas=(1e6,))
    assert np.abs(shrunk.raw_coef).max() < 0.01


def test_ridge_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_ridge(np.zeros((2, 1)), np.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        fit_ridge(np.array([[1.0], [np.nan], [2.0]]), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(n, p\)"):
        fit_ridge(np.zeros((4, 1)), np.zeros(3))


def test_threshold_keeps_false_positives_to_the_target() -> None:
    truth = np.array([0.95] * 10 + [0.5] * 5)
    predicted = np.array([0.7, 0.75, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99,
                          0.6, 0.7, 0.74, 0.95, 0.5])
    t, rule = calibrate_threshold(predicted, truth, 0.8, 0.1)
    good = truth >= 0.8
    assert t == pytest.approx(0.75) and "lowered" in rule
    assert (predicted[good] < t).sum() == 1 and (predicted[~good] < t).sum() == 4
    # A slack budget does not raise it above low_dice; nothing to calibrate: low_dice.
    assert calibrate_threshold(predicted, truth, 0.8, 0.5)[0] == 0.8
    assert calibrate_threshold(predicted[~good], truth[~good], 0.8, 0.1)[0] == 0.8


def synthetic(n: int, seed: int, entropy: tuple[float, float] = (0.02, 0.3),
              kind: str = "correction", node: str = "a", generation: int = 0) -> list[Case]:
    """Cases whose Dice falls linearly with entropy (and volume tells nothing)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        e = float(rng.uniform(*entropy))
        values = {"segmentation_seq": float(i + 1), "mean_entropy": e,
                  "confidence.liver": float(np.clip(1 - 0.8 * e + rng.normal(0, 0.02), 0, 1)),
                  "volume_ml.liver": float(rng.uniform(1200, 1800)),
                  "components.liver": float(rng.integers(1, 3))}
        if kind == "correction":
            values["dice.liver"] = float(np.clip(1.0 - 1.2 * e + rng.normal(0, 0.02), 0, 1))
        out.append(Case(node, kind, generation, values, i))
    return out


def test_too_few_corrections_give_a_clear_message_and_no_flags() -> None:
    report = assess(synthetic(4, 1) + synthetic(5, 2, kind="segmentation"))
    assert report.model["status"] == "insufficient"
    assert "4 corrections" in report.model["message"] and "at least 10" in report.model["message"]
    assert report.flagged == [] and report.groups[0]["flagged"] is None
    assert report.groups[0]["segmentations"] == 5 and report.groups[0]["corrections"] == 4


def test_flags_follow_the_fitted_model_and_hostile_records_are_ignored() -> None:
    train = synthetic(60, 3)
    good_site = synthetic(20, 4, entropy=(0.02, 0.08), kind="segmentation", node="b")
    bad_site = synthetic(20, 5, entropy=(0.25, 0.4), kind="segmentation", node="c",
                         generation=2)
    hostile = [
        Case("x", "segmentation", 0, {"mean_entropy": 1e300}),
        Case("x", "correction", 0, {"mean_entropy": 0.1, "dice.liver": 5.0}),
        Case("x", "correction", 0, {"mean_entropy": 0.1, "dice.liver": float("nan")}),
        Case("x", "surprise", 0, {"mean_entropy": 0.1}),
        Case("x", "segmentation", 0, {"volume_ml.liver": -3.0}),
        Case("x", "segmentation", 0, {"segmentation_seq": float("inf"), "mean_entropy": 0.1}),
    ]
    report = assess(train + good_site + bad_site + hostile)
    m = report.model
    assert m["status"] == "fitted" and m["n"] == 60 and m["loo_r2"] > 0.8
    assert m["coefficients"]["mean_entropy"] < 0 and m["training_fp_rate"] <= 0.1
    rows = {(g["node"], g["generation"]): g for g in report.groups}
    assert rows[("c", 2)]["flag_rate"] == 1.0 and rows[("b", 0)]["flag_rate"] == 0.0
    assert {f["node"] for f in report.flagged} == {"c"}
    drift = {(d["node"], d["generation"]): d for d in report.drift}
    assert drift[("c", 2)]["drifting"] and not drift[("b", 0)]["drifting"]
    assert "mean_entropy" in drift[("c", 2)]["top_shifts"]
    assert report.records["ignored"] == 6 and ("x", 0) not in rows
    reasons = " | ".join(e["reason"] for e in report.ignored["examples"])
    for expected in ("> 1e+07", "outside [0, 1]", "not a finite", "unknown kind", "negative"):
        assert expected in reasons


def test_resent_records_count_once() -> None:
    train = synthetic(12, 6)
    assert assess(train + train[:5]).model["n"] == 12


# --- the whole path -------------------------------------------------------------------

def _get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
        return reply.status, reply.read().decode()


def _records(cases: list[Case]) -> list[MetricRecord]:
    return [MetricRecord(c.kind, c.generation, c.values) for c in cases]


def test_reported_metrics_reach_the_cli_and_the_status_page(
        start_hub, certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from federation_grpc.errors import InvalidRequest
    from federation_grpc.hub.prometheus import MetricsServer

    hub = start_hub()
    site_a, site_b = hub.enrolled_client(), hub.client()
    node_b, _ = site_b.enrol(hub.service.create_enrolment_token()[0], "Hospital B")
    train = synthetic(40, 7)
    site_a.report_metrics(_records(train))
    site_a.report_metrics(_records(synthetic(10, 8, entropy=(0.02, 0.08), kind="segmentation")))
    ood = synthetic(10, 9, entropy=(0.3, 0.45), kind="segmentation", generation=1)
    assert site_b.report_metrics(_records(ood)) == 10

    # Hostile reports: refused with a reason (the call fails) or stored and ignored.
    with pytest.raises(InvalidRequest, match="not finite"):
        site_b.report_metrics([MetricRecord("segmentation", 1, {"mean_entropy": float("inf")})])
    with pytest.raises(InvalidRequest, match="more than 256"):
        site_b.report_metrics([MetricRecord("segmentation", 1,
                                            {f"k{i}": 0.5 for i in range(300)})])
    assert site_b.report_metrics([
        MetricRecord("segmentation", 1, {"mean_entropy": 1e200}),
        MetricRecord("graffiti", 1, {"mean_entropy": 0.1}),
        MetricRecord("correction", 1, {"mean_entropy": 0.1, "dice.liver": -4.0}),
    ]) == 3
    site_a.close()
    site_b.close()

    config = write_config(tmp_path / "hub.toml", hub.service.config.data_dir, certs)
    run = subprocess.run(
        [sys.executable, "-m", "federation_grpc.hub.cli", "quality", "--json",
         "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["model"]["status"] == "fitted" and report["model"]["n"] == 40
    rows = {(g["node"], g["generation"]): g for g in report["groups"]}
    assert rows[(node_b, 1)]["flagged"] == 10 and rows[(node_b, 1)]["segmentations"] == 10
    assert sum(g["flagged"] or 0 for g in report["groups"]) <= 12  # site A: at most 2 of 10
    assert {f["node"] for f in report["flagged"]} >= {node_b}
    assert any(d["node"] == node_b and d["drifting"] for d in report["drift"])
    assert report["records"]["ignored"] == 3
    assert set(report["ignored"]["reasons"]) == {"mean_entropy", "unknown kind 'graffiti'",
                                                 "dice.liver"}

    text = subprocess.run(
        [sys.executable, "-m", "federation_grpc.hub.cli", "quality", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"})
    assert text.returncode == 0, text.stderr
    assert "quality model: n=40" in text.stdout and node_b in text.stdout

    server = MetricsServer(hub.service.store, "127.0.0.1", 0).start()
    try:
        status, body = _get(server.port, "/status.json")
        assert status == 200
        doc = json.loads(body)
        assert doc["current_generation"] == 0
        assert doc["quality"]["groups"] == report["groups"]
        status, page = _get(server.port, "/status")
        assert status == 200 and "Quality monitoring" in page and node_b in page
        assert "n=40" in page and "graffiti" in page
        assert "<script" not in page
    finally:
        server.stop()


def test_cli_explains_when_there_is_too_little_to_fit(start_hub, certs,
                                                      tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hub = start_hub()
    client = hub.enrolled_client()
    client.report_metrics(_records(synthetic(3, 10)))
    client.close()
    config = write_config(tmp_path / "hub.toml", hub.service.config.data_dir, certs)
    run = subprocess.run(
        [sys.executable, "-m", "federation_grpc.hub.cli", "quality", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"})
    assert run.returncode == 0, run.stderr
    assert "not fitted" in run.stdout and "needs at least 10" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "federation_grpc.hub.cli", "quality", "--config", str(config),
         "--low-dice", "1.5"], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and "low_dice" in bad.stderr


def test_cases_from_records_keep_node_and_generation() -> None:
    cases = cases_from_records([("n1", MetricRecord("segmentation", 3, {"mean_entropy": 0.1}))])
    assert cases[0].node_id == "n1" and cases[0].generation == 3
    assert QualityPolicy().low_dice == 0.8
