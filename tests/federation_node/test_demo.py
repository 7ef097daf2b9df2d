"""``tessera demo --sites``: generations advance and every site's studies are scored."""

from __future__ import annotations

from pathlib import Path

from dicom_node.demo.federated import plot_report, run_federated_demo


def test_federated_demo_advances_generations_at_every_site(tmp_path: Path) -> None:
    report = run_federated_demo(sites=2, rounds=1, workdir=tmp_path, budget_s=3.0,
                                timeout_s=120)
    assert report.sites == ["A", "B"]
    by_round = {(r.site, r.round): r for r in report.results}
    assert set(by_round) == {("A", 0), ("B", 0), ("A", 1), ("B", 1)}
    # Round 1 is segmented by a hub generation newer than round 0's, at both sites.
    newest = max(g["generation"] for g in report.generations)
    assert newest >= 1 and sum(g["updates"] for g in report.generations) == 2
    for site in report.sites:
        assert by_round[(site, 1)].generation == newest
        assert by_round[(site, 1)].generation > by_round[(site, 0)].generation
        assert all(0.0 <= v <= 1.0 for v in by_round[(site, 1)].dice.values())
        assert by_round[(site, 1)].mean is not None
        # Round 0 is the starter as shipped; round 1 the site's own fine-tune of the
        # newest generation (the site has one trained correction and no held-out case).
        assert (by_round[(site, 0)].served, by_round[(site, 1)].served) == ("hub",
                                                                          "fine-tuned")
    assert report.workdir == tmp_path
    png = plot_report(report, tmp_path / "demo.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_work_dir_holding_an_earlier_demo_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_node.cli import app

    earlier = tmp_path / "hub" / "hub.db"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier demo's hub")
    result = CliRunner().invoke(app, ["demo", "--sites", "2", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "holds an earlier federated demo" in result.output
    assert "Traceback" not in result.output
    assert earlier.read_bytes() == b"an earlier demo's hub"
