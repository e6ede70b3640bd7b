"""The messages of the FedMask wire protocol: typed dataclasses, msgpack maps on the wire.

Every message is one msgpack map ``{"v": 1, "type": ..., "fleet": ..., <fields>, "sha256": ...}``
(field lists in docs/protocol.md). ``encode`` and ``decode`` are the only way in and out; ``decode``
validates everything and raises :class:`ProtocolError` with a specific :class:`Rejection` for any fault.

Checksum: ``sha256`` is 32 raw bytes, the SHA-256 of the *canonical* msgpack encoding of the map without
the ``sha256`` entry: map keys sorted by code point at every level, ``str`` as msgpack str, ``bytes`` as
bin, floats as float64, integers in their shortest form (what ``msgpack.packb(..., use_bin_type=True)``
writes for a key-sorted map). The encoder writes exactly those bytes and appends the ``sha256`` entry,
so the payload is the canonical map plus one entry.

Construction validates too, so a message that exists is a message the other side accepts (up to the
limits the receiver chooses). No pickle anywhere: arrays travel through ``tensor_codec``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, overload

import msgpack
import numpy as np

from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.tensor_codec import (
    MAX_ELEMENTS,
    BodyBases,
    CodecError,
    Coded,
    decode_coded_body,
    encode_body,
)
from fedmask.protocol.topics import validate_id

PROTOCOL_VERSION = 1
CHECKSUM_FIELD = "sha256"
# Default bound for ``decode(max_size=...)``: a whole (reassembled) message, not one MQTT payload.
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
# The smallest max_payload a task may set: chunk frames need room for their header.
MIN_PAYLOAD = 1024
# MQTT's own limit on a PUBLISH packet (remaining length is at most 268,435,455 bytes).
MQTT_MAX_PAYLOAD = 268_435_455
MAX_NAME_LENGTH = 256
MAX_TEXT_LENGTH = 4096
MAX_NESTING = 8  # depth of free-form maps (mask_config, hyper, capabilities)
UINT64_MAX = (1 << 64) - 1
INT64_MIN = -(1 << 63)

Body = dict[str, Coded]
FLOAT_CODINGS = ("f32", "f16", "topk")
HYPER_REQUIRED = ("lr", "local_epochs", "batch_size", "finetune_epochs", "finetune_lr")
RESULT_METRICS = ("accuracy", "latency_ms", "size_bytes", "peak_rss_bytes", "num_test", "density")
DIRECTIVE_KINDS = ("finalize", "receipt", "rejected")
PRESENCE_STATUSES = ("online", "offline")
TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier at bytes 4..8 of every .tflite file


# --- value checks shared by the dataclasses ---------------------------------------------------------
# Each returns the value normalised to a plain Python type (numpy scalars become int/float, tuples
# become lists), so a message built from numpy results encodes exactly like one that came off the wire.


def _wrong_type(path: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError(Rejection.WRONG_FIELD_TYPE, f"{path} must be {expected}, got {type(value).__name__}")


def _int(value: object, path: str, *, minimum: int = 0, maximum: int = (1 << 63) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _wrong_type(path, "an integer", value)
    number = int(value)
    if not minimum <= number <= maximum:
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} must be in [{minimum}, {maximum}], got {number}")
    return number


def _real(value: object, path: str, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _wrong_type(path, "a number", value)
    number = float(value)
    if not math.isfinite(number):
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} must be finite, got {number}")
    if positive and number <= 0:
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} must be > 0, got {number}")
    if minimum is not None and number < minimum:
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} must be >= {minimum}, got {number}")
    return number


def _text(value: object, path: str, *, max_length: int = MAX_TEXT_LENGTH, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _wrong_type(path, "a string", value)
    if len(value) > max_length or (not value and not allow_empty):
        raise ProtocolError(
            Rejection.BAD_VALUE, f"{path} must be 1-{max_length} characters, got {len(value)}"
        )
    return value


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _wrong_type(path, "a string", value)
    if value not in choices:
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} must be one of {choices}, got {value!r}")
    return value


def _blob(value: object, path: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _wrong_type(path, "bytes", value)
    data = bytes(value)
    if not data:
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} must not be empty")
    return data


def _key(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(f"keys of {path}", "strings", value)
    if not value or len(value) > MAX_NAME_LENGTH:
        raise ProtocolError(
            Rejection.BAD_VALUE, f"key {value[:40]!r} in {path} must be 1-{MAX_NAME_LENGTH} chars"
        )
    return value


def _plain(value: object, path: str, depth: int = 0) -> Any:
    """A free-form value (config maps): nil, bool, int, finite float, str, bytes, list, str-keyed map."""
    if depth > MAX_NESTING:
        raise ProtocolError(Rejection.WRONG_FIELD_TYPE, f"{path} is nested deeper than {MAX_NESTING} levels")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, numbers.Integral):
        return _int(value, path, minimum=INT64_MIN, maximum=UINT64_MAX)
    if isinstance(value, numbers.Real):
        return _real(value, path)
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {_key(k, path): _plain(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
    raise _wrong_type(path, "nil, bool, number, string, bytes, list or map", value)


def _plain_map(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _wrong_type(path, "a map", value)
    return _plain(value, path)


def _metrics(value: object, path: str, *, required: tuple[str, ...] = ()) -> dict[str, float]:
    """A map of metric name → finite float; NaN or infinity is ``nan_metric``."""
    if not isinstance(value, Mapping):
        raise _wrong_type(path, "a map of metric name to number", value)
    out: dict[str, float] = {}
    for name, number in value.items():
        key = _key(name, path)
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise _wrong_type(f"{path}.{key}", "a number", number)
        out[key] = float(number)
        if not math.isfinite(out[key]):
            raise ProtocolError(Rejection.NAN_METRIC, f"{path}.{key} is {out[key]}, metrics must be finite")
    missing = [name for name in required if name not in out]
    if missing:
        raise ProtocolError(Rejection.MISSING_FIELD, f"{path} lacks {', '.join(missing)}")
    return out


def _body(value: object, path: str, *, optional: bool = False) -> Body | None:
    """A strategy body: name → Coded (may be empty, e.g. local-only training sends nothing).

    Float arrays must be finite: one NaN would poison the aggregate of every device.
    """
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise _wrong_type(path, "a map of name to Coded array", value)
    out: Body = {}
    for name, coded in value.items():
        key = _key(name, path)
        if not isinstance(coded, Coded):
            raise _wrong_type(f"{path}[{key!r}]", "a Coded array", coded)
        if coded.packed is not None:  # decoded bits, still packed: boolean by construction
            out[key] = coded
            continue
        array = np.asarray(coded.array)
        if array.dtype.kind not in "biuf":
            raise _wrong_type(f"{path}[{key!r}]", "a numeric array", array)
        if coded.coding in FLOAT_CODINGS and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError(Rejection.BAD_ARRAY, f"{path}[{key!r}] holds NaN or infinite values")
        out[key] = coded
    return out


def _safetensors(value: object, path: str) -> bytes:
    """Check the safetensors framing: u64 little-endian header length, then a JSON object header."""
    data = _blob(value, path)
    header_length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if header_length < 2 or 8 + header_length > len(data) or data[8:9] != b"{":
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} is not a safetensors file (bad header framing)")
    return data


def _tflite(value: object, path: str) -> bytes:
    data = _blob(value, path)
    if data[4:8] != TFLITE_IDENTIFIER:
        raise ProtocolError(Rejection.BAD_VALUE, f"{path} is not a TFLite flatbuffer (no 'TFL3' identifier)")
    return data


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


# --- the messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """How a task's rounds run (see docs/protocol.md, "Round lifecycle")."""

    rounds: int
    quorum: int
    deadline_s: float
    staleness_bound: int
    max_payload: int
    # A round also waits for this share of the task's expected devices (its participants so far and
    # the devices online), rounded up; 0 (the v1 default): ``quorum`` alone decides.
    quorum_fraction: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "rounds", _int(self.rounds, "schedule.rounds", minimum=1))
        _set(self, "quorum", _int(self.quorum, "schedule.quorum", minimum=1))
        _set(self, "deadline_s", _real(self.deadline_s, "schedule.deadline_s", positive=True))
        _set(self, "staleness_bound", _int(self.staleness_bound, "schedule.staleness_bound"))
        _set(
            self,
            "max_payload",
            _int(self.max_payload, "schedule.max_payload", minimum=MIN_PAYLOAD, maximum=MQTT_MAX_PAYLOAD),
        )
        fraction = _real(self.quorum_fraction, "schedule.quorum_fraction", minimum=0.0)
        if fraction > 1.0:
            raise ProtocolError(Rejection.BAD_VALUE, f"schedule.quorum_fraction must be <= 1, got {fraction}")
        _set(self, "quorum_fraction", fraction)

    @classmethod
    def from_wire(cls, raw: object, path: str = "task.schedule") -> Schedule:
        if not isinstance(raw, dict):
            raise _wrong_type(path, "a map", raw)
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in raw]
        if missing:
            raise ProtocolError(Rejection.MISSING_FIELD, f"{path} lacks {', '.join(missing)}")
        return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})


