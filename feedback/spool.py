"""A durable, bounded, ordered log of records on local disk: where events wait while Kafka is unreachable.

Layout of a spool directory (one per producer process; a lock file enforces it):

    000000000001.seg, 000000000002.seg, ...   append-only segments, one record per line
    cursor                                     "<segment> <byte offset>" of the first record not yet acked

A line is `crc32-hex TAB topic TAB key TAB value NEWLINE`. Values are compact JSON, which never holds a raw
tab or newline, and keys and topics use a restricted alphabet, so the format needs no escaping. Appends are
fsync'd before `append` returns. A crash can leave a torn last line; it fails its CRC (or lacks its newline)
and is cut off on open, which loses only a record whose append never returned.

Replay is at-least-once: the cursor moves (durably) only after Kafka acknowledged the records before it, so
a crash between send and cursor update sends them again, and consumers dedupe by event_id.
"""

import fcntl
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from alignloop.durable import fsync_dir, make_dirs_durably, write_durably

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    topic: str
    key: str
    value: bytes  # the event's JSON
    emitted_at: float | None = None  # time.monotonic() at emit; None for records recovered from disk


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


class SpoolLockedError(RuntimeError):
    pass


class Spool:
    def __init__(self, path: Path, max_bytes: int, segment_bytes: int):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        make_dirs_durably(self.path)  # its segments are fsync'd into it: its own entry must last too
        self._lock_file = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLockedError(
                f"spool {self.path} is in use by another process; give each producer process its own spool_dir"
            ) from None
        self._recover()

    # -- state --------------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Records written and not yet acknowledged by Kafka."""
        return self._depth

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._active.close()
        self._lock_file.close()

    # -- writing ------------------------------------------------------------------------------------------

    def append(self, records: list[Record]) -> int:
        """Append in order and fsync; returns how many fit under max_bytes (the rest are not written)."""
        lines = []
        size = self._bytes
        for record in records:
            line = _encode(record)
            if size + len(line) > self.max_bytes:
                break
            lines.append(line)
            size += len(line)
        if not lines:
            return 0
        start = os.fstat(self._active.fileno()).st_size  # O_APPEND writes land at the end, whatever tell() says
        try:
            data = memoryview(b"".join(lines))
            while data:  # unbuffered: a write may take part of it
                data = data[self._active.write(data):]
            os.fsync(self._active.fileno())
        except OSError:
            # A full disk can leave part of a record: cut back to the last whole one, or every replay and
            # restart after it would stop at the torn line (and the next append would land behind it)
            os.ftruncate(self._active.fileno(), start)
            raise
        self._depth += len(lines)
        self._bytes = size
        if self._active.tell() >= self.segment_bytes:
            self._open_segment(self._active_seq + 1)
        return len(lines)

    # -- replay -------------------------------------------------------------------------------------------

    def read(self, max_records: int) -> tuple[list[Record], Position]:
        """Up to max_records from the cursor on, in order, and the position just after the last one."""
        records: list[Record] = []
        pos = self._cursor
        while len(records) < max_records and pos.segment <= self._active_seq:
            path = self._segment_path(pos.segment)
            with open(path, "rb") as f:
                f.seek(pos.offset)
                for line in f:
                    records.append(_decode(line))
                    pos = Position(pos.segment, pos.offset + len(line))
                    if len(records) == max_records:
                        return records, pos
            if pos.segment == self._active_seq:
                break
            pos = Position(pos.segment + 1, 0)
        return records, pos

    def advance(self, pos: Position, count: int) -> None:
        """Mark everything before `pos` (`count` records) as delivered; deletes fully replayed segments."""
        first = self._cursor.segment
        self._cursor = pos
        self._depth -= count
        if self._depth == 0:
            # Everything replayed: start a fresh segment so the spool's disk use returns to zero.
            self._open_segment(self._active_seq + 1)
            self._cursor = Position(self._active_seq, 0)
        # The cursor is durable before any segment goes: a crash in between leaves only already-replayed
        # segments behind the cursor (recovery deletes them), never a cursor naming a deleted segment.
        self._write_cursor()
        for seq in range(first, self._cursor.segment):
            self._drop_segment(seq)
        self._bytes = self._measure()

    # -- internals ----------------------------------------------------------------------------------------

    def _recover(self) -> None:
        segments = sorted(int(p.stem) for p in self.path.glob("*.seg"))
        cursor_file = self.path / "cursor"
        if cursor_file.exists():
            seg, off = cursor_file.read_text().split()
            self._cursor = Position(int(seg), int(off))
        else:
            self._cursor = Position(segments[0] if segments else 1, 0)
        # Segments wholly before the cursor were replayed but not yet deleted when the process stopped.
        for seq in segments:
            if seq < self._cursor.segment:
                self._segment_path(seq).unlink()
        segments = [s for s in segments if s >= self._cursor.segment]
        if cursor_file.exists() and self._cursor.segment not in segments:
            # A spool written before the cursor went durable ahead of deletes can name a deleted segment;
            # everything in it was delivered. Resume at the next segment's start (at worst re-sending its
            # delivered head, which at-least-once allows), and persist that, so records appended to a
            # segment recreated under this number are never skipped by a stale offset.
            self._cursor = Position(segments[0] if segments else self._cursor.segment, 0)
            self._write_cursor()
        if segments:
            self._truncate_torn_tail(self._segment_path(segments[-1]))
        self._open_segment(segments[-1] if segments else self._cursor.segment)
        self._depth = sum(1 for _ in self._iter_pending())
        self._bytes = self._measure()
        if self._depth:
            log.warning("spool %s holds %d undelivered events from an earlier run; replaying", self.path, self._depth)

    def _iter_pending(self):
        pos = self._cursor
        for seq in range(pos.segment, self._active_seq + 1):
            with open(self._segment_path(seq), "rb") as f:
                f.seek(pos.offset if seq == pos.segment else 0)
                yield from f

    def _truncate_torn_tail(self, path: Path) -> None:
        good = 0
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n") or not _intact(line):
                    break
                good += len(line)
        if good != path.stat().st_size:
            log.warning("spool %s: cutting a torn record at byte %d (a crash interrupted its append)", path, good)
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def _write_cursor(self) -> None:
        write_durably(self.path / "cursor", f"{self._cursor.segment} {self._cursor.offset}\n".encode())

    def _open_segment(self, seq: int) -> None:
        if hasattr(self, "_active"):
            self._active.close()
        self._active_seq = seq
        self._active = open(self._segment_path(seq), "ab", buffering=0)  # what append wrote is on disk or cut
        fsync_dir(self.path)

    def _drop_segment(self, seq: int) -> None:
        self._segment_path(seq).unlink(missing_ok=True)

    def _segment_path(self, seq: int) -> Path:
        return self.path / f"{seq:012d}.seg"

    def _measure(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*.seg"))


def _encode(record: Record) -> bytes:
    body = b"\t".join((record.topic.encode(), record.key.encode(), record.value))
    return b"%08x\t%s\n" % (zlib.crc32(body), body)


def _split(line: bytes) -> tuple[bytes, bytes]:
    crc, _, body = line.rstrip(b"\n").partition(b"\t")
    return crc, body


def _intact(line: bytes) -> bool:
    crc, body = _split(line)
    try:
        return int(crc, 16) == zlib.crc32(body)
    except ValueError:
        return False


def _decode(line: bytes) -> Record:
    if not _intact(line):
        raise ValueError(f"spool record failed its checksum: {line[:80]!r}")
    topic, key, value = _split(line)[1].split(b"\t", 2)
    return Record(topic.decode(), key.decode(), value)
