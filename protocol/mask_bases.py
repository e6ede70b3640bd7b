"""Who holds which mask: the base bookkeeping of ``mctx`` coding, one class per side of the wire.

Strategies exchange plain mask arrays; the transports (in-process simulator, aggregator service,
device agent) keep these books and put them on the bodies they encode, so the learning code never
sees a base.

Uplink (device -> aggregator): a mask entry is coded against
- ``prev``: the device's last upload *the aggregator accepted* (the device learns it from the receipt;
  the aggregator keeps it per device in its store), and
- ``side``: the consensus entry of the announcement the device trained from (the aggregator has every
  round's aggregate in its store).

Downlink (aggregator -> devices): each mask entry of a round announcement is coded against the same
entry of the previous announcement (``prev``), which a device that followed the rounds holds.

Anything a side lacks is simply left out of the context (no base: full coding, or ``mctx`` with
fewer contexts); a base the receiver turns out not to hold is a specific rejection (``missing_base``,
``stale_base``, ``base_mismatch``) after which the sender falls back to full coding.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmask.protocol.mask_coding import CONTEXT, FULL, Base, BaseLookup, MaskContext, MaskRef, mask_digest
from fedmask.protocol.tensor_codec import BodyBases, Coded

# Consensus entries a device's ``mask`` entry is best predicted by, in order of preference.
SIDE_PREFERENCE = ("keep", "mask")
STATE_PREFIX = "maskbase__"


def side_entry(body: Mapping[str, np.ndarray] | None, name: str) -> str | None:
    """Which entry of a consensus body serves as side information for the upload entry ``name``."""
    if not body:
        return None
    masks = [k for k, v in body.items() if np.asarray(v).dtype == bool]
    for candidate in (name, *SIDE_PREFERENCE, *sorted(masks)):
        if candidate in masks:
            return candidate
    return None


def _bool_entries(body: Mapping[str, Coded] | None) -> dict[str, np.ndarray]:
    if not body:
        return {}
    return {k: np.asarray(c.array).reshape(-1) for k, c in body.items() if c.coding == "bits"}


def with_contexts(body: Mapping[str, Coded], contexts: Mapping[str, MaskContext]) -> dict[str, Coded]:
    """``body`` with each ``bits`` entry carrying its context (entries without one are unchanged)."""
    out = {}
    for name, coded in body.items():
        context = contexts.get(name)
        if coded.coding == "bits" and context is not None:
            out[name] = Coded(coded.array, coded.coding, context=context)
        else:
            out[name] = coded
    return out


def plain(body: Mapping[str, Coded] | None) -> dict[str, Coded] | None:
    """``body`` without contexts: full coding of every entry (the fallback)."""
    if body is None:
        return None
    return {name: Coded(coded.array, coded.coding) for name, coded in body.items()}


def _lookup(prev: Mapping[str, Base], side: Mapping[str, Base] | None = None) -> BodyBases:
    def for_entry(name: str) -> BaseLookup:
        def lookup(role: str, ref: MaskRef) -> Base | None:
            if role == "prev":
                return prev.get(name)
            return None if side is None else side.get(name)

        return lookup

    return for_entry


class DeviceBases:
    """A device's books: the consensus it holds, its uploads, which of them the aggregator accepted.

    ``codings``: what the aggregator decodes (the task says; absent means ``bits`` only).
    """

    def __init__(self, codings: tuple[str, ...] | list[str] = (FULL,)) -> None:
        self.codings = tuple(codings)
        self.consensus: dict[str, Base] = {}  # entry -> last decoded announcement entry
        # the consensus before it: a re-announcement of the same round (deadline extended) is coded
        # against that one
        self.earlier: dict[str, Base] = {}
        self.accepted: dict[str, Base] = {}  # entry -> last upload the aggregator accepted
        self.sent: dict[int, dict[str, Base]] = {}  # round -> uploads awaiting a receipt

    @property
    def consensus_ref(self) -> MaskRef | None:
        """The round and digest of the consensus held (of its first entry), for presence."""
        for name in sorted(self.consensus):
            return self.consensus[name].ref
        return None

    def announcement_bases(self) -> BodyBases:
        """Lookup for decoding an announcement: its ``prev`` bases are the consensus held (or the one
        before it, for a repeated announcement of the round we hold)."""

        def for_entry(name: str) -> BaseLookup:
            def lookup(role: str, ref: MaskRef) -> Base | None:
                if role != "prev":
                    return None
                held = self.consensus.get(name)
                earlier = self.earlier.get(name)
                if (
                    (held is None or held.round != ref.round)
                    and earlier is not None
                    and earlier.round == ref.round
                ):
                    return earlier
                return held  # (a base of another round: the decoder says stale_base)

            return lookup

        return for_entry

    def received(self, round_no: int, body: Mapping[str, Coded] | None) -> None:
        """An announcement was decoded: its mask entries are now the consensus held."""
        if self.consensus and self.consensus_ref is not None and self.consensus_ref.round != round_no:
            self.earlier = self.consensus
        self.consensus = {k: Base(round_no, v) for k, v in _bool_entries(body).items()}

    def uplink(self, body: Mapping[str, Coded], round_no: int) -> dict[str, Coded]:
        """The update body with contexts, if the aggregator decodes ``mctx``; remembers the upload."""
        masks = _bool_entries(body)
        self.sent[round_no] = {k: Base(round_no, v) for k, v in masks.items()}
        for old in [r for r in self.sent if r < round_no - 8]:  # receipts that will never come
            del self.sent[old]
        if CONTEXT not in self.codings:
            return dict(body)
        consensus = {k: b.mask for k, b in self.consensus.items()}
        contexts = {}
        for name in masks:
            side = side_entry(consensus, name)
            contexts[name] = MaskContext(
                prev=self.accepted.get(name), side=None if side is None else self.consensus[side]
            )
        return with_contexts(body, contexts)

    def confirm(self, round_no: int) -> None:
        """The aggregator's receipt for the upload of ``round_no``: it holds those masks now."""
        uploads = self.sent.pop(round_no, None)
        if uploads is not None:
            self.accepted.update(uploads)

    def forget_accepted(self) -> None:
        """The aggregator said it does not hold our base (``missing_base``...): code the next in full."""
        self.accepted.clear()

    # state file (arrays only)
    def state_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for kind, books in (("consensus", self.consensus), ("accepted", self.accepted)):
            for name, base in books.items():
                out[f"{STATE_PREFIX}{kind}__{base.round}__{name}"] = np.packbits(base.mask, bitorder="little")
                out[f"{STATE_PREFIX}{kind}__{base.round}__{name}__n"] = np.array(base.mask.size)
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        for key, value in arrays.items():
            if not key.startswith(STATE_PREFIX) or key.endswith("__n"):
                continue
            kind, round_text, name = key[len(STATE_PREFIX) :].split("__", 2)
            n = int(arrays[key + "__n"])
            mask = np.unpackbits(np.asarray(value, dtype=np.uint8), bitorder="little")[:n].astype(bool)
            books = self.consensus if kind == "consensus" else self.accepted
            books[name] = Base(int(round_text), mask)


