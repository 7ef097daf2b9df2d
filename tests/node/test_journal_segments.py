"""Preallocated intake journal segments (issue 24): the journal makes a spare segment
of zeros at start and moves onto it, recycles a checkpointed segment as the next spare,
and a recycled file's old records are never read as the new segment's, neither while
it serves nor at the replay after a crash. Records of a journal written before
segments carried their number are still replayed (an upgrade after a crash)."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

from dicom_node.store.journal import SPARE_SUFFIX, IntakeJournal, frame, read_segment
from tests.node.conftest import wait_until

SEGMENT = 1 << 20


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:012d}.journal"


def write_and_apply(journal: IntakeJournal, records: list[bytes]) -> int:
    """Append, commit and mark applied; the segment number they went to."""
    tickets = [journal.append(b"{}", data) for data in records]
    journal.commit()
    for ticket in tickets:
        journal.applied(ticket, None)
    return tickets[0].segment


def test_the_journal_serves_from_a_spare_and_recycles_checkpointed_segments(
        tmp_path: Path) -> None:
    directory = tmp_path / "intake"
    journal = IntakeJournal(directory, segment_bytes=SEGMENT, checkpoint_s=3600)
    journal.start(lambda: None)
    try:
        # At start: a spare of zeros, straight onto it (the empty first one goes), and
        # the next spare.
        wait_until(lambda: segment_path(directory, 2).exists()
                   and list(directory.glob(f"*{SPARE_SUFFIX}")), timeout=30)
        assert segment_path(directory, 2).stat().st_size == SEGMENT
        assert not segment_path(directory, 1).exists()
        old = [bytes([i]) * 5000 for i in range(1, 21)]
        assert write_and_apply(journal, old) == 2
        assert segment_path(directory, 2).stat().st_size == SEGMENT, "written in place"
        assert journal.checkpoint() == 1
        spare = directory / f"{2:012d}{SPARE_SUFFIX}"
        assert spare.stat().st_size == SEGMENT and not segment_path(directory, 2).exists()
        assert write_and_apply(journal, [b"between"]) == 3
        assert segment_path(directory, 3).stat().st_size == SEGMENT  # the start's spare
        assert journal.checkpoint() == 1
        # As long as the first two old records: the third old one starts right after.
        new = [b"\xaa" * 5000, b"\xbb" * 5000]
        assert write_and_apply(journal, new) == 4  # segment 2's file, renamed
        recycled = segment_path(directory, 4)
        assert not spare.exists() and old[-1] in recycled.read_bytes()
        assert [data for _, data in read_segment(recycled)] == new
    finally:
        journal.close()
    assert not list(directory.glob("*.journal")) and not list(directory.glob("*.spare"))


CRASH = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from dicom_node.store.journal import IntakeJournal
    journal = IntakeJournal(Path(sys.argv[1]), segment_bytes=1 << 20, checkpoint_s=3600)
    journal.start(lambda: None)
    deadline = time.monotonic() + 60
    while not (Path(sys.argv[1]) / "000000000002.journal").exists():
        if time.monotonic() > deadline:
            sys.exit("no spare segment after 60 s")
        time.sleep(0.01)
    def put(records):
        tickets = [journal.append(b"{}", r) for r in records]
        journal.commit()
        for t in tickets:
            journal.applied(t, None)
    put([bytes([i]) * 5000 for i in range(1, 21)])
    journal.checkpoint()
    put([b"between"])
    journal.checkpoint()
    put([bytes([0xAA]) * 5000, bytes([0xBB]) * 5000])  # ends where an old record starts
    os._exit(0)  # no close, no checkpoint: as kill -9 leaves it
""")


def test_after_a_crash_only_the_acknowledged_records_of_a_recycled_segment_replay(
        tmp_path: Path) -> None:
    directory = tmp_path / "intake"
    done = subprocess.run([sys.executable, "-c", CRASH, str(directory)], timeout=120,
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    journal = IntakeJournal(directory, segment_bytes=SEGMENT)
    try:
        assert [p.name for p in journal.leftover] == [segment_path(directory, 4).name]
        assert bytes([20]) * 5000 in journal.leftover[0].read_bytes()  # old records left
        assert [data for p in journal.leftover for _, data in read_segment(p)] == \
            [b"\xaa" * 5000, b"\xbb" * 5000]
        journal.drop_leftover()
        # Numbers keep growing past the spare's (3, recycled after the crash's last
        # checkpoint): a new segment never takes a number its old records carry.
        assert write_and_apply(journal, [b"after"]) == 5
    finally:
        journal.close()


def legacy_record(intent: bytes, data: bytes) -> bytes:
    """A record as journals wrote them before segments carried their number."""
    return struct.pack("<4sIQI", b"TSJ1", len(intent), len(data),
                       zlib.crc32(data, zlib.crc32(intent))) + intent + data


def test_records_from_before_the_segment_number_still_replay(tmp_path: Path) -> None:
    path = segment_path(tmp_path, 7)
    path.write_bytes(legacy_record(b"{}", b"one") + legacy_record(b"{}", b"two"))
    assert [data for _, data in read_segment(path)] == [b"one", b"two"]
    # Not after a numbered record: a legacy record can only open a segment.
    path.write_bytes(frame(b"{}", b"new", 7) + b"{}" + b"new" + legacy_record(b"{}", b"old"))
    assert [data for _, data in read_segment(path)] == [b"new"]
    # Another segment's numbered record ends this one's.
    path.write_bytes(frame(b"{}", b"mine", 7) + b"{}" + b"mine"
                     + frame(b"{}", b"stale", 6) + b"{}" + b"stale")
    assert [data for _, data in read_segment(path)] == [b"mine"]


def test_without_room_below_the_watermark_segments_just_grow(tmp_path: Path) -> None:
    """Preallocation never takes the disk below the node's watermark: asked and told
    there is no room, the journal keeps no spare, its segment grows as records come,
    and checkpoints go on."""
    directory = tmp_path / "intake"
    asked: list[int] = []
    journal = IntakeJournal(directory, segment_bytes=SEGMENT, checkpoint_s=3600,
                            room_for=lambda n: bool(asked.append(n)))
    journal.start(lambda: None)
    try:
        wait_until(lambda: len(asked) >= 2, timeout=30)  # the start's two spares
        assert asked[0] == SEGMENT
        assert write_and_apply(journal, [b"x" * 5000]) == 1  # no move to a spare
        assert segment_path(directory, 1).stat().st_size < SEGMENT
        assert journal.checkpoint() == 1  # and the dropped segment is not kept either
        assert not list(directory.glob(f"*{SPARE_SUFFIX}"))
        assert not segment_path(directory, 1).exists()
    finally:
        journal.close()
