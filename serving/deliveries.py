"""Which event deliveries a service has already processed: a bounded memory that survives restarts.

A *delivery key* names one event as sent: its CloudEvent id and a digest of
its body (:func:`delivery_key`). A sender that redelivers an event (a broker
retry, a restart of the sender) sends the same id and body, and the event is
taken once; two different requests that happen to carry the same id (a client
that reuses a request id) have different bodies, and both count.

:class:`DeliveryMemory` keeps the last ``limit`` keys in memory and appends
new keys to a file (``<folder>/deliveries.log``, one key a line) when
:meth:`~DeliveryMemory.flush` is called (the watch does so five times a
second, off its request path, and before it deletes the journal of rows
already in a capture shard), so a restarted service remembers what it took;
the file is rewritten whole (:func:`kfloop.durable.atomic_write`) from the
keys in memory when it has grown to twice the limit, so it stays bounded too.
A flush that fails (a full disk) leaves no partial line behind and keeps its
keys for the next one; :attr:`~DeliveryMemory.unwritten` says how many wait.
A key taken by mistake -- its event could not be kept after all -- is
:meth:`~DeliveryMemory.forget`-ten, so the sender's retry is processed.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from pathlib import Path

from kfloop.durable import append_whole, atomic_write

__all__ = ["DeliveryMemory", "delivery_key"]

LOG_NAME = "deliveries.log"


def _event_id(key: str) -> str:
    return key.rsplit(" ", 1)[0]


def delivery_key(event_id: str, body: bytes) -> str:
    """``<id> <sha256 of the body, 32 hex digits>``: equal for a redelivery, different for another request."""
    return f"{event_id} {hashlib.sha256(body).hexdigest()[:32]}"


class DeliveryMemory:
    """The last ``limit`` delivery keys, in memory and in ``folder``; safe to share between threads."""

    def __init__(self, folder: Path, *, limit: int = 100_000) -> None:
        self.path = Path(folder) / LOG_NAME
        self.limit = limit
        self._keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._ids: collections.Counter[str] = collections.Counter()  # event id -> keys remembered with it
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            lines = self.path.read_text(errors="replace").splitlines()
            for line in lines[-limit:]:
                key = line.strip()
                if key and key not in self._keys:
                    self._keys[key] = None
                    self._ids[_event_id(key)] += 1
        self._appended = len(self._keys)
        self._unwritten: list[str] = []
        self._rewrite = False  # a forgotten key is in the file: the next flush rewrites it
        self._log = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._keys

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    @property
    def unwritten(self) -> int:
        """Keys remembered but not in the file yet."""
        return len(self._unwritten)

    def remember(self, key: str) -> bool:
        """Record ``key``; False if it was already known (then nothing changes)."""
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = None
            self._ids[_event_id(key)] += 1
            if len(self._keys) > self.limit:
                evicted, _ = self._keys.popitem(last=False)
                self._forget_id(_event_id(evicted))
            self._unwritten.append(key)
            return True

    def forget(self, key: str) -> None:
        """Take back a key just remembered (its event was not kept after all), so that a redelivery counts."""
        with self._lock:
            if self._keys.pop(key, False) is False:  # not known (the value of a known key is None)
                return
            self._forget_id(_event_id(key))
            if self._unwritten and self._unwritten[-1] == key:
                self._unwritten.pop()
            elif key in self._unwritten:
                self._unwritten.remove(key)
            else:
                self._rewrite = True

    def flush(self) -> None:
        """Append the keys remembered since the last flush to the file (compacting it when it is due).

        On failure (an ``OSError``: a full disk) the file is cut back to where it was, the keys wait
        for the next flush, and the error is raised.
        """
        with self._lock:
            if self._rewrite:
                self._compact()
                return
            if not self._unwritten:
                return
            data = "".join(f"{key}\n" for key in self._unwritten).encode()
            size = os.fstat(self._log).st_size
            append_whole(self._log, data, size)  # a torn last line would read as a key nobody sends
            self._appended += len(self._unwritten)
            self._unwritten = []
            if self._appended >= 2 * self.limit:
                self._compact()

    def sync(self) -> None:
        """Make the flushed keys durable (fsync)."""
        with self._lock:
            handle = os.dup(self._log)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)

    def deliveries_of(self, event_id: str) -> int:
        """How many distinct deliveries (bodies) with this event id are remembered."""
        with self._lock:
            return self._ids[event_id]

    def _forget_id(self, event_id: str) -> None:
        self._ids[event_id] -= 1
        if self._ids[event_id] <= 0:
            del self._ids[event_id]

    def _compact(self) -> None:
        """Rewrite the file from the keys in memory (raises, and changes nothing, when that fails)."""
        atomic_write(self.path, "".join(f"{key}\n" for key in self._keys))
        os.close(self._log)
        self._log = self._open()
        self._appended = len(self._keys)
        self._unwritten = []
        self._rewrite = False

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._lock:
                os.close(self._log)