@dataclass(frozen=True, kw_only=True)
class Message:
    """Fields every message has. Subclasses set ``TYPE`` (the wire ``type``) and validate themselves."""

    TYPE: ClassVar[str] = ""
    # Fields holding a strategy body (coded with tensor_codec on the wire).
    BODY_FIELDS: ClassVar[tuple[str, ...]] = ()

    fleet: str

    def __post_init__(self) -> None:
        validate_id(self.fleet, f"{self.TYPE}.fleet")
        self._validate()

    def _validate(self) -> None:
        """Check and normalise the subclass's own fields."""

    def _path(self, name: str) -> str:
        return f"{self.TYPE}.{name}"

    def to_wire(self) -> dict[str, Any]:
        """The message's fields as a msgpack-ready map (without ``v``, ``type`` and ``sha256``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.BODY_FIELDS and value is not None:
                value = encode_body(value)
            elif isinstance(value, Schedule):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_wire(
        cls, raw: dict[str, Any], *, max_elements: int = MAX_ELEMENTS, bases: BodyBases | None = None
    ) -> Message:
        """Build the message from a verified wire map (``decode`` calls this after the checksum)."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(Rejection.MISSING_FIELD, f"{cls.TYPE} message lacks {f.name!r}")
                continue
            value = raw[f.name]
            if f.name in cls.BODY_FIELDS and value is not None:
                value = _decode_body(value, f"{cls.TYPE}.{f.name}", max_elements, bases)
            elif f.name == "schedule":
                value = Schedule.from_wire(value)
            kwargs[f.name] = value
        return cls(**kwargs)


