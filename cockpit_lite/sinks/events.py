"""A synchronous TensorBoard event-file writer with a vectorised CRC-32C.

Why not ``SummaryWriter``: each record of an event file carries a masked CRC-32C, and TensorBoard's
writer computes it in pure Python (a loop over bytes, about 0.5 ms per 3 KB step event, measured) in a
background thread that holds the GIL while the training thread waits. That cost 3 ms per step of the
economy preset on the 784-512-256-10 MLP (about 15%). Here the CRC is computed with numpy lookups
(tens of microseconds) and each event is handed to the OS by the training thread as it is written
(one ``write`` call, no ``fsync``): no thread, no lock, and a killed process loses nothing written.

File format (TFRecord): for each serialised ``Event`` proto ``data``:
``uint64 len(data) | uint32 masked_crc(len bytes) | data | uint32 masked_crc(data)``, little-endian,
``masked_crc(x) = rotate_right(crc32c(x), 15) + 0xA282EAD8 (mod 2^32)``; the first event holds
``file_version = "brain.Event:2"``. TensorBoard checks both CRCs when it reads.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np

from cockpit_lite.sinks.appendfile import MAX_PENDING, AppendFile

POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
K = 256  # bytes per chunk of the vectorised CRC


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T0: the byte table; TT[k][b]: register after byte b followed by k zero bytes (from state 0);
    S[j][v]: register after K zero bytes from state v << 8j (the chunk shift, by bytes of the state)."""
    t0 = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t0 = np.where(t0 & 1, (t0 >> 1) ^ np.uint32(POLY), t0 >> 1).astype(np.uint32)

    def zero_byte(x: np.ndarray) -> np.ndarray:
        return t0[x & 0xFF] ^ (x >> 8)

    tt = np.empty((K, 256), dtype=np.uint32)
    tt[0] = t0
    for k in range(1, K):
        tt[k] = zero_byte(tt[k - 1])
    s = np.empty((4, 256), dtype=np.uint32)
    for j in range(4):
        x = np.arange(256, dtype=np.uint32) << np.uint32(8 * j)
        for _ in range(K):
            x = zero_byte(x)
        s[j] = x
    return t0, tt[::-1].copy(), s  # TT reversed: row i is for the byte at position i of a K-byte chunk


