"""The spool on its own: order, durability across reopen, torn tails, the size bound, one owner."""

import pytest

from alignloop.feedback.spool import Record, Spool, SpoolLockedError


def records(n, start=0):
    return [Record("t", f"k{i % 3}", b'{"i":%d}' % i) for i in range(start, start + n)]


def test_append_read_advance_in_order_across_segments(tmp_path):
    spool = Spool(tmp_path, max_bytes=10**6, segment_bytes=200)  # tiny segments: many rotations
    assert spool.append(records(50)) == 50
    got, pos = spool.read(20)
    assert [r.value for r in got] == [r.value for r in records(20)]
    spool.advance(pos, len(got))
    assert spool.depth == 30
    got, pos = spool.read(1000)
    assert [r.value for r in got] == [r.value for r in records(30, 20)]
    spool.advance(pos, len(got))
    assert spool.depth == 0 and spool.size_bytes == 0
    assert len(list(tmp_path.glob("*.seg"))) == 1  # replayed segments are deleted


def test_reopen_resumes_at_the_durable_cursor(tmp_path):
    spool = Spool(tmp_path, max_bytes=10**6, segment_bytes=300)
    spool.append(records(40))
    got, pos = spool.read(15)
    spool.advance(pos, 15)
    spool.close()
    reopened = Spool(tmp_path, max_bytes=10**6, segment_bytes=300)
    assert reopened.depth == 25
    got, _ = reopened.read(100)
    assert [r.value for r in got] == [r.value for r in records(25, 15)]


def test_torn_tail_from_a_crash_is_cut_off(tmp_path):
    spool = Spool(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    spool.append(records(5))
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    with open(segment, "ab") as f:
        f.write(b"deadbeef\tt\tk\t{\"half")  # an append interrupted mid-line
    reopened = Spool(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    assert reopened.depth == 5
    reopened.append(records(1, 5))
    assert [r.value for r in reopened.read(10)[0]] == [r.value for r in records(6)]


def test_a_write_that_fails_part_way_leaves_no_torn_record(tmp_path, monkeypatch):
    """A full disk mid-append: the append raises, the segment is cut back to its last whole record, and the spool
    (and a reopened one) reads every earlier record and takes later appends (a torn line stopped replay there)."""
    import errno

    spool = Spool(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    spool.append(records(5))
    real_write = spool._active.write

    def disk_full(data):
        real_write(bytes(data[:7]))  # part of the batch reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool._active, "write", disk_full)
    with pytest.raises(OSError):
        spool.append(records(3, start=5))
    monkeypatch.undo()
    assert [r.value for r in spool.read(100)[0]] == [r.value for r in records(5)]
    assert spool.append(records(2, start=8)) == 2
    spool.close()
    reopened = Spool(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    assert [r.value for r in reopened.read(100)[0]] == [r.value for r in records(5) + records(2, start=8)]


def test_bound_refuses_what_does_not_fit(tmp_path):
    spool = Spool(tmp_path, max_bytes=300, segment_bytes=10**6)
    written = spool.append(records(100))
    assert 0 < written < 100 and spool.size_bytes <= 300
    assert spool.append(records(1)) == 0


def test_one_process_per_spool(tmp_path):
    owner = Spool(tmp_path, max_bytes=1000, segment_bytes=1000)
    with pytest.raises(SpoolLockedError, match="own spool_dir"):
        Spool(tmp_path, max_bytes=1000, segment_bytes=1000)
    owner.close()
    Spool(tmp_path, max_bytes=1000, segment_bytes=1000).close()  # free again once the owner closed


def _four_segments(path):
    """A spool holding records 0..39, ten per segment (segments 1-4), with records 0..14 acknowledged."""
    spool = Spool(path, max_bytes=10**6, segment_bytes=200)
    for start in range(0, 40, 10):
        spool.append(records(10, start))  # ~230 bytes: each batch fills a segment and rotates
    got, pos = spool.read(15)
    spool.advance(pos, len(got))
    return spool


def _values(spool):
    return [r.value for r in spool.read(1000)[0]]


def test_crash_before_the_cursor_is_durable_replays_from_the_last_durable_cursor(tmp_path, monkeypatch):
    spool = _four_segments(tmp_path)
    got, pos = spool.read(10)  # records 15..24: finishes segment 2, so this advance deletes it
    assert pos.segment > 2

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the cursor reached the disk")

    monkeypatch.setattr("alignloop.feedback.spool.write_durably", crash)
    with pytest.raises(OSError, match="simulated crash"):
        spool.advance(pos, len(got))
    spool.close()
    monkeypatch.undo()
    reopened = Spool(tmp_path, max_bytes=10**6, segment_bytes=200)  # used to raise FileNotFoundError
    assert reopened.depth == 25
    assert _values(reopened) == [r.value for r in records(25, 15)]  # the un-durable ack is resent, nothing lost


def test_crash_after_the_cursor_is_durable_replays_only_unacknowledged_records(tmp_path, monkeypatch):
    spool = _four_segments(tmp_path)
    got, pos = spool.read(10)  # acks records 15..24

    def crash(self, seq):
        raise OSError("simulated crash before the replayed segments were deleted")

    monkeypatch.setattr(Spool, "_drop_segment", crash)
    with pytest.raises(OSError, match="simulated crash"):
        spool.advance(pos, len(got))
    spool.close()
    monkeypatch.undo()
    reopened = Spool(tmp_path, max_bytes=10**6, segment_bytes=200)
    assert reopened.depth == 15
    assert _values(reopened) == [r.value for r in records(15, 25)]
    assert not (tmp_path / f"{2:012d}.seg").exists()  # the replayed segment is cleaned up on open


def test_a_cursor_naming_a_deleted_segment_resumes_at_the_next_segment(tmp_path):
    # The state the old delete-then-write order left behind: segment 2 (records 10..19, all acknowledged)
    # deleted, the cursor still inside it.
    spool = _four_segments(tmp_path)
    spool.close()
    (tmp_path / f"{2:012d}.seg").unlink()
    reopened = Spool(tmp_path, max_bytes=10**6, segment_bytes=200)
    assert reopened.depth == 20
    assert _values(reopened) == [r.value for r in records(20, 20)]


def test_a_cursor_naming_a_deleted_last_segment_loses_no_later_append(tmp_path):
    # Old order with everything acked: the active segment deleted, the crash before the new cursor was written.
    spool = Spool(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    spool.append(records(5))
    spool.close()
    (tmp_path / "cursor").write_text("1 46\n")  # inside segment 1, which is then deleted
    next(tmp_path.glob("*.seg")).unlink()
    reopened = Spool(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    assert reopened.depth == 0
    reopened.append(records(3, 100))
    assert _values(reopened) == [r.value for r in records(3, 100)]  # not skipped by the stale offset 46
    reopened.close()
    again = Spool(tmp_path, max_bytes=10**6, segment_bytes=10**6)
    assert again.depth == 3 and _values(again) == [r.value for r in records(3, 100)]
