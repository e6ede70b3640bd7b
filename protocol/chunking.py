"""Splitting payloads under the broker's message-size cap, and putting them back together.

Rule: a payload of at most ``max_payload`` bytes travels **unwrapped** (one MQTT message = one protocol
message). A larger one is split into **frames**, each a small msgpack map

    {"v": 1, "type": "chunk", "id": msg_id, "index": i, "count": n, "size": total bytes,
     "total_sha256": sha256(payload), "data": bytes}

of at most ``max_payload`` bytes. A receiver tells the two apart by ``type`` (messages never use
``"chunk"``). ``msg_id`` defaults to a digest of the payload, so a resent message has the same id and
its frames merge with the ones already received.

Frames of a non-retained message go to the message's own topic, in order. Frames of a retained message
go to ``<topic>/chunk/<i>`` (one retained message per frame; see :func:`publications`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.messages import (
    CHUNK_FRAME_TYPE,
    DEFAULT_MAX_MESSAGE,
    MIN_PAYLOAD,
    PROTOCOL_VERSION,
    Message,
    encode,
)
from fedmask.protocol.topics import chunk_topic, validate_id

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 128 * 1024  # managed IoT brokers cap one message at 128-256 KiB
MAX_CHUNKS = 65_535
MSG_ID_LENGTH = 16  # hex characters of sha256(payload) used as the default message id
_BIN32_EXTRA = 3  # a bin32 header is 5 bytes, an empty bin8 header 2


def message_id(payload: bytes) -> str:
    """The default id of a payload: the first 64 bits of its SHA-256, in hex (deterministic)."""
    return _id_of(hashlib.sha256(payload).digest())


def _id_of(digest: bytes) -> str:
    return digest.hex()[:MSG_ID_LENGTH]


def _frame(msg_id: str, index: int, count: int, size: int, digest: bytes, data: bytes | memoryview) -> bytes:
    return msgpack.packb(
        {
            "count": count,
            "data": data,
            "id": msg_id,
            "index": index,
            "size": size,
            "total_sha256": digest,
            "type": CHUNK_FRAME_TYPE,
            "v": PROTOCOL_VERSION,
        },
        use_bin_type=True,
    )


def frame_capacity(max_payload: int, msg_id: str, size: int) -> int:
    """Payload bytes one frame can carry so that the whole frame stays within ``max_payload``."""
    if max_payload < MIN_PAYLOAD:
        raise ValueError(f"max_payload must be at least {MIN_PAYLOAD} bytes, got {max_payload}")
    # Header measured with the widest index/count and an empty bin, plus the widest bin header.
    overhead = len(_frame(msg_id, MAX_CHUNKS, MAX_CHUNKS, size, bytes(32), b"")) + _BIN32_EXTRA
    return max_payload - overhead


def split(payload: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD, msg_id: str | None = None) -> list[bytes]:
    """The MQTT payloads that carry ``payload``: itself if it fits, else frames of <= ``max_payload``."""
    if len(payload) <= max_payload:
        if max_payload < MIN_PAYLOAD:
            raise ValueError(f"max_payload must be at least {MIN_PAYLOAD} bytes, got {max_payload}")
        return [bytes(payload)]
    digest = hashlib.sha256(payload).digest()
    msg_id = validate_id(msg_id, "msg_id") if msg_id is not None else _id_of(digest)
    room = frame_capacity(max_payload, msg_id, len(payload))
    count = math.ceil(len(payload) / room)
    if count > MAX_CHUNKS:
        raise ProtocolError(
            Rejection.OVERSIZE,
            f"{len(payload)} bytes need {count} frames of {room} bytes; at most {MAX_CHUNKS} allowed",
        )
    view = memoryview(payload)
    return [
        _frame(msg_id, i, count, len(payload), digest, view[i * room : (i + 1) * room]) for i in range(count)
    ]


def wire_size(message: Message | bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """Exact MQTT payload bytes ``message`` puts on the wire (sum of its frames; topics not counted)."""
    payload = encode(message) if isinstance(message, Message) else message
    return sum(len(part) for part in split(payload, max_payload))


@dataclass(frozen=True)
class Publication:
    """One MQTT publish of a planned message: where, what, retained or not."""

    topic: str
    payload: bytes
    retain: bool


def publications(
    topic: str,
    payload: bytes,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    retain: bool = False,
    previous_frames: int = 0,
) -> list[Publication]:
    """The publishes that put ``payload`` on ``topic``, in the order to send them.

    Non-retained: the frames (or the payload) on ``topic`` itself. Retained: a payload that fits goes to
    ``topic``; a larger one goes frame by frame to ``<topic>/chunk/<i>`` and ``topic`` is cleared. Either
    way, retained frames a previous publication left behind (``previous_frames`` of them) are cleared
    with empty retained messages, so a late subscriber never sees a stale mix.
    """
    parts = split(payload, max_payload)
    if not retain:
        return [Publication(topic, part, False) for part in parts]
    clear = b""  # an empty retained message deletes the retained message of its topic
    if len(parts) == 1:
        plan = [Publication(topic, parts[0], True)]
        stale = range(previous_frames)
    else:
        plan = [Publication(chunk_topic(topic, i), part, True) for i, part in enumerate(parts)]
        plan.append(Publication(topic, clear, True))
        stale = range(len(parts), previous_frames)
    plan.extend(Publication(chunk_topic(topic, i), clear, True) for i in stale)
    return plan


# --- reassembly ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One parsed chunk frame."""

    msg_id: str
    index: int
    count: int
    size: int
    total_sha256: bytes
    data: bytes


