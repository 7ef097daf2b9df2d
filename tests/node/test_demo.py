"""``tessera demo`` (the README's main command) end to end, with a real Orthanc as PACS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.node.conftest import ORTHANC
from tests.peers import require_binary, venv_tool


def test_demo_segments_a_phantom_study_into_orthanc(tmp_path: Path) -> None:
    require_binary(ORTHANC)
    proc = subprocess.run(
        [venv_tool("tessera"), "demo", "--subjects", "1", "--json",
         "--work-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["pacs"] == "orthanc"
    (study,) = report["studies"]
    assert study["seg_received"] and study["acknowledged"] == study["slices"]
    assert study["mean_dice"] >= 0.9, study["dice"]
    # Orthanc kept what it stored under the work folder, the SEG among it.
    assert (tmp_path / "demo" / "orthanc" / "orthanc.log").exists()
