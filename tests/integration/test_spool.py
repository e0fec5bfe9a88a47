"""The encrypted spool on real files: records in segments, deletion by hole punching,
rotation and removal of empty segments, durability across a SIGKILL, forks and threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import storage.spool as spool_module
from storage.errors import IntegrityError, SpoolError
from storage.spool import SEGMENT_PREFIX, Spool

KEY = os.urandom(32)
SIZES = (0, 1, 4063, 4064, 4096, 70_000, 3 << 20)


@pytest.fixture(params=["disk", "tmpfs"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A spool folder on the test's disk (O_DIRECT) or on tmpfs (through the page cache)."""
    if request.param == "disk":
        yield tmp_path / "spool"
        return
    if not Path("/dev/shm").is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        yield Path(folder) / "spool"


def segments(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(SEGMENT_PREFIX))


def test_round_trip_of_every_size(root: Path) -> None:
    spool = Spool(root, KEY)
    stored = {}
    for size in SIZES:
        data = os.urandom(size)
        stored[spool.put(memoryview(bytearray(data)))] = data
    spool.sync()
    assert sorted(stored) == spool.names()
    for locator, data in stored.items():
        assert spool.exists(locator) and spool.get(locator) == data
    assert len(segments(root)) == 1
    stats = spool.stats()
    assert stats.count == len(SIZES) and stats.total_bytes == sum(SIZES) + 16 * len(SIZES)
    assert stats.oldest_written_at is not None and stats.oldest_written_at <= time.time()
    spool.close()


def test_records_are_encrypted_and_bound_to_their_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", KEY)
    first = spool.put(b"DOE^JANE " * 100)
    second = spool.put(b"SMITH^JOHN " * 100)
    spool.sync()
    (segment,) = segments(tmp_path / "spool")
    content = segment.read_bytes()
    assert b"DOE^JANE" not in content and b"SMITH^JOHN" not in content

    with pytest.raises(IntegrityError, match="authentication"):
        Spool(tmp_path / "spool", os.urandom(32)).get(first)  # another node's key
    # The second record's header, pointed at from the first's locator: the place is bound.
    name, rest = second.split("@")
    offset = int(rest.split("+")[0])
    moved = bytearray(content)
    moved[:offset] = content[offset : 2 * offset]
    segment.write_bytes(bytes(moved))
    with pytest.raises(IntegrityError, match="authentication"):
        spool.get(first.split("+")[0] + "+" + second.split("+")[1])
    with pytest.raises(SpoolError, match="invalid spool locator"):
        spool.get("../etc/passwd@0+1")
    with pytest.raises(SpoolError, match="invalid spool locator"):
        spool.get(f"{name}@100+1")  # records start on a 4 KiB boundary


def test_a_record_cut_short_reads_as_missing(root: Path) -> None:
    """A segment truncated inside its last record (a damaged file system, a copy cut
    short): the read, direct or through the page cache, answers that the item is missing."""
    spool = Spool(root, KEY)
    data = os.urandom(70_000)
    kept = spool.put(data)
    cut = spool.put(os.urandom(70_000))
    spool.sync()
    (segment,) = segments(root)
    offset = int(cut.split("@")[1].split("+")[0])
    with open(segment, "r+b") as f:
        f.truncate(offset + 8192)
    with pytest.raises(IntegrityError, match="truncated"):
        spool.get(cut)
    with pytest.raises(IntegrityError, match="truncated"):
        spool.get_live(cut)  # its header is there: not a record that is simply gone
    os.truncate(segment, offset)
    with pytest.raises(IntegrityError, match="missing"):
        spool.get(cut)
    assert spool.get_live(cut) is None
    assert spool.get(kept) == data
    spool.close()


