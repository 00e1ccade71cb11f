"""The write-ahead journal of captured rows: what a capture writer records before it answers, replayed after a crash.

:class:`CaptureJournal` keeps segments ``<seq>.wal`` (rows not in a shard yet) and ``<seq>.written`` (rows in a
shard, kept while the caller still needs their marks) of records appended whole (:func:`kfloop.durable.append_whole`)
with a length and a CRC; reading stops at a segment's first torn or corrupt record. After a restart it replays
:class:`JournaledRows` (one add) and :class:`JournalMark` (a caller's mark on a row) in order. Used by
:class:`kfloop.captures.PayloadCapture`, whose locks guard it; the watch (:mod:`kfloop.serving.watch`) replays
what it recovers. Record format and segment life: docs/captures.md.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import orjson

from kfloop.durable import TornAppend, append_whole, fsync_folder

__all__ = ["CaptureJournal", "JournalEntry", "JournalMark", "JournaledRows", "Row"]

log = logging.getLogger(__name__)


# One buffered row: the feature names it has, its id, when it came, the version serving, its values.
Row = tuple[tuple[str, ...], str, str, str, np.ndarray]


@dataclass(frozen=True)
class JournaledRows:
    """One add as the journal replays it after a restart: row ids, rows (float64, as received), their
    features, the version serving then and when they were captured (epoch seconds)."""

    ids: tuple[str, ...]
    rows: np.ndarray = field(repr=False)
    feature_names: tuple[str, ...]
    version: str
    captured_at: float


@dataclass(frozen=True)
class JournalMark:
    """A caller's mark on a journaled row (:meth:`PayloadCapture.mark`), as the journal replays it after a restart."""

    row_id: str
    label: str


JournalEntry = JournaledRows | JournalMark




