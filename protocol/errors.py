"""Why a message is refused: one enum for every layer, so logs and the store speak the same words.

The codec layer (``messages``, ``chunking``, ``topics``) raises the first group itself; the aggregator
raises the second group with the same exception type, so one ``except ProtocolError`` handles both and
the rejection recorded in the store is always a member of :class:`Rejection`.
"""

from __future__ import annotations

from enum import Enum


class Rejection(str, Enum):
    """A specific, machine-readable reason for refusing a payload (the value is what gets logged)."""

    # --- detected while decoding (protocol package) ---------------------------------------------
    MALFORMED_MSGPACK = "malformed_msgpack"
    NOT_A_MAP = "not_a_map"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    UNEXPECTED_TYPE = "unexpected_type"
    MISSING_FIELD = "missing_field"
    WRONG_FIELD_TYPE = "wrong_field_type"
    BAD_CHECKSUM = "bad_checksum"
    OVERSIZE = "oversize"
    WRONG_MASK_LENGTH = "wrong_mask_length"
    BAD_ARRAY = "bad_array"
    NAN_METRIC = "nan_metric"
    BAD_VALUE = "bad_value"
    BAD_ID = "bad_id"
    WRONG_FLEET = "wrong_fleet"
    CHUNK_OUT_OF_RANGE = "chunk_out_of_range"
    DUPLICATE_CHUNK = "duplicate_chunk"
    MISSING_CHUNK = "missing_chunk"
    CHUNK_MISMATCH = "chunk_mismatch"
    REASSEMBLY_FULL = "reassembly_full"
    UNKNOWN_CODING = "unknown_coding"
    # a mask coded against a base (``mctx``, protocol.mask_coding) that this side cannot use
    MISSING_BASE = "missing_base"
    STALE_BASE = "stale_base"
    BASE_MISMATCH = "base_mismatch"
    BAD_MASK_DIGEST = "bad_mask_digest"
    # --- detected by the aggregator against its state (reserved here, raised there) -------------
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_MISMATCH = "device_mismatch"
    WRONG_TASK = "wrong_task"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    REPLAYED_UPDATE = "replayed_update"
    ROUND_CLOSED = "round_closed"
    WRONG_BODY = "wrong_body"

    def __str__(self) -> str:
        return self.value


# Outcomes that are a normal consequence of QoS 1 redelivery rather than a misbehaving sender: log
# them at DEBUG, acknowledge the MQTT message, and move on.
BENIGN_REJECTIONS = frozenset({Rejection.DUPLICATE_CHUNK, Rejection.REPLAYED_UPDATE})


class ProtocolError(ValueError):
    """A payload that is refused; ``reason`` says why in one word, ``detail`` says where and what."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def benign(self) -> bool:
        """True for redelivery noise (see ``BENIGN_REJECTIONS``) that needs no warning."""
        return self.reason in BENIGN_REJECTIONS
