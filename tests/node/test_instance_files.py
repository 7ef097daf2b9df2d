"""Where instance files go: a path from the index or a peer never leaves the root, and
a UID that is not a UID never becomes a path component."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import InvalidDatasetError, StoreError
from dicom_node.store.files import InstanceFiles


@pytest.mark.parametrize("relative", ["../outside.dcm", "1.2/../../outside.dcm",
                                      "/etc/passwd", "1.2/3.4/../../../x"])
def test_a_relative_path_that_climbs_out_of_the_root_is_refused(
    tmp_path: Path, relative: str,
) -> None:
    files = InstanceFiles(tmp_path / "instances", tmp_path / "quarantine")
    with pytest.raises(StoreError, match="escapes the instance root"):
        files.absolute(relative)
    with pytest.raises(StoreError, match="escapes the instance root"):
        files.place(relative, b"bytes")
    assert not (tmp_path / "outside.dcm").exists()


def test_files_go_under_study_and_series_and_hostile_uids_are_refused(
    tmp_path: Path,
) -> None:
    files = InstanceFiles(tmp_path / "instances", tmp_path / "quarantine")
    rel = files.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert files.place(rel, b"abc") == (tmp_path / "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
                                        ).resolve()
    assert files.read(rel) == b"abc"
    for hostile in ("..", "1.2/../3", "1.2/3", "1." * 40 + "1", "01.2"):
        with pytest.raises(InvalidDatasetError):
            files.relative_path("1.2.3", hostile, "1.2.3.4.5")