def _field(raw: dict, name: str, kind: type) -> object:
    if name not in raw:
        raise ProtocolError(Rejection.MISSING_FIELD, f"chunk frame lacks {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(
            Rejection.WRONG_FIELD_TYPE,
            f"chunk frame field {name!r} must be {kind.__name__}, got {type(value).__name__}",
        )
    return value


def parse_frame(payload: bytes) -> Frame | None:
    """The frame in ``payload``, or None if ``payload`` is an unwrapped message (not a frame)."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(Rejection.MALFORMED_MSGPACK, f"cannot unpack payload ({exc})") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(Rejection.NOT_A_MAP, f"payload is a msgpack {type(raw).__name__}, not a map")
    if raw.get("type") != CHUNK_FRAME_TYPE:
        return None
    version = _field(raw, "v", int)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(Rejection.UNSUPPORTED_VERSION, f"chunk frame version {version}")
    frame = Frame(
        msg_id=validate_id(_field(raw, "id", str), "chunk frame id"),
        index=_field(raw, "index", int),
        count=_field(raw, "count", int),
        size=_field(raw, "size", int),
        total_sha256=_field(raw, "total_sha256", bytes),
        data=_field(raw, "data", bytes),
    )
    if not 1 <= frame.count <= MAX_CHUNKS or not 0 <= frame.index < frame.count:
        raise ProtocolError(
            Rejection.CHUNK_OUT_OF_RANGE,
            f"frame {frame.index} of {frame.count} (count must be 1-{MAX_CHUNKS}, index below count)",
        )
    if len(frame.total_sha256) != 32 or frame.size < frame.count or not frame.data:
        raise ProtocolError(
            Rejection.CHUNK_MISMATCH,
            f"frame {frame.index} of message {frame.msg_id}: needs a 32-byte total_sha256, non-empty data "
            f"and size >= count",
        )
    return frame


@dataclass
class _Pending:
    count: int
    size: int
    total_sha256: bytes
    last_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.parts]


ExpiredCallback = Callable[[str, str, ProtocolError], None]


class Reassembler:
    """Collects frames per ``(sender, msg_id)`` and hands back whole payloads.

    ``accept`` returns the complete payload (an unwrapped one at once, a chunked one with its last
    frame), ``None`` while frames are missing (or for an empty payload, i.e. a cleared retained
    message), and raises ``ProtocolError`` for a frame it refuses. Memory is bounded: the declared
    size of every pending message counts against ``max_pending_bytes`` from its first frame, and
    against its sender's own ``max_pending_bytes_per_sender`` (default: one largest message): a
    sender over its own budget supersedes its oldest pending messages, so one sender can never take
    the budget every other sender shares; a message idle for ``timeout_s`` expires (``missing_chunk``,
    reported to ``on_expired`` and the log). Not thread-safe: call it from one thread (the transport's
    handler thread).
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        max_pending: int = 64,
        max_pending_bytes: int = 256 * 1024 * 1024,
        max_pending_per_sender: int = 4,
        max_pending_bytes_per_sender: int | None = None,
        timeout_s: float = 120.0,
        remember_completed: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        on_expired: ExpiredCallback | None = None,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_per_sender = max_pending_per_sender
        self.max_pending_bytes_per_sender = (
            max_message_size if max_pending_bytes_per_sender is None else max_pending_bytes_per_sender
        )
        self.timeout_s = timeout_s
        self.remember_completed = remember_completed
        self.clock = clock
        self.on_expired = on_expired
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()
        self._completed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._reserved = 0

    @property
    def pending_messages(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes reserved for incomplete messages (their declared sizes)."""
        return self._reserved

    def accept(self, sender: str, payload: bytes, now: float | None = None) -> bytes | None:
        """Take one MQTT payload from ``sender`` (e.g. its topic); see the class docstring."""
        if not payload:
            return None
        frame = parse_frame(payload)
        if frame is None:
            return bytes(payload)
        now = self.clock() if now is None else now
        key = (sender, frame.msg_id)
        if key in self._completed:
            raise ProtocolError(
                Rejection.DUPLICATE_CHUNK,
                f"frame {frame.index} of message {frame.msg_id} from {sender}, already complete",
            )
        self.expire(now)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._start(key, frame, now)
        if (frame.count, frame.size, frame.total_sha256) != (
            pending.count,
            pending.size,
            pending.total_sha256,
        ):
            raise ProtocolError(
                Rejection.CHUNK_MISMATCH,
                f"frame {frame.index} of message {frame.msg_id} from {sender} disagrees with earlier frames "
                f"on count, size or total_sha256",
            )
        if frame.index in pending.parts:
            same = pending.parts[frame.index] == frame.data
            raise ProtocolError(
                Rejection.DUPLICATE_CHUNK if same else Rejection.CHUNK_MISMATCH,
                f"frame {frame.index} of message {frame.msg_id} from {sender} received twice"
                + ("" if same else " with different data"),
            )
        if pending.received + len(frame.data) > pending.size:
            raise ProtocolError(
                Rejection.CHUNK_MISMATCH,
                f"frames of message {frame.msg_id} from {sender} exceed its declared {pending.size} bytes",
            )
        pending.parts[frame.index] = frame.data
        pending.received += len(frame.data)
        pending.last_seen = now
        self._pending.move_to_end(key)
        return self._finish(key, pending) if len(pending.parts) == pending.count else None

    def expire(self, now: float | None = None) -> list[ProtocolError]:
        """Drop messages idle for ``timeout_s``; returns (and reports) a ``missing_chunk`` error for each."""
        now = self.clock() if now is None else now
        stale = [key for key, p in self._pending.items() if now - p.last_seen > self.timeout_s]
        return [self._drop(key, f"no frame for {self.timeout_s:g} s") for key in stale]

    def _start(self, key: tuple[str, str], frame: Frame, now: float) -> _Pending:
        sender, msg_id = key
        if frame.size > self.max_message_size:
            raise ProtocolError(
                Rejection.OVERSIZE,
                f"message {msg_id} from {sender} declares {frame.size} bytes, limit {self.max_message_size}",
            )
        if frame.size > self.max_pending_bytes_per_sender:
            raise ProtocolError(
                Rejection.OVERSIZE,
                f"message {msg_id} from {sender} declares {frame.size} bytes, more than a sender may have "
                f"pending ({self.max_pending_bytes_per_sender})",
            )
        own = [k for k in self._pending if k[0] == sender]  # oldest first
        if len(own) >= self.max_pending_per_sender:
            self._drop(
                own.pop(0), f"superseded: {sender} has more than {self.max_pending_per_sender} pending"
            )
        # The sender's own budget: its newest message supersedes its oldest, never anyone else's.
        held = sum(self._pending[k].size for k in own)
        while own and held + frame.size > self.max_pending_bytes_per_sender:
            oldest = own.pop(0)
            held -= self._pending[oldest].size
            self._drop(
                oldest, f"superseded: {sender} is over its {self.max_pending_bytes_per_sender} byte budget"
            )
        if len(self._pending) >= self.max_pending or self._reserved + frame.size > self.max_pending_bytes:
            raise ProtocolError(
                Rejection.REASSEMBLY_FULL,
                f"message {msg_id} from {sender} ({frame.size} bytes) does not fit: {len(self._pending)} "
                f"messages, {self._reserved} bytes pending",
            )
        pending = _Pending(frame.count, frame.size, frame.total_sha256, now)
        self._pending[key] = pending
        self._reserved += frame.size
        return pending

    def _finish(self, key: tuple[str, str], pending: _Pending) -> bytes:
        del self._pending[key]
        self._reserved -= pending.size
        payload = b"".join(pending.parts[i] for i in range(pending.count))
        if len(payload) != pending.size or hashlib.sha256(payload).digest() != pending.total_sha256:
            raise ProtocolError(
                Rejection.CHUNK_MISMATCH,
                f"message {key[1]} from {key[0]}: reassembled {len(payload)} bytes do not match the declared "
                f"size {pending.size} and total_sha256",
            )
        self._completed[key] = None
        while len(self._completed) > self.remember_completed:
            self._completed.popitem(last=False)
        return payload

    def _drop(self, key: tuple[str, str], why: str) -> ProtocolError:
        pending = self._pending.pop(key)
        self._reserved -= pending.size
        missing = pending.missing()
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        error = ProtocolError(
            Rejection.MISSING_CHUNK,
            f"message {key[1]} from {key[0]} dropped with {len(missing)} of {pending.count} frames "
            f"missing ({shown}): {why}",
        )
        logger.warning("%s", error)
        if self.on_expired is not None:
            self.on_expired(key[0], key[1], error)
        return error