def _decode_body(raw: object, path: str, max_elements: int, bases: BodyBases | None = None) -> Body:
    try:
        return decode_coded_body(raw, max_elements=max_elements, bases=bases)
    except CodecError as exc:
        raise ProtocolError(Rejection(exc.reason), f"{path}: {exc.detail}") from exc


@dataclass(frozen=True, kw_only=True)
class Task(Message):
    """What a fleet trains: model, frozen-weight seed and digest, hyperparameters, schedule (retained)."""

    TYPE: ClassVar[str] = "task"

    task_id: str
    strategy: str
    arch: str
    num_classes: int
    seed: int
    weights_digest: str
    mask_config: dict[str, Any]
    hyper: dict[str, Any]
    schedule: Schedule
    created_at: float
    # Keyword arguments of the zoo constructor (width, input shape...); a device needs them to build
    # the same network the digest was computed on.
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # Mask codings the aggregator decodes (protocol.mask_coding); absent or empty: "bits" only.
    codings: list[str] = field(default_factory=list)

    def _validate(self) -> None:
        p = self._path
        validate_id(self.task_id, p("task_id"))
        validate_id(self.strategy, p("strategy"))
        validate_id(self.arch, p("arch"))
        _set(self, "num_classes", _int(self.num_classes, p("num_classes"), minimum=2))
        _set(self, "seed", _int(self.seed, p("seed"), maximum=UINT64_MAX))
        _set(
            self,
            "weights_digest",
            _text(self.weights_digest, p("weights_digest"), max_length=256, allow_empty=False),
        )
        _set(self, "mask_config", _plain_map(self.mask_config, p("mask_config")))
        _set(self, "arch_kwargs", _plain_map(self.arch_kwargs, p("arch_kwargs")))
        if not isinstance(self.codings, (list, tuple)):
            raise _wrong_type(p("codings"), "a list of coding names", self.codings)
        _set(self, "codings", [validate_id(c, p("codings")) for c in self.codings])
        _set(self, "hyper", _hyper(self.hyper, p("hyper")))
        if not isinstance(self.schedule, Schedule):
            raise _wrong_type(p("schedule"), "a Schedule", self.schedule)
        _set(self, "created_at", _real(self.created_at, p("created_at"), minimum=0.0))


