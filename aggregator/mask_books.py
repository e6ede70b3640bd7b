"""The aggregator's mask bases, backed by its store, and what each device says it can decode.

- A device's last accepted masks live in the store's ``mask_bases`` table (written in the transaction
  that stores the update they came in, as references to that update's payload), so a restarted
  aggregator still decodes updates coded against them. A base the aggregator lacks anyway (an update
  answered again as a duplicate, whose masks are written after it) is covered on the wire: the
  device's next update names a base we do not hold, is refused ``stale_base``, and the device sends it
  again in full coding.
- Announced bodies are the aggregates in the store: the body announced with round ``r`` is the
  aggregate of round ``r - 1``.
- The retained announcement is coded against the previous one only when every device we know said
  (presence ``capabilities["mask_codings"]``) that it decodes ``mctx``. A device that says it holds
  another consensus (``capabilities["consensus"]``) gets its own copy on its downlink, coded against
  what it holds or in full.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from fedmask.protocol import messages
from fedmask.protocol.errors import ProtocolError
from fedmask.protocol.mask_bases import ServerBases, plain
from fedmask.protocol.mask_coding import CONTEXT, Base, MaskRef, mask_digest, packed_mask_digest
from fedmask.protocol.tensor_codec import Coded, decode_coded_body, pack_bits
from fedmask.storage import mask_bases as stored_masks

logger = logging.getLogger(__name__)


BASE_REASONS = frozenset({"missing_base", "stale_base", "base_mismatch", "bad_mask_digest"})


def refused_update(payload: bytes, reason: object) -> tuple[int, str]:
    """(base round, "update") of an update refused for its mask base, so the device knows which one to
    resend in full; (0, "") for anything else (the payload is not trusted beyond this)."""
    if str(getattr(reason, "value", reason)) not in BASE_REASONS:
        return 0, ""
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except Exception:  # it decoded far enough to reach the masks; be safe anyway
        return 0, ""
    base_round = raw.get("base_round") if isinstance(raw, dict) else None
    if raw.get("type") != "update" or not isinstance(base_round, int) or isinstance(base_round, bool):
        return 0, ""
    return max(0, base_round), "update"


MaskRow = tuple[int, str, bytes]  # number of bits, digest (hex), packed bits


def _packed(coded: Coded) -> tuple[int, bytes]:
    """(number of bits, packed bits) of a mask: as it came off the wire when it is still packed."""
    if coded.packed is not None:
        return math.prod(coded.shape), coded.packed
    return int(np.size(coded.array)), pack_bits(coded.array)


def _base(round_no: int, num_bits: int, packed: bytes) -> Base:
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")
    return Base(round_no, bits[:num_bits].view(bool))


def _stored_body(payload: bytes | None) -> Mapping[str, Coded] | None:
    """The body of a stored update payload (full coding, as the aggregator stores them); None when
    the payload is gone (``load_masks`` logged why) or does not decode."""
    if payload is None:
        return None
    try:
        return messages.decode(payload, messages.Update, max_size=len(payload)).body
    except ProtocolError as exc:
        logger.warning("a stored update payload holding mask bases does not decode: %s", exc)
        return None


class StoredBases(ServerBases):
    def __init__(self, store, task_id: str) -> None:
        super().__init__()
        self.store = store
        self.task_id = task_id
        self._cache: dict[str, dict[str, Base]] = {}
        # Accepted masks still packed (a tenth of the memory): unpacked into bases when a device's next
        # update is coded against them.
        self._packed: dict[str, tuple[int, dict[str, MaskRow]]] = {}
        self.codings: dict[str, tuple[str, ...]] = {}  # device -> codings it decodes
        self.held: dict[str, MaskRef | None] = {}  # device -> consensus it said it holds
        self.coded_rounds: set[int] = set()  # rounds whose retained announcement is mctx-coded

    def device_masks(self, device: str) -> dict[str, Base]:
        if device in self._packed:
            round_no, rows = self._packed.pop(device)
            self._cache[device] = {k: _base(round_no, bits, packed) for k, (bits, _, packed) in rows.items()}
        if device not in self._cache:
            bases = {}
            bodies: dict[str, Mapping[str, Coded] | None] = {}
            for row in stored_masks.load_masks(self.store, self.task_id, device):
                packed = row.packed
                if packed is None:  # in the update it came with
                    if row.payload_sha256 not in bodies:
                        bodies[row.payload_sha256] = _stored_body(row.payload)
                    coded = (bodies[row.payload_sha256] or {}).get(row.entry)
                    packed = _packed(coded)[1] if coded is not None and coded.coding == "bits" else b""
                base = _base(row.round_no, row.num_bits, packed)
                if 8 * len(packed) >= row.num_bits and base.ref.digest.hex() == row.digest:
                    bases[row.entry] = base
                else:
                    # Its next update is refused (missing_base) and sent again in full coding.
                    logger.warning("stored mask base %r of %s does not match its digest", row.entry, device)
            self._cache[device] = bases
        return self._cache[device]

    def forget(self) -> None:
        """Drop every base held in memory: each is read from the store again when next needed."""
        self._cache.clear()
        self._packed.clear()

    def mask_rows(self, round_no: int, body: Mapping[str, Coded]) -> tuple[int, dict[str, MaskRow]] | None:
        """The store's rows for an update's masks, ``(round, {entry: row})``, or None if it has none:
        stored with the update, in the same transaction (``Store.record_batch``)."""
        rows = {}
        for name, coded in body.items():
            if coded.coding == "bits":  # the digest is of the packed bits, as they came
                bits, packed = _packed(coded)
                rows[name] = (bits, packed_mask_digest(bits, packed).hex(), packed)
        return (round_no, rows) if rows else None

    def accept(
        self,
        device: str,
        round_no: int,
        body: Mapping[str, Coded],
        *,
        stored: bool = False,
        rows: tuple[int, dict[str, MaskRow]] | None = None,
    ) -> None:
        """An update of ``device`` was accepted: its masks are the device's bases from now on.
        ``stored``: they were written with it (``rows``, from ``mask_rows``); otherwise they are
        written here."""
        if rows is None:
            rows = self.mask_rows(round_no, body)
        if rows is None:
            return
        if not stored:
            stored_masks.save_masks(self.store, self.task_id, device, round_no, rows[1])
        self._cache.pop(device, None)
        self._packed[device] = (round_no, rows[1])

    def announced_body(self, round_no: int) -> dict[str, np.ndarray] | None:
        if round_no in self.announced:
            return self.announced[round_no]
        if round_no < 2:
            return None
        aggregate = self.store.get_aggregate(self.task_id, round_no - 1)
        if aggregate is None:
            return None
        body = decode_coded_body(msgpack.unpackb(aggregate, raw=False))
        masks = {k: np.asarray(c.array).reshape(-1) for k, c in body.items() if c.coding == "bits"}
        self.announced[round_no] = masks
        return masks

    # ----- devices' capabilities ---------------------------------------------------------------------

    def on_presence(self, device: str, capabilities: Mapping[str, Any]) -> None:
        codings = capabilities.get("mask_codings")
        self.codings[device] = (
            tuple(c for c in codings if isinstance(c, str)) if isinstance(codings, list) else ()
        )
        held = capabilities.get("consensus")
        ref = None
        if (
            isinstance(held, list)
            and len(held) == 2
            and isinstance(held[0], int)
            and isinstance(held[1], bytes)
        ):
            ref = MaskRef(held[0], held[1])
        self.held[device] = ref

    def all_decode_context(self, devices) -> bool:
        return bool(devices) and all(CONTEXT in self.codings.get(d, ()) for d in devices)

    def announcement(
        self, round_no: int, body: Mapping[str, Coded] | None, devices
    ) -> dict[str, Coded] | None:
        """The retained announcement's body: coded against the previous one if every device decodes it."""
        self.announce(round_no, body)
        if body is None or not self.all_decode_context(devices):
            self.coded_rounds.discard(round_no)
            return plain(body)
        self.coded_rounds.add(round_no)
        return self.downlink(round_no, body)

    def needs_copy(self, device: str, round_no: int) -> bool:
        """Whether ``device`` cannot decode the retained announcement of ``round_no`` (coded against the
        announcement before it) from what it said it holds."""
        if round_no not in self.coded_rounds or CONTEXT not in self.codings.get(device, ()):
            return False  # the retained message is in full coding
        previous = self.announced_body(round_no - 1)
        if not previous:
            return False
        held = self.held.get(device)
        first = sorted(previous)[0]
        return held is None or held.round != round_no - 1 or held.digest != mask_digest(previous[first])

    def copy_for(self, device: str, body: Mapping[str, Coded] | None) -> dict[str, Coded] | None:
        """A device's own copy of the current body, coded against the consensus it holds, or in full."""
        held = self.held.get(device)
        if body is None or held is None:
            return plain(body)
        known = self.announced_body(held.round)
        if not known:
            return plain(body)
        if mask_digest(known[sorted(known)[0]]) != held.digest:
            return plain(body)
        return self.downlink_for(plain(body), {name: Base(held.round, mask) for name, mask in known.items()})
