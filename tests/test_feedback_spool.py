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