def _hyper(value: object, path: str) -> dict[str, Any]:
    """Hyperparameters: the required training knobs with sane values, plus free-form extras."""
    hyper = _plain_map(value, path)
    missing = [name for name in HYPER_REQUIRED if name not in hyper]
    if missing:
        raise ProtocolError(Rejection.MISSING_FIELD, f"{path} lacks {', '.join(missing)}")
    hyper["lr"] = _real(hyper["lr"], f"{path}.lr", positive=True)
    hyper["finetune_lr"] = _real(hyper["finetune_lr"], f"{path}.finetune_lr", positive=True)
    hyper["local_epochs"] = _int(hyper["local_epochs"], f"{path}.local_epochs", minimum=1)
    hyper["batch_size"] = _int(hyper["batch_size"], f"{path}.batch_size", minimum=1)
    hyper["finetune_epochs"] = _int(hyper["finetune_epochs"], f"{path}.finetune_epochs")
    if "staleness_alpha" in hyper:
        hyper["staleness_alpha"] = _real(hyper["staleness_alpha"], f"{path}.staleness_alpha", minimum=0.0)
    return hyper


@dataclass(frozen=True, kw_only=True)
class RoundAnnouncement(Message):
    """The open round (retained): its number, deadline, and the previous aggregate (None at first)."""

    TYPE: ClassVar[str] = "round"
    BODY_FIELDS: ClassVar[tuple[str, ...]] = ("body",)

    task_id: str
    round: int
    deadline: float  # unix seconds
    body: Body | None = None

    def _validate(self) -> None:
        p = self._path
        validate_id(self.task_id, p("task_id"))
        _set(self, "round", _int(self.round, p("round")))
        _set(self, "deadline", _real(self.deadline, p("deadline"), minimum=0.0))
        _set(self, "body", _body(self.body, p("body"), optional=True))


@dataclass(frozen=True, kw_only=True)
class Update(Message):
    """A device's contribution to a round, trained from the global body of ``base_round``."""

    TYPE: ClassVar[str] = "update"
    BODY_FIELDS: ClassVar[tuple[str, ...]] = ("body",)

    task_id: str
    device: str
    round: int
    base_round: int
    num_samples: int
    body: Body
    metrics: dict[str, float] = field(default_factory=dict)

    def _validate(self) -> None:
        p = self._path
        validate_id(self.task_id, p("task_id"))
        validate_id(self.device, p("device"))
        _set(self, "round", _int(self.round, p("round")))
        _set(self, "base_round", _int(self.base_round, p("base_round")))
        if self.base_round > self.round:
            raise ProtocolError(
                Rejection.BAD_VALUE, f"{p('base_round')} {self.base_round} is after round {self.round}"
            )
        _set(self, "num_samples", _int(self.num_samples, p("num_samples")))
        _set(self, "metrics", _metrics(self.metrics, p("metrics")))
        _set(self, "body", _body(self.body, p("body")))