def test_get_live_answers_none_where_exists_says_no_record(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read for what a worker did with :meth:`Spool.exists` then :meth:`Spool.get`:
    the record, or ``None`` for a punched hole, a record marked dead, a removed segment;
    a record that is there but altered still raises."""
    spool = Spool(root, KEY)
    locators = [spool.put(os.urandom(n)) for n in (5000, 5000, 5000)]
    spool.sync()
    assert spool.get_live(locators[0]) == spool.get(locators[0])
    spool.delete(locators[0])
    assert spool.get_live(locators[0]) is None and not spool.exists(locators[0])
    monkeypatch.setattr(spool_module, "_fallocate", None)
    spool.delete(locators[1])  # marked dead, not punched
    assert spool.get_live(locators[1]) is None and not spool.exists(locators[1])
    gone = locators[2].replace(SEGMENT_PREFIX, SEGMENT_PREFIX + "9", 1)
    assert spool.get_live(gone) is None
    with pytest.raises(SpoolError, match="cannot read"):
        spool.get(gone)
    (segment,) = segments(root)
    offset = int(locators[2].split("@")[1].split("+")[0])
    with open(segment, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match="authentication"):
        spool.get_live(locators[2])
    spool.close()


def test_delete_frees_the_blocks_and_listing_skips_holes(root: Path) -> None:
    spool = Spool(root, KEY)
    locators = [spool.put(os.urandom(200_000)) for _ in range(5)]
    spool.sync()
    (segment,) = segments(root)
    before = segment.stat().st_blocks
    spool.delete(locators[1])
    spool.delete(locators[3])
    spool.delete(locators[3])  # twice: no error
    assert segment.stat().st_blocks < before - 2 * 200_000 // 512 + 16
    assert not spool.exists(locators[1]) and not spool.exists(locators[3])
    assert spool.names() == sorted([locators[0], locators[2], locators[4]])
    with pytest.raises(IntegrityError):
        spool.get(locators[1])
    assert spool.get(locators[4])  # the records after a hole are intact
    spool.close()


def test_delete_without_hole_punching_marks_the_record_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_fallocate", None)  # a file system without punch hole
    spool = Spool(tmp_path / "spool", KEY)
    locators = [spool.put(os.urandom(n)) for n in (10, 9000, 10)]
    spool.sync()
    spool.delete(locators[1])
    assert not spool.exists(locators[1])
    assert spool.names() == sorted([locators[0], locators[2]])
    assert spool.stats().count == 2
    spool.close()


def test_delete_many_frees_adjacent_records_with_one_hole_each_run(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(root, KEY)
    locators = [spool.put(os.urandom(100_000)) for _ in range(6)]
    spool.sync()
    (segment,) = segments(root)
    before = segment.stat().st_blocks
    punched: list[tuple[int, int]] = []
    real = spool_module._discard_range

    def counting(fd: int, offset: int, length: int, records: list[int]) -> None:
        punched.append((offset, length))
        real(fd, offset, length, records)

    monkeypatch.setattr(spool_module, "_discard_range", counting)
    # Records 0, 1, 2 and 4, 5 are two runs; 4 is named twice and a gone record once more.
    spool.delete(locators[2])
    punched.clear()
    spool.delete_many([locators[5], locators[0], locators[1], locators[2], locators[4],
                       locators[4]])
    assert len(punched) == 2  # [0, 1] (2 was gone already) and [4, 5]
    assert segment.stat().st_blocks < before - 5 * 100_000 // 512 + 16
    assert spool.names() == [locators[3]]
    assert spool.get(locators[3])  # the record between the runs is intact
    with pytest.raises(SpoolError, match="does not match"):
        bad = locators[3].rsplit("+", 1)[0] + "+5"
        spool.delete_many([bad])
    assert spool.exists(locators[3])
    spool.close()


def test_a_verified_delete_frees_the_records_without_reading_them(root: Path) -> None:
    spool = Spool(root, KEY)
    locators = [spool.put(os.urandom(300_000)) for _ in range(4)]
    spool.sync()
    (segment,) = segments(root)
    before = segment.stat().st_blocks
    for locator in locators[:3]:
        assert spool.get(locator)  # what a worker's batch does before its commit
    spool.delete_many(locators[:3], verified=True)
    spool.delete_many(locators[1:3], verified=True)  # again: nothing else is freed
    assert spool.names() == [locators[3]]
    assert spool.get(locators[3])
    assert segment.stat().st_blocks < before - 3 * 300_000 // 512 + 16
    spool.close()


def test_delete_many_without_hole_punching_marks_every_record_of_a_run_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_fallocate", None)
    spool = Spool(tmp_path / "spool", KEY)
    locators = [spool.put(os.urandom(n)) for n in (10, 9000, 10, 10)]
    spool.sync()
    spool.delete_many(locators[:3])  # one run of three adjacent records
    assert [spool.exists(loc) for loc in locators] == [False, False, False, True]
    assert spool.names() == [locators[3]]
    spool.close()


def test_segments_rotate_and_empty_ones_are_removed_once_unlocked(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, KEY, rotate_bytes=4 * 4096)
    locators = [spool.put(os.urandom(5000)) for _ in range(6)]  # two records per segment
    spool.sync()
    assert len(segments(root)) == 3
    assert len(spool._segments) == 1  # the retired ones were closed by the sync
    for locator in locators:
        spool.delete(locator)
    assert spool.remove_empty_segments(older_than_seconds=3600) == 0  # too recent
    old = time.time() - 7200
    for path in segments(root):
        os.utime(path, (old, old))
    # The current segment is still held by its writer; the two retired ones go.
    assert spool.remove_empty_segments(older_than_seconds=3600) == 2
    (current,) = segments(root)
    assert locators[-1].startswith(current.name + "@")
    assert spool.get(spool.put(b"still writable")) == b"still writable"
    spool.close()  # no segment is held any more
    for locator in spool.names():
        spool.delete(locator)
    left = segments(root)
    for path in left:
        os.utime(path, (old, old))
    assert spool.remove_empty_segments(older_than_seconds=3600) == len(left)
    assert segments(root) == []


def test_a_segment_with_a_live_record_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, KEY)
    kept = spool.put(b"queued for de-identification")
    spool.close()
    old = time.time() - 7200
    for path in segments(root):
        os.utime(path, (old, old))
    assert spool.remove_empty_segments(older_than_seconds=3600) == 0
    assert spool.get(kept) == b"queued for de-identification"


def test_names_older_than_reads_the_time_each_record_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool", KEY)
    with monkeypatch.context() as m:
        m.setattr(spool_module.time, "time", lambda: 1_000_000.0)
        old = spool.put(b"old")
    new = spool.put(b"new")
    spool.sync()
    assert spool.names_older_than(3600) == [old]
    assert spool.names() == sorted([old, new])
    assert spool.stats().oldest_written_at == 1_000_000.0
    spool.close()


def test_concurrent_writers_in_one_process(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", KEY)
    written: dict[str, bytes] = {}
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(40):
            data = os.urandom(int.from_bytes(os.urandom(2), "little") + 1)
            locator = spool.put(data)
            with lock:
                written[locator] = data
            if len(written) % 7 == 0:
                spool.sync()

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    spool.sync()
    assert len(written) == 240 and spool.names() == sorted(written)
    assert all(spool.get(locator) == data for locator, data in written.items())
    spool.close()


def test_a_forked_child_writes_its_own_segment(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, KEY)
    parent = spool.put(b"parent")
    spool.sync()
    pid = os.fork()
    if pid == 0:  # the child: a record of its own, in a segment of its own
        try:
            child = spool.put(b"child")
            spool.sync()
            ok = str(os.getpid()) in child and spool.get(parent) == b"parent"
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(segments(root)) == 2
    assert sorted(spool.get(n) for n in spool.names()) == [b"child", b"parent"]
    assert spool.put(b"parent again").split("@")[0] == parent.split("@")[0]
    spool.close()


_WRITER = """
import os, sys
from pathlib import Path
from storage.spool import Spool

spool = Spool(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))
n = 0
while True:
    locator = spool.put(n.to_bytes(4, "little") * 2000)
    spool.sync()
    print(locator, n, flush=True)  # reported only once durable
    n += 1
"""


def test_every_synced_record_survives_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), KEY.hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    reported = []
    for line in proc.stdout:
        reported.append(line.split())
        if len(reported) == 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    spool = Spool(root, KEY)
    for locator, n in reported:
        assert spool.get(locator) == int(n).to_bytes(4, "little") * 2000
    assert set(spool.names()) >= {locator for locator, _ in reported}
