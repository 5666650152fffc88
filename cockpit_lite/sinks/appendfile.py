"""An append-only file that survives a full or failing disk without stopping training.

Both file sinks (JSON lines, TensorBoard event files) write through :class:`AppendFile`:

- records are whole units (a JSON line, a TFRecord); :meth:`AppendFile.append` queues one and
  :meth:`AppendFile.flush` hands the queue to the OS with plain ``write`` calls on an unbuffered file
  opened with ``O_APPEND`` (no ``fsync``: a process kill cannot lose what the kernel holds);
- a write that fails (``ENOSPC``, ``EIO``, ...) raises nothing: the first failure is warned about once,
  naming the path and the cause; what was not written waits in the queue and is retried at the next
  flush, so writing resumes when space returns;
- the queue is bounded by ``max_pending`` bytes: a record that does not fit while the disk fails is
  dropped and counted in :attr:`AppendFile.dropped` (and said once more at close);
- bytes already in the file are never rewritten or truncated. A write cut short by the disk leaves
  the record's tail at the head of the queue, and it is written first when space returns, so the file
  never holds a torn record followed by others;
- :meth:`AppendFile.close` releases the file descriptor whatever flushing does.
"""

from __future__ import annotations

import os
from pathlib import Path

from cockpit_lite.errors import warn

#: default bound on the bytes waiting for a failing disk (per file)
MAX_PENDING = 1 << 20


class AppendFile:
    """Queue whole records and append them to ``path``; never raises ``OSError`` after opening.

    Attributes:
        dropped: records dropped because the disk failed and the queue was full.
        dropped_bytes: their size in bytes.
        error: the last write error (None once a write succeeds again).
    """

    def __init__(self, path: str | os.PathLike, max_pending: int = MAX_PENDING, fsync: bool = False):
        self.path = Path(path)
        self.max_pending, self.fsync = int(max_pending), fsync
        self._f = open(self.path, "ab", buffering=0)  # raw: each flush is write(2) calls, nothing held back
        self._pending: list[bytes] = []
        self._size = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self.error: OSError | None = None
        self._warned = False

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet handed to the OS."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._f is None

    def append(self, data: bytes) -> None:
        """Queue one whole record. While the disk fails, one that would overflow ``max_pending`` is
        dropped (counted), unless the queue can be written now (the disk recovered: the first record after
        is kept); records are never split or reordered."""
        if self._f is None:
            return
        if self.error is not None and self._size + len(data) > self.max_pending and not self.flush():
            self.dropped += 1
            self.dropped_bytes += len(data)
            return
        self._pending.append(data)
        self._size += len(data)

    def flush(self) -> bool:
        """Write everything queued; True when nothing is left waiting. Never raises ``OSError``."""
        if self._f is None or not self._pending:
            return self._f is not None
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                n = self._f.write(view[done:])
                if not n:  # nothing written and no error: retry at the next flush
                    raise OSError(f"write() wrote nothing of {len(data) - done} bytes")
                done += n
            if self.fsync:
                os.fsync(self._f.fileno())
        except OSError as e:
            self._pending, self._size = [bytes(view[done:])], len(data) - done
            self._failed(e)
            return False
        finally:
            view.release()
        self._pending.clear()
        self._size = 0
        self.error = None
        return True

    def _failed(self, e: OSError) -> None:
        self.error = e
        if not self._warned:
            self._warned = True
            cause = f"{type(e).__name__}: {e.strerror or e}" if e.errno is not None else f"{type(e).__name__}: {e}"
            warn(
                f"cannot write {self.path} ({cause}); training goes on. Up to {self.max_pending} bytes wait "
                "and are written when the disk recovers; records beyond that are dropped and counted",
                stacklevel=5,
            )

    def close(self) -> None:
        """Flush what can be flushed, then release the file, even if flushing fails."""
        if self._f is None:
            return
        f = self._f
        try:
            self.flush()
        finally:
            self._f = None
            if self._pending:  # the disk still fails: what waits is lost
                self.dropped += len(self._pending)
                self.dropped_bytes += self._size
                self._pending.clear()
                self._size = 0
            try:
                f.close()
            finally:
                if self.dropped:
                    warn(
                        f"{self.path} lacks {self.dropped} record(s) ({self.dropped_bytes} bytes) that could "
                        f"not be written ({self.error or 'see the earlier warning'})",
                        stacklevel=5,
                    )