@dataclass(frozen=True, kw_only=True)
class Result(Message):
    """A device's finalized personal model and its measurements (answer to a ``finalize`` directive)."""

    TYPE: ClassVar[str] = "result"

    task_id: str
    device: str
    metrics: dict[str, float]  # at least RESULT_METRICS
    mask: bytes
    weights: bytes  # a safetensors file
    tflite: bytes  # a .tflite flatbuffer

    def _validate(self) -> None:
        p = self._path
        validate_id(self.task_id, p("task_id"))
        validate_id(self.device, p("device"))
        metrics = _metrics(self.metrics, p("metrics"), required=RESULT_METRICS)
        # accuracy and density are shares; num_test counts the test samples behind the accuracy.
        for name in ("accuracy", "density"):
            if not 0.0 <= metrics[name] <= 1.0:
                raise ProtocolError(Rejection.BAD_VALUE, f"{p('metrics.' + name)} must be in [0, 1]")
        for name in RESULT_METRICS:
            if metrics[name] < 0:
                raise ProtocolError(Rejection.BAD_VALUE, f"{p('metrics.' + name)} must be >= 0")
        if not metrics["num_test"].is_integer():
            raise ProtocolError(Rejection.BAD_VALUE, f"{p('metrics.num_test')} must be a whole number")
        _set(self, "metrics", metrics)
        _set(self, "mask", _blob(self.mask, p("mask")))
        _set(self, "weights", _safetensors(self.weights, p("weights")))
        _set(self, "tflite", _tflite(self.tflite, p("tflite")))


@dataclass(frozen=True, kw_only=True)
class Directive(Message):
    """Aggregator → device: ``finalize`` now, ``receipt`` (update stored) or ``rejected`` (with reason)."""

    TYPE: ClassVar[str] = "directive"

    kind: str
    task_id: str
    round: int
    detail: str = ""
    # The Rejection value when kind == "rejected", else None; lets the device react (e.g. retrain).
    reason: str | None = None

    def _validate(self) -> None:
        p = self._path
        _set(self, "kind", _choice(self.kind, p("kind"), DIRECTIVE_KINDS))
        validate_id(self.task_id, p("task_id"))
        _set(self, "round", _int(self.round, p("round")))
        _set(self, "detail", _text(self.detail, p("detail")))
        if self.kind == "rejected":
            if self.reason is None:
                raise ProtocolError(
                    Rejection.MISSING_FIELD, f"{p('reason')} is required when kind is 'rejected'"
                )
            _set(self, "reason", _choice(self.reason, p("reason"), tuple(r.value for r in Rejection)))
        elif self.reason is not None:
            raise ProtocolError(Rejection.BAD_VALUE, f"{p('reason')} is only set when kind is 'rejected'")


@dataclass(frozen=True, kw_only=True)
class Presence(Message):
    """A device's retained state: ``online`` (with capabilities) or ``offline`` (also its last will)."""

    TYPE: ClassVar[str] = "presence"

    device: str
    status: str
    at: float  # unix seconds
    capabilities: dict[str, Any] = field(default_factory=dict)

    def _validate(self) -> None:
        p = self._path
        validate_id(self.device, p("device"))
        _set(self, "status", _choice(self.status, p("status"), PRESENCE_STATUSES))
        _set(self, "at", _real(self.at, p("at"), minimum=0.0))
        _set(self, "capabilities", _plain_map(self.capabilities, p("capabilities")))


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Task, RoundAnnouncement, Update, Result, Directive, Presence)
}
CHUNK_FRAME_TYPE = "chunk"  # frames of a split payload (protocol.chunking); never a message type

M = TypeVar("M", bound=Message)


# --- canonical form and checksum -------------------------------------------------------------------