class ServerBases:
    """The aggregator's books: each announced body by round, each device's last accepted masks.

    In memory; the aggregator service backs ``device_masks`` with its store (subclass).
    """

    def __init__(self, keep_rounds: int = 64) -> None:
        self.announced: dict[int, dict[str, np.ndarray]] = {}  # round -> its mask entries
        self.keep_rounds = keep_rounds
        self._device_masks: dict[str, dict[str, Base]] = {}

    # per-device masks (overridden by the store-backed version)
    def device_masks(self, device: str) -> dict[str, Base]:
        return self._device_masks.get(device, {})

    def accept(self, device: str, round_no: int, body: Mapping[str, Coded]) -> None:
        """An update was accepted (committed): its masks are the device's bases from now on."""
        masks = _bool_entries(body)
        if masks:
            self._device_masks[device] = {k: Base(round_no, v) for k, v in masks.items()}

    def announce(self, round_no: int, body: Mapping[str, Coded] | None) -> None:
        self.announced[round_no] = _bool_entries(body)
        for old in [r for r in self.announced if r < round_no - self.keep_rounds]:
            del self.announced[old]

    def announced_body(self, round_no: int) -> dict[str, np.ndarray] | None:
        return self.announced.get(round_no)

    def uplink_bases(self, device: str) -> BodyBases:
        """Lookup for decoding ``device``'s update: its accepted masks, the consensus it names. The
        device's masks are looked up only if the update refers to them (a store read, when backed)."""

        def for_entry(name: str) -> BaseLookup:
            def lookup(role: str, ref: MaskRef) -> Base | None:
                if role == "prev":
                    return self.device_masks(device).get(name)
                body = self.announced_body(ref.round)
                if body is None:
                    # the consensus of the newest round we know, so a stale reference reads as stale
                    known = sorted(self.announced)
                    body_round = known[-1] if known else None
                    if body_round is None:
                        return None
                    body, round_no = self.announced[body_round], body_round
                else:
                    round_no = ref.round
                side = side_entry(body, name)
                return None if side is None else Base(round_no, body[side])

            return lookup

        return for_entry

    def downlink(self, round_no: int, body: Mapping[str, Coded] | None) -> dict[str, Coded] | None:
        """An announcement body coded against the previous announcement (what devices hold)."""
        if body is None:
            return None
        previous = self.announced_body(round_no - 1)
        if not previous:
            return dict(body)
        contexts = {
            name: MaskContext(prev=Base(round_no - 1, previous[name]))
            for name in _bool_entries(body)
            if name in previous
        }
        return with_contexts(body, contexts)

    def downlink_for(
        self, body: Mapping[str, Coded] | None, held: Mapping[str, Base]
    ) -> dict[str, Coded] | None:
        """An announcement body coded for one device against the consensus it holds (if we know it)."""
        if body is None:
            return None
        contexts = {}
        for name, base in held.items():
            known = self.announced_body(base.round)
            if known is not None and name in known and mask_digest(known[name]) == base.ref.digest:
                contexts[name] = MaskContext(prev=Base(base.round, known[name]))
        return with_contexts(body, contexts)