class CaptureJournal:
    """The write-ahead journal of one :class:`PayloadCapture`: segments ``<seq>.wal`` / ``<seq>.written``.

    A record is ``<u32 length><u32 crc32><kind><body>``: kind ``S`` the feature names of the rows after it
    (JSON), kind ``R`` one add (``<u32 header length><JSON ids, version, stamp, tag><float64 rows>``), kind
    ``M`` a mark (``<JSON row, label>``). Reading a segment stops at its first torn or corrupt record.
    Not thread-safe: the capture's locks guard it.
    """

    HEADER = struct.Struct("<II")
    WAL, WRITTEN = ".wal", ".written"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None  # the current segment
        self._path: Path | None = None
        self._sequence = 0  # the current segment's number
        self._size = 0
        self._names: tuple[str, ...] | None = None  # the schema last recorded in the current segment
        self._pending: list[Path] = []  # sealed segments whose rows are not in a shard yet
        self._unsynced: list[int] = []  # sealed segments' descriptors, fsynced and closed by sync_sealed
        self._counts: dict[int, int] = {}  # rows in each segment, by sequence number (what release keeps)
        self._next = 1 + max((int(p.stem) for p in self._segments()), default=0)

    def _segments(self) -> list[Path]:
        return sorted((p for p in self.folder.iterdir() if p.suffix in (self.WAL, self.WRITTEN) and p.stem.isdigit()),
                      key=lambda p: int(p.stem))

    def recover(self) -> tuple[list[Row], list[str], list[JournalEntry]]:
        """Rows of every ``.wal`` segment (they become pending), the tags of every segment, and every
        segment's adds and marks in order."""
        rows: list[Row] = []
        tags: list[str] = []
        entries: list[JournalEntry] = []
        for segment in self._segments():
            written = segment.suffix == self.WRITTEN
            count = 0
            for names, header, values in self._records(segment):
                if values is None:
                    entries.append(JournalMark(str(header["row"]), str(header["label"])))
                    continue
                if header.get("tag"):
                    tags.append(header["tag"])
                count += len(values)
                entries.append(JournaledRows(tuple(header["ids"]), values, names, header["version"],
                                             datetime.fromisoformat(header["at"]).timestamp()))
                if not written:
                    rows.extend((names, row_id, header["at"], header["version"], row) for row_id, row in zip(header["ids"], values))
            self._counts[int(segment.stem)] = count
            if not written:
                self._pending.append(segment)
        return rows, tags, entries

    def _records(self, segment: Path) -> Iterator[tuple[tuple[str, ...], dict, np.ndarray | None]]:
        """The segment's adds (names, header, rows) and marks (names, header, None), up to a torn record."""
        data = segment.read_bytes()
        offset, names = 0, None
        while offset + self.HEADER.size <= len(data):
            length, crc = self.HEADER.unpack_from(data, offset)
            body = data[offset + self.HEADER.size: offset + self.HEADER.size + length]
            if len(body) < length or zlib.crc32(body) != crc or not body:
                log.warning("capture journal %s: torn or corrupt record at byte %d; the rest of the segment is skipped", segment, offset)
                return
            offset += self.HEADER.size + length
            if body[:1] == b"S":
                names = tuple(orjson.loads(body[1:]))
            elif body[:1] == b"R" and names is not None:
                (size,) = struct.unpack_from("<I", body, 1)
                header = orjson.loads(body[5:5 + size])
                values = np.frombuffer(body[5 + size:], dtype=np.float64).reshape(len(header["ids"]), len(names))
                yield names, header, values
            elif body[:1] == b"M":
                yield names or (), orjson.loads(body[1:]), None
            else:
                log.warning("capture journal %s: unknown record at byte %d; the rest of the segment is skipped", segment, offset)
                return

    def append(self, names: tuple[str, ...], ids: Sequence[str], rows: np.ndarray, version: str, stamp: str,
               tag: str | None) -> None:
        """Append one add in one write; on failure the segment is cut back to where it was, and the error raised."""
        self._open()
        header = orjson.dumps({"ids": list(ids), "version": version, "at": stamp, "tag": tag})
        body = b"R" + struct.pack("<I", len(header)) + header + np.ascontiguousarray(rows, dtype=np.float64).tobytes()
        record = self.HEADER.pack(len(body), zlib.crc32(body)) + body
        if names is not self._names and names != self._names:
            schema = b"S" + orjson.dumps(list(names))
            record = self.HEADER.pack(len(schema), zlib.crc32(schema)) + schema + record
        self._write(record)
        self._names = names
        self._counts[self._sequence] = self._counts.get(self._sequence, 0) + len(ids)

    def mark(self, row_id: str, label: str) -> None:
        """Append a mark on a row, like an add (one write, cut back on failure)."""
        self._open()
        body = b"M" + orjson.dumps({"row": row_id, "label": label})
        self._write(self.HEADER.pack(len(body), zlib.crc32(body)) + body)

    def _open(self) -> None:
        """Start a new current segment if there is none."""
        if self._fd is None:
            self._sequence = self._next
            self._path = self.folder / f"{self._sequence:012d}{self.WAL}"
            self._next += 1
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._size, self._names = 0, None
            self._pending.append(self._path)

    def _write(self, record: bytes) -> None:
        assert self._fd is not None
        try:
            append_whole(self._fd, record, self._size)  # no torn record left behind for the next add
        except TornAppend:
            self._abandon()  # cannot cut it back: later adds go to a new segment
            raise
        self._size += len(record)

    def _abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._path = None, None

    def duplicate(self) -> int | None:
        """A descriptor of the current segment (for an fsync outside the capture's lock)."""
        return os.dup(self._fd) if self._fd is not None else None

    def seal(self) -> list[Path]:
        """End the current segment; returns every pending segment (their rows are the buffer's)."""
        if self._fd is not None:
            self._unsynced.append(self._fd)
            self._fd, self._path = None, None
        return list(self._pending)

    def sync_sealed(self) -> None:
        """fsync and close the sealed segments' descriptors (when their rows must wait in them)."""
        while self._unsynced:
            handle = self._unsynced.pop()
            try:
                os.fsync(handle)
            finally:
                os.close(handle)

    def mark_written(self, segments: list[Path]) -> None:
        """Their rows are in shards now: keep only their tags (until :meth:`release`)."""
        while self._unsynced:
            os.close(self._unsynced.pop())
        for segment in segments:
            try:
                os.replace(segment, segment.with_suffix(self.WRITTEN))
            except FileNotFoundError:
                pass
            except OSError:
                log.exception("capture journal %s: cannot mark as written; a restart before the next flush "
                              "writes its rows again", segment)
                continue
            self._pending.remove(segment)
        fsync_folder(self.folder)

    def releasable(self, keep_rows: int = 0) -> list[Path]:
        """The written segments the caller may delete now: all but the newest that the last ``keep_rows`` rows are in."""
        doomed: list[Path] = []
        newer = 0  # rows in the segments after this one
        for segment in reversed(self._segments()):
            sequence = int(segment.stem)
            if segment.suffix == self.WRITTEN and newer >= keep_rows:
                doomed.append(segment)
                self._counts.pop(sequence, None)
            else:
                newer += self._counts.get(sequence, 0)
        return doomed

    def close(self) -> None:
        self.sync_sealed()
        if self._fd is not None:
            os.fsync(self._fd)
        self._abandon()