def _canonical(value: Any, path: str = "message", depth: int = 0) -> Any:
    """The value with every map's keys sorted; refuses non-string keys and absurd nesting."""
    if depth > 2 * MAX_NESTING:
        raise ProtocolError(Rejection.WRONG_FIELD_TYPE, f"{path} is nested too deeply")
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ProtocolError(Rejection.WRONG_FIELD_TYPE, f"{path} has a non-string key {key!r:.40}")
        return {key: _canonical(value[key], f"{path}.{key}", depth + 1) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    return value


class _NotPlain(Exception):
    """``_sorted`` met a non-string key or absurd nesting: ``_canonical`` says where."""


def _sorted(value: Any, depth: int = 0) -> Any:
    """``_canonical`` for the common case, at a fraction of its cost (it runs on every message
    received): a map whose keys are already in order (as a canonical sender wrote them, and msgpack
    unpacks them) is reused rather than copied, and no error path is built. Raises ``_NotPlain``
    where ``_canonical`` would raise."""
    if depth >= 2 * MAX_NESTING and (depth > 2 * MAX_NESTING or value):  # (its items are one deeper)
        raise _NotPlain
    if isinstance(value, dict):
        keys = list(value)
        for key in keys:
            if not isinstance(key, str):
                raise _NotPlain
        ordered = sorted(keys)
        copy = ordered != keys
        items = {}
        for key in ordered:
            item = value[key]
            if isinstance(item, (dict, list, tuple)):
                canonical = _sorted(item, depth + 1)
                copy = copy or canonical is not item
                item = canonical
            items[key] = item
        return items if copy else value
    if isinstance(value, (list, tuple)):
        containers = (dict, list, tuple)
        items = [_sorted(item, depth + 1) if isinstance(item, containers) else item for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


def _canonical_fast(value: Any) -> Any:
    try:
        return _sorted(value)
    except _NotPlain:
        return _canonical(value)  # raises, naming the path


_packers = threading.local()


def _pack(value: Any) -> bytes:
    # One packer per thread, reused: ``msgpack.packb`` makes a new one each call, whose 256 KiB buffer
    # cost more than packing a 10 KB message (page faults on every decode, measured on the ingest path).
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        return packer.pack(value)
    except BaseException:
        _packers.packer = None  # a half-written buffer: start afresh
        raise


def _map_header(entries: int) -> bytes:
    if entries < 16:
        return bytes([0x80 | entries])
    if entries < 1 << 16:
        return b"\xde" + entries.to_bytes(2, "big")
    return b"\xdf" + entries.to_bytes(4, "big")


def checksum(fields: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical encoding of ``fields`` (a message map without its ``sha256``)."""
    return hashlib.sha256(_pack(_canonical_fast(dict(fields)))).digest()


def seal(fields: Mapping[str, Any]) -> bytes:
    """Pack an arbitrary map as a checksummed payload. Low level: for tools and tests; use ``encode``."""
    canonical = _pack(_canonical_fast(dict(fields)))
    digest = hashlib.sha256(canonical).digest()
    entries = len(fields)
    # The canonical bytes with the header bumped by one and the checksum entry appended (one copy).
    body = memoryview(canonical)[len(_map_header(entries)) :]
    return b"".join((_map_header(entries + 1), body, _pack(CHECKSUM_FIELD), _pack(digest)))


def encode(message: Message) -> bytes:
    """The wire bytes of a message (one msgpack map, checksummed)."""
    if not isinstance(message, Message) or type(message) not in MESSAGE_TYPES.values():
        raise TypeError(f"encode() takes a protocol message, got {type(message).__name__}")
    return seal({"v": PROTOCOL_VERSION, "type": message.TYPE, **message.to_wire()})


# --- decoding ------------------------------------------------------------------------------------------


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not used by this protocol")


def _unpack(payload: object, max_size: int) -> dict[str, Any]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(
            Rejection.MALFORMED_MSGPACK, f"payload must be bytes, got {type(payload).__name__}"
        )
    if len(payload) > max_size:
        raise ProtocolError(
            Rejection.OVERSIZE, f"payload of {len(payload)} bytes exceeds the limit of {max_size}"
        )
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True, ext_hook=_refuse_ext, timestamp=0)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, bad UTF-8...
        raise ProtocolError(Rejection.MALFORMED_MSGPACK, f"cannot unpack payload ({exc})") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(Rejection.NOT_A_MAP, f"payload is a msgpack {type(raw).__name__}, not a map")
    return raw


def _require(raw: dict[str, Any], name: str, kind: type | tuple[type, ...], expected: str) -> Any:
    if name not in raw:
        raise ProtocolError(Rejection.MISSING_FIELD, f"message lacks {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _wrong_type(f"message field {name!r}", expected, value)
    return value


def _message_class(raw: dict[str, Any], expected: tuple[type[Message], ...] | None) -> type[Message]:
    type_name = _require(raw, "type", str, "a string")
    if type_name == CHUNK_FRAME_TYPE:
        raise ProtocolError(
            Rejection.UNEXPECTED_TYPE, "a chunk frame: pass it through chunking.Reassembler before decoding"
        )
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise ProtocolError(Rejection.UNKNOWN_TYPE, f"unknown message type {type_name!r:.40}")
    if expected is not None and cls not in expected:
        names = ", ".join(e.TYPE for e in expected)
        raise ProtocolError(Rejection.UNEXPECTED_TYPE, f"got a {type_name!r} message, expected {names}")
    return cls


@overload
def decode(
    payload: bytes,
    expected: type[M],
    *,
    max_size: int = ...,
    fleet: str | None = ...,
    max_elements: int = ...,
    bases: BodyBases | None = ...,
) -> M: ...


@overload
def decode(
    payload: bytes,
    expected: tuple[type[Message], ...] | None = ...,
    *,
    max_size: int = ...,
    fleet: str | None = ...,
    max_elements: int = ...,
    bases: BodyBases | None = ...,
) -> Message: ...


def decode(
    payload: bytes,
    expected: type[Message] | tuple[type[Message], ...] | None = None,
    *,
    max_size: int = DEFAULT_MAX_MESSAGE,
    fleet: str | None = None,
    max_elements: int = MAX_ELEMENTS,
    bases: BodyBases | None = None,
) -> Message:
    """Decode and fully validate one message; any fault raises ``ProtocolError(reason, detail)``.

    ``expected``: the message class(es) this topic carries (others are ``unexpected_type``).
    ``max_size``: bytes of the whole payload. ``fleet``: the receiver's fleet (others are ``wrong_fleet``).
    ``max_elements``: elements a body may declare in total; pass the model's parameter count.
    ``bases``: entry name -> lookup of the masks this side holds, to decode ``mctx`` masks (see
    ``protocol.mask_coding``); without it such a mask is refused as ``missing_base``.
    Checks run in this order: size, msgpack, map, version, checksum, type, fleet, fields.
    """
    raw = _unpack(payload, max_size)
    version = _require(raw, "v", int, "an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            Rejection.UNSUPPORTED_VERSION, f"protocol version {version}, this side speaks {PROTOCOL_VERSION}"
        )
    if raw.get("type") != CHUNK_FRAME_TYPE:
        digest = _require(raw, CHECKSUM_FIELD, bytes, "32 bytes")
        if len(digest) != 32:
            raise ProtocolError(Rejection.WRONG_FIELD_TYPE, f"sha256 must be 32 bytes, got {len(digest)}")
        del raw[CHECKSUM_FIELD]
        if checksum(raw) != digest:
            raise ProtocolError(Rejection.BAD_CHECKSUM, "sha256 does not match the message content")
    if isinstance(expected, type):
        expected = (expected,)
    cls = _message_class(raw, expected)
    sender_fleet = validate_id(_require(raw, "fleet", str, "a string"), f"{cls.TYPE}.fleet")
    if fleet is not None and sender_fleet != fleet:
        raise ProtocolError(Rejection.WRONG_FLEET, f"message for fleet {sender_fleet!r}, this is {fleet!r}")
    return cls.from_wire(raw, max_elements=max_elements, bases=bases)