_T0, _TT, _S = _tables()
_T0_LIST = _T0.tolist()
_S_LIST = [row.tolist() for row in _S]
_ROWS = np.arange(K)


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (init 0xFFFFFFFF, final xor 0xFFFFFFFF; crc32c(b"123456789") = 0xE3069283).

    The register update is linear over GF(2), so the CRC of a K-byte chunk from state 0 is the XOR of
    per-position tables (one numpy gather), and chunks are chained with the K-zero-byte shift of the
    register. The initial value is folded into the first 4 bytes (reflected CRC).
    """
    n = len(data)
    if n < 64:
        crc = 0xFFFFFFFF
        for b in data:
            crc = _T0_LIST[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    pad = (-n) % K
    buf = np.zeros(pad + n, dtype=np.uint8)  # leading zeros leave a zero register unchanged
    buf[pad:] = np.frombuffer(data, dtype=np.uint8)
    buf[pad : pad + 4] ^= 0xFF  # init 0xFFFFFFFF == xor into the first 4 message bytes
    chunks = buf.reshape(-1, K)
    parts = np.bitwise_xor.reduce(_TT[_ROWS, chunks], axis=1).tolist()
    s0, s1, s2, s3 = _S_LIST
    state = 0
    for part in parts:
        state = s0[state & 0xFF] ^ s1[(state >> 8) & 0xFF] ^ s2[(state >> 16) & 0xFF] ^ s3[state >> 24] ^ part
    return state ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# --- hand-encoded protos for the per-step hot path (checked against protobuf in tests) ---------------------
# Event: wall_time = 1 (double), step = 2 (int64), summary = 5. Summary: value = 1 (repeated).
# Summary.Value: tag = 1, simple_value = 2 (float), histo = 5. HistogramProto: min = 1, max = 2, num = 3,
# sum = 4, sum_squares = 5 (doubles), bucket_limit = 6, bucket = 7 (packed doubles).
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_HISTO_HEAD = struct.Struct("<BdBdBdBdBd")


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(key: int, payload: bytes) -> bytes:
    return bytes((key,)) + varint(len(payload)) + payload


class SummaryEncoder:
    """Serialises ``Summary.Value`` entries of scalars and histograms directly (about 10x faster than
    building protobuf objects); the bytes equal protobuf's ``SerializeToString``."""

    def __init__(self) -> None:
        self._tags: dict[str, bytes] = {}

    def _tag(self, tag: str) -> bytes:
        head = self._tags.get(tag)
        if head is None:
            head = self._tags[tag] = _field(0x0A, tag.encode("utf-8"))
        return head

    def scalar(self, tag: str, value: float) -> bytes:
        """One ``Summary.value`` entry (field 1 of Summary) holding ``simple_value`` (float32)."""
        try:
            packed = _F32.pack(value)
        except OverflowError:  # beyond float32: protobuf stores +-inf
            packed = _F32.pack(math.copysign(math.inf, value))
        return _field(0x0A, self._tag(tag) + b"\x15" + packed)

    def histogram(self, tag: str, lo: float, hi: float, num: float, total: float, sum_squares: float,
                  limits: np.ndarray, counts: np.ndarray) -> bytes:  # fmt: skip
        """One ``Summary.value`` entry holding a HistogramProto."""
        histo = (
            _HISTO_HEAD.pack(0x09, lo, 0x11, hi, 0x19, num, 0x21, total, 0x29, sum_squares)
            + _field(0x32, np.ascontiguousarray(limits, dtype="<f8").tobytes())
            + _field(0x3A, np.ascontiguousarray(counts, dtype="<f8").tobytes())
        )
        return _field(0x0A, self._tag(tag) + _field(0x2A, histo))


def encode_event(step: int, wall_time: float, summary: bytes) -> bytes:
    """A serialised ``Event(wall_time, step, summary)`` from a serialised Summary (step >= 0)."""
    return b"\x09" + _F64.pack(wall_time) + b"\x10" + varint(step) + _field(0x2A, summary)


_COUNTER = itertools.count()


class EventFile:
    """Appends ``Event`` protos to ``logdir/events.out.tfevents.<time>.<host>.<pid>.<n>``.

    With ``flush_secs=0`` (the default) every event is handed to the OS as it is written (one ``write``
    call, no ``fsync``), so a killed process loses nothing written before; a positive ``flush_secs``
    holds events in memory up to that many seconds (or ``max_buffer`` bytes). Write errors (a full
    disk) never raise: see :class:`~cockpit_lite.sinks.appendfile.AppendFile`.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        flush_secs: float = 0.0,
        max_buffer: int = 1 << 20,
        max_pending: int = MAX_PENDING,
    ):
        from tensorboard.compat.proto.event_pb2 import Event

        self._Event = Event
        Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_COUNTER)}"
        self.path = Path(logdir) / name
        self.flush_secs, self.max_buffer = flush_secs, max_buffer
        self.file = AppendFile(self.path, max_pending=max_pending)
        self._last_flush = time.monotonic()
        self.write_event(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    @property
    def dropped(self) -> int:
        """Events dropped because the disk failed (see :class:`AppendFile`)."""
        return self.file.dropped

    def write_event(self, event) -> None:
        self.write_serialized(event.SerializeToString())

    def write_serialized(self, data: bytes) -> None:
        """Append one serialised Event (handed to the OS now unless ``flush_secs`` > 0)."""
        self.file.append(record(data))
        if (
            self.flush_secs <= 0
            or self.file.pending_bytes >= self.max_buffer
            or time.monotonic() - self._last_flush >= self.flush_secs
        ):
            self.flush()

    def add_summary(self, summary, step: int, wall_time: float | None = None) -> None:
        self.write_event(self._Event(wall_time=time.time() if wall_time is None else wall_time, step=int(step),
                                     summary=summary))  # fmt: skip

    def flush(self) -> None:
        self.file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.file.close()
