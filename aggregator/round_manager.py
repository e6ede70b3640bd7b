"""The aggregator's round logic, with no network in it: messages in, decisions and messages out.

Rounds are asynchronous. A round opens with a retained announcement (round number, deadline, the
previous aggregate). It closes as soon as ``quorum`` updates are accepted, or at its deadline if at least
``min_updates`` arrived (otherwise the deadline is extended: the aggregator never waits forever, but it
never aggregates nothing either). An update trained from base round ``b`` that arrives while round ``r``
is open has staleness ``r - b``; it counts in round ``r`` weighted by ``(1 + staleness) ** -alpha`` up to
``staleness_bound``, and is refused past it. Every decision, accepted or not, is recorded in the store
*before* the caller acknowledges the message to the broker, so a crash loses nothing and a redelivered
message is recognised (idempotent by task, round, device, and by task, device, base round across rounds).

Group commit: ``on_update``, ``on_presence`` and ``reject`` decide at once but only add to a pending
batch; ``commit`` writes the batch in one transaction, and only then are its decisions final and may the
caller ack and answer the messages. Anything else that writes (results, ticks, opening and closing
rounds) needs an empty batch: the caller commits first (``must_commit`` says when a batch must close
early, at the quorum).

Pipelined commit: ``commit`` is ``take`` (the pending batch becomes the one committing), ``write`` (the
store transaction, which touches no state of the manager, so the caller may run it without its lock) and
``settle`` (count what was stored). While a batch is committing the next one is judged: duplicates and
replays are checked against both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import msgpack
import numpy as np

from fedmask.protocol import messages
from fedmask.protocol.errors import BENIGN_REJECTIONS, ProtocolError, Rejection
from fedmask.protocol.staleness import staleness_weight
from fedmask.protocol.tensor_codec import decode_coded_body, encode_body
from fedmask.protocol.topics import Topics
from fedmask.storage.records import NewPresence, NewRejection, NewUpdate
from fedmask.strategies import ClientUpdate, ServerHalf, TaskSpec, get_strategy

logger = logging.getLogger(__name__)

BENIGN_REASONS = frozenset(reason.value for reason in BENIGN_REJECTIONS)


@dataclass(frozen=True)
class Outbound:
    """A message the service must publish."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str | None = None
    detail: str = ""


@dataclass
class RoundTiming:
    """When a round opened and closed (``time.perf_counter``) and how long aggregating it took (s)."""

    opened: float
    closed: float | None = None
    aggregate_s: float | None = None  # stored updates decoded, aggregated, aggregate committed
    announce_s: float | None = None  # the next round opened and its announcement coded (not published)


@dataclass
class OpenRound:
    number: int
    deadline: float
    contributors: dict[str, int] = field(default_factory=dict)  # device -> staleness
    extensions: int = 0  # deadlines passed with fewer than min_updates


@dataclass(frozen=True)
class PendingUpdate:
    row: NewUpdate
    digest: str  # SHA-256 of the payload, as the store keys it
    topic: str


@dataclass
class PendingBatch:
    """Decisions taken and not yet committed: what ``RoundManager.commit`` writes in one transaction."""

    round_no: int | None = None  # the open round every pending update goes to
    updates: dict[str, PendingUpdate] = field(default_factory=dict)  # by device
    rejections: list[NewRejection] = field(default_factory=list)
    presences: list[NewPresence] = field(default_factory=list)  # written first, in arrival order

    def __len__(self) -> int:
        return len(self.updates) + len(self.rejections) + len(self.presences)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class RoundManager:
    """Owns the open round of one task; every method is called from one thread (the service's)."""

    def __init__(
        self,
        fleet: str,
        task: messages.Task,
        store,
        *,
        clock: Callable[[], float] = time.time,
        writer=None,
    ) -> None:
        self.fleet = fleet
        self.task = task
        self.topics = Topics(fleet)
        self.store = store
        # What runs a batch's transaction (``write``): the store, or a ``storage.writer.WriterProcess`` on it.
        self.writer = store if writer is None else writer
        self.clock = clock
        self.spec = TaskSpec.from_dict(
            {
                "strategy": task.strategy,
                "arch": task.arch,
                "num_classes": task.num_classes,
                "seed": task.seed,
                "arch_kwargs": task.arch_kwargs,
                "mask_config": task.mask_config,
                "hyper": task.hyper,
            }
        )
        self.schedule = task.schedule
        self.min_updates = int(task.hyper.get("min_updates", 1))
        self.finalize_deadline_s = float(task.hyper.get("finalize_deadline_s", 600.0))
        self.server: ServerHalf = get_strategy(task.strategy).server(self.spec)
        self.expected = self.server.expected_update()
        self.alpha = float(self.spec.h("staleness_alpha"))
        self.current: OpenRound | None = None
        self.global_body = self.server.initial_body()
        self.known_devices: set[str] = set()
        # The devices that joined this task (an accepted update in any of its rounds): the ones asked to
        # finalize and waited for. Not every device the fleet ever saw.
        self.participants: set[str] = set()
        # device -> (presence time from the message, status): what the retained state topics say.
        self.presence: dict[str, tuple[float, str]] = {}
        # Online devices that are not participants: the expected devices number len(participants) plus
        # these, kept up to date as both change (recounting the union cost time linear in the fleet
        # at every commit that added a participant: quadratic over a first round of lone updates).
        self._online_elsewhere: set[str] = set()
        self.finalizing = False
        self.finalize_deadline = 0.0
        self.results: set[str] = set()
        self.done = False
        self.outcome: str | None = None  # once done: "complete", or a one-line account of what is missing
        self.max_extensions = int(task.hyper.get("max_round_extensions", 10))
        self.timings: dict[int, RoundTiming] = {}  # rounds this process opened or resumed
        self.pending = PendingBatch()
        self.committing: PendingBatch | None = None  # taken, being written (see ``take``)
        self._close_due = False  # the quorum was reached while the next batch was pending
        # Participants of closed rounds (they never change), for the replay check of stale updates.
        self._closed_participants: dict[int, frozenset[str]] = {}
        # How an announced body travels: (round, body) -> body to encode (the service codes masks
        # against what the devices hold, aggregator.mask_books); by default as it is.
        self.encode_body: Callable[[int, Any], Any] = lambda round_no, body: body

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> list[Outbound]:
        """Register the task and resume from the store: the open round is rebuilt, not restarted."""
        self.store.register_task(
            self.fleet,
            self.task.task_id,
            spec=self.spec.to_dict(),
            seed=self.task.seed,
            weights_digest=self.task.weights_digest,
            strategy=self.task.strategy,
            arch=self.task.arch,
            schedule=dataclasses.asdict(self.schedule),
        )
        out = [Outbound(self.topics.task, messages.encode(self.task), retain=True)]
        for device in self.store.list_devices(self.fleet):
            self.known_devices.add(device.device_id)
            if device.presence is not None and device.presence_at is not None:
                self.presence[device.device_id] = (device.presence_at.timestamp(), device.presence)
        self.participants = self.store.task_participants(self.task.task_id)
        self._online_elsewhere = self.online() - self.participants
        self.results = {m.device_id for m in self.store.list_models(task_id=self.task.task_id)}
        latest = self.store.latest_round(self.task.task_id)
        self.store.set_task_state(self.task.task_id, "running")
        if latest is None:
            return out + self._open(1)
        if latest.round_no > 1 or latest.state == "closed":
            closed = latest.round_no if latest.state == "closed" else latest.round_no - 1
            aggregate = self.store.get_aggregate(self.task.task_id, closed)
            if aggregate is not None:
                self.global_body = unpack_body(aggregate)
        if latest.state == "closed":
            return out + self._after_close(latest.round_no)
        deadline = latest.deadline.timestamp()
        self.current = OpenRound(number=latest.round_no, deadline=deadline)
        self.timings[latest.round_no] = RoundTiming(opened=time.perf_counter())
        for update in self.store.accepted_updates(self.task.task_id, latest.round_no):
            self.current.contributors[update.device_id] = update.staleness
        logger.info(
            "resumed round %d with %d stored updates", latest.round_no, len(self.current.contributors)
        )
        return [*out, self._announcement()]

    def _require_committed(self) -> None:
        if self.pending or self.committing is not None:
            raise RuntimeError("the round manager has an uncommitted batch: commit() it first")

    def _open(self, number: int) -> list[Outbound]:
        self._require_committed()
        deadline = self.clock() + self.schedule.deadline_s
        self.current = OpenRound(number=number, deadline=deadline)
        self.timings[number] = RoundTiming(opened=time.perf_counter())
        self.store.open_round(self.task.task_id, number, quorum=self.schedule.quorum, deadline=_utc(deadline))
        logger.info(
            "round %d open (quorum %d, deadline in %.0fs)",
            number,
            self.schedule.quorum,
            self.schedule.deadline_s,
        )
        return [self._announcement()]

    def _announcement(self) -> Outbound:
        assert self.current is not None
        msg = messages.RoundAnnouncement(
            fleet=self.fleet,
            task_id=self.task.task_id,
            round=self.current.number,
            deadline=self.current.deadline,
            body=self.encode_body(self.current.number, self.global_body),
        )
        return Outbound(self.topics.round, messages.encode(msg), retain=True)

    def _after_close(self, closed: int) -> list[Outbound]:
        if closed >= self.schedule.rounds:
            return self._start_finalize()
        return self._open(closed + 1)

    def _start_finalize(self) -> list[Outbound]:
        self.current = None
        self.finalizing = True
        self.finalize_deadline = self.clock() + self.finalize_deadline_s
        self.store.set_task_state(self.task.task_id, "finalizing")
        waiting = sorted(self.participants - self.results)
        logger.info(
            "all %d rounds done: asking the task's %d participants to finalize (%d results already in)",
            self.schedule.rounds,
            len(self.participants),
            len(self.participants & self.results),
        )
        directives = [self.finalize_directive(device) for device in waiting]
        out = [self._final_announcement(), *directives]
        self._check_done()
        return out

    def _final_announcement(self) -> Outbound:
        """The last round's aggregate, announced as round ``rounds + 1``: devices finalize from it and
        never train on it. Published before the finalize directives, so a device has it in time."""
        msg = messages.RoundAnnouncement(
            fleet=self.fleet,
            task_id=self.task.task_id,
            round=self.schedule.rounds + 1,
            deadline=self.finalize_deadline,
            body=self.encode_body(self.schedule.rounds + 1, self.global_body),
        )
        return Outbound(self.topics.round, messages.encode(msg), retain=True)

    def retained(self) -> list[Outbound]:
        """The retained messages the broker should hold now: the task, and the open round's announcement
        (or the final one). Published again whenever they may be missing (see the service)."""
        out = [Outbound(self.topics.task, messages.encode(self.task), retain=True)]
        if self.current is not None:
            out.append(self._announcement())
        elif self.finalizing:
            out.append(self._final_announcement())
        return out

    def finalize_directive(self, device: str) -> Outbound:
        """Tells a device to build its personalized model (queued by its persistent session if offline)."""
        msg = messages.Directive(
            fleet=self.fleet, kind="finalize", task_id=self.task.task_id, round=self.schedule.rounds
        )
        return Outbound(self.topics.down(device), messages.encode(msg))

    def tick(self) -> list[Outbound]:
        """Called periodically: closes the round at its deadline, extends it if nobody answered."""
        self._require_committed()
        now = self.clock()
        if self.finalizing:
            if now >= self.finalize_deadline and not self.done:
                missing = sorted(self.participants - self.results)
                self._finish(
                    f"finalization deadline passed without the personalized model of {len(missing)} of the "
                    f"task's {len(self.participants)} participants: {', '.join(missing)}"
                )
            return []
        if self.current is None or now < self.current.deadline or self.done:
            return []
        if len(self.current.contributors) >= self.min_updates:
            return self._close("deadline")
        if self.current.extensions >= self.max_extensions:
            self._finish(
                f"round {self.current.number} got {len(self.current.contributors)} updates (it closes at a "
                f"deadline with {self.min_updates}) through {self.current.extensions + 1} deadlines; "
                f"giving up (missing: {', '.join(self.missing()) or 'no device is expected'})"
            )
            return []
        self.current.extensions += 1
        self.current.deadline = now + self.schedule.deadline_s
        # The quorum closes a round early; at its deadline, min_updates (hyper, default 1) are enough.
        got = len(self.current.contributors)
        logger.warning(
            "round %d: %s by its deadline (quorum %d); deadline extended (%d of %d; missing: %s)",
            self.current.number,
            "no update" if got == 0 else f"{got} updates, fewer than min_updates {self.min_updates},",
            self.needed(),
            self.current.extensions,
            self.max_extensions,
            ", ".join(self.missing()) or "no device is expected",
        )
        return [self._announcement()]

    def _finish(self, problem: str | None) -> None:
        self.done = True
        self.outcome = "complete" if problem is None else problem
        self.store.set_task_state(self.task.task_id, "done" if problem is None else "failed", problem)
        if problem is None:
            logger.info(
                "task %s complete: every participant reported its personalized model", self.task.task_id
            )
        else:
            logger.error("task %s: %s", self.task.task_id, problem)

    def _check_done(self) -> None:
        if self.finalizing and not self.done and self.participants <= self.results:
            self._finish(None)

    def online(self) -> set[str]:
        return {device for device, (_, status) in self.presence.items() if status == "online"}

    def expected_devices(self) -> set[str]:
        """Who a round of this task waits for: its participants so far and the devices online now."""
        return self.participants | self.online()

    def missing(self) -> list[str]:
        """Expected devices with no update in the open round."""
        contributors = self.current.contributors if self.current is not None else {}
        return sorted(self.expected_devices() - set(contributors))

    def needed(self) -> int:
        """Updates that close the open round before its deadline: ``quorum``, or ``quorum_fraction``
        of the expected devices (rounded up) when that is more. Asked at every commit: O(1)."""
        expected = len(self.participants) + len(self._online_elsewhere)
        share = math.ceil(self.schedule.quorum_fraction * expected - 1e-9)
        return max(self.schedule.quorum, share)

    def _join(self, device: str) -> None:
        """``device`` has an accepted update of this task: a participant from now on."""
        self.participants.add(device)
        self._online_elsewhere.discard(device)

    def _close(self, closed_by: str) -> list[Outbound]:
        assert self.current is not None
        self._require_committed()
        number = self.current.number
        started = time.perf_counter()
        stored = sorted(self.store.accepted_updates(self.task.task_id, number), key=lambda u: u.device_id)
        updates = [
            ClientUpdate(
                device_id=u.device_id,
                body=stored_body(u.payload),
                num_samples=u.num_samples,
                staleness=u.staleness,
                weight=u.weight,
            )
            for u in stored
        ]
        body = self.server.aggregate(updates, number)
        aggregate = pack_body(body)
        self.store.close_round(self.task.task_id, number, aggregate=aggregate, closed_by=closed_by)
        self.global_body = unpack_body(aggregate)
        closed = time.perf_counter()
        if number in self.timings:
            self.timings[number].closed = closed
            self.timings[number].aggregate_s = closed - started
        missing = self.missing()
        logger.info(
            "round %d closed by %s with %d updates (aggregated in %.0f ms); missing: %s",
            number,
            closed_by,
            len(updates),
            (closed - started) * 1e3,
            ", ".join(missing) or "nobody",
        )
        out = self._after_close(number)
        if number in self.timings:
            self.timings[number].announce_s = time.perf_counter() - closed
        return out

    # ----- inbound -----------------------------------------------------------------------------

    def on_presence(self, device: str, presence: messages.Presence) -> list[Outbound]:
        """Judge a presence at the time the message carries, not when it arrived: a retained presence
        replayed to a restarted aggregator is old news. It counts at once (the device is known, an
        update after it in the same batch is accepted) and is stored by the next ``commit``, before the
        batch's updates. A participant coming online while the task is finalizing without its result
        is sent the finalize directive again (it may have consumed the first one and crashed, or the
        broker may have lost it): returned, to publish after the commit."""
        self.known_devices.add(device)
        now = self.clock()
        at = min(presence.at, now) if presence.at > 0 else now
        self.pending.presences.append(
            NewPresence(
                self.fleet,
                device,
                presence=presence.status,
                seen_at=_utc(at),
                # An offline presence (a will) carries none: it must not erase the online one's.
                capabilities=storable(presence.capabilities) if presence.status == "online" else None,
            )
        )
        previous = self.presence.get(device)
        if previous is None or previous[0] <= at:  # the store's rule: the newest presence wins
            self.presence[device] = (at, presence.status)
            if presence.status == "online" and device not in self.participants:
                self._online_elsewhere.add(device)
            else:
                self._online_elsewhere.discard(device)
        if (
            presence.status == "online"
            and self.finalizing
            and not self.done
            and device in self.participants
            and device not in self.results
        ):
            logger.info("%s is online without its personalized model: finalize directive sent again", device)
            return [self.finalize_directive(device)]
        return []

    def reject(
        self, reason: Rejection | str, detail: str, *, device: str | None, topic: str, size: int
    ) -> Decision:
        """Refuse a message: recorded by the next ``commit``."""
        reason = str(getattr(reason, "value", reason))
        # Redelivery noise (a frame or an update seen twice) is recorded too, but is no cause for alarm.
        level = logging.DEBUG if reason in BENIGN_REASONS else logging.WARNING
        logger.log(level, "rejected message from %s on %s: %s (%s)", device or "?", topic, reason, detail)
        self.pending.rejections.append(
            NewRejection(
                self.fleet,
                reason=reason,
                detail=detail,
                task_id=self.task.task_id,
                round_no=self.current.number if self.current else None,
                device_id=device,
                topic=topic,
                payload_size=size,
            )
        )
        return Decision(False, reason, detail)

    def on_update(
        self,
        device: str,
        update: messages.Update,
        payload: bytes,
        topic: str,
        masks: tuple[int, dict[str, tuple[int, str, bytes]]] | None = None,
    ) -> tuple[Decision, list[Outbound]]:
        """Validate one decoded update and add it to the pending batch; the decision is final once
        ``commit`` has run (which may correct it, see there). ``masks``: mask bases stored with it
        (``StoredBases.mask_rows``), as references to ``payload``: it must carry them in full coding."""
        digest = hashlib.sha256(payload).hexdigest()
        own = update.device == device and update.task_id == self.task.task_id
        twin = None
        if own:
            twin = self.pending.updates.get(device)
            if twin is None and self.committing is not None:
                twin = self.committing.updates.get(device)
        if twin is not None and twin.row.base_round == update.base_round and twin.digest == digest:
            return Decision(True, None, "duplicate delivery"), []  # one row, both answered
        if self.finalizing and update.task_id == self.task.task_id:
            if own and (copy := self._stored_copy(device, update, digest)) is not None:
                return copy, []
            # A device that missed the end of the run (it was offline): tell it to finalize.
            decision = self.reject(
                Rejection.ROUND_CLOSED, "the run is finalizing", device=device, topic=topic, size=len(payload)
            )
            return decision, [self.finalize_directive(device)]
        try:
            weight, staleness = self._check(device, update)
        except ProtocolError as exc:
            # The idempotency key of an update is (task, device, base round), whatever round stored it:
            # a device that lost its receipt republishes the same bytes, maybe rounds later. Looked up
            # only for a refused update; a new one that is already stored conflicts in the store.
            if own and (copy := self._stored_copy(device, update, digest)) is not None:
                return copy, []
            return self.reject(exc.reason, exc.detail, device=device, topic=topic, size=len(payload)), []
        assert self.current is not None
        row = NewUpdate(
            device,
            base_round=update.base_round,
            staleness=staleness,
            weight=weight,
            num_samples=update.num_samples,
            payload=payload,
            metrics=dict(update.metrics),
            # The store keeps a reference to the payload, which carries the bits (in full coding).
            masks=None if masks is None else (masks[0], {e: row[:2] for e, row in masks[1].items()}),
            payload_sha256=digest,
        )
        self.pending.round_no = self.current.number
        self.pending.updates[device] = PendingUpdate(row, digest, topic)
        return Decision(True), []

    def must_commit(self) -> bool:
        """Whether the pending updates reach the quorum: commit now, the round closes."""
        if self._close_due:
            return True
        committing = len(self.committing.updates) if self.committing is not None else 0
        return (
            self.current is not None
            and bool(self.pending.updates)
            and len(self.current.contributors) + committing + len(self.pending.updates) >= self.needed()
        )

    def commit(self) -> tuple[dict[str, Decision], list[Outbound]]:
        """Write the pending batch in one transaction; then count its updates and close the round at
        the quorum. Returns the decisions that changed (by device: an update another worker stored
        meanwhile, rare) and what to publish. On an error nothing of the batch is stored or counted."""
        batch = self.take()
        try:
            created = self.write(batch)
        except BaseException:
            self.committing = None
            raise
        return self.settle(batch, created)

    def take(self) -> PendingBatch:
        """The pending batch becomes the committing one (at most one at a time); a new one opens."""
        if self.committing is not None:
            raise RuntimeError("a batch is already committing: settle() it first")
        self.committing, self.pending = self.pending, PendingBatch()
        return self.committing

    def write(self, batch: PendingBatch) -> list[bool]:
        """The batch's one transaction. Reads and writes only the store: safe without the caller's lock."""
        items = list(batch.updates.values())
        if not items and not batch.rejections and not batch.presences:
            return []
        return self.writer.record_batch(
            self.task.task_id,
            batch.round_no,
            [item.row for item in items],
            batch.rejections,
            presences=batch.presences,
        )

    def settle(self, batch: PendingBatch, created: list[bool]) -> tuple[dict[str, Decision], list[Outbound]]:
        """Count the written batch (``write``'s result); see ``commit``."""
        self.committing = None
        corrections: dict[str, Decision] = {}
        counted = False
        # A correction may itself record a rejection: written before its answer, apart from the next batch.
        following, self.pending = self.pending, PendingBatch()
        try:
            for (device, item), stored in zip(batch.updates.items(), created, strict=True):
                if stored:
                    assert self.current is not None and self.current.number == batch.round_no
                    self.current.contributors[device] = item.row.staleness
                    self._join(device)
                    counted = True
                else:  # stored meanwhile (another worker, or an earlier round): judge it like any stored
                    corrections[device] = self._stored_meanwhile(device, item, batch.round_no)
            if self.pending.rejections:
                self.store.record_batch(None, None, (), self.pending.rejections)
        finally:
            self.pending = following
        due = counted or self._close_due
        if due and self.current is not None and len(self.current.contributors) >= self.needed():
            if self.pending:  # judged meanwhile: the caller commits it (``must_commit``), then we close
                self._close_due = True
                return corrections, []
            self._close_due = False
            return corrections, self._close("quorum")
        self._close_due = False
        return corrections, []

    def abandon(self) -> None:
        """The committing batch failed: forget it and the batch judged meanwhile (it may count on the
        failed one, a twin or a replay). Nothing of either is answered: the devices send them again."""
        self.committing = None
        self.pending = PendingBatch()
        self._close_due = False

    def _stored_meanwhile(self, device: str, item: PendingUpdate, round_no: int | None) -> Decision:
        base_round, size = item.row.base_round, len(item.row.payload)
        stored = self.store.find_update(self.task.task_id, device, base_round)
        if stored is None:
            return self.reject(
                Rejection.REPLAYED_UPDATE,
                f"{device} already contributed to round {round_no}",
                device=device,
                topic=item.topic,
                size=size,
            )
        return self._already_stored(device, base_round, item.digest, item.topic, size, stored)

    def _stored_copy(self, device: str, update: messages.Update, digest: str) -> Decision | None:
        """The original receipt again if these very bytes are stored (any round); else None."""
        stored = self.store.find_update(self.task.task_id, device, update.base_round)
        if stored is None or stored[1] != digest:
            return None
        return self._already_stored(device, update.base_round, digest, "", 0, stored)

    def _already_stored(
        self, device: str, base_round: int, digest: str, topic: str, size: int, stored: tuple[int, str]
    ) -> Decision:
        """An update whose (task, device, base round) is stored: the same bytes get the original receipt
        again (nothing is stored twice); different bytes are a replay."""
        round_no, stored_digest = stored
        if stored_digest == digest:
            logger.debug(
                "%s republished its base-round-%d update (stored in round %d): receipt sent again",
                device,
                base_round,
                round_no,
            )
            if self.current is not None and round_no == self.current.number:
                self.current.contributors.setdefault(device, self.current.number - base_round)
            self._join(device)
            return Decision(True, None, "duplicate delivery")
        return self.reject(
            Rejection.REPLAYED_UPDATE,
            f"{device} already has an update from base round {base_round} (stored in round {round_no})",
            device=device,
            topic=topic,
            size=size,
        )

    def _check(self, device: str, update: messages.Update) -> tuple[float, int]:
        """The update's staleness weight and staleness, or ``ProtocolError`` with the specific reason."""

        def refuse(reason: Rejection, detail: str) -> ProtocolError:
            return ProtocolError(reason, detail)

        if update.device != device:
            raise refuse(Rejection.DEVICE_MISMATCH, f"payload says {update.device!r}, topic says {device!r}")
        if device not in self.known_devices:
            raise refuse(Rejection.UNKNOWN_DEVICE, f"{device!r} has not announced itself on its state topic")
        if update.task_id != self.task.task_id:
            raise refuse(Rejection.WRONG_TASK, f"task {update.task_id!r}, current task {self.task.task_id!r}")
        if self.current is None:
            raise refuse(Rejection.ROUND_CLOSED, "no round is open")
        if update.round > self.current.number:
            raise refuse(
                Rejection.FUTURE_ROUND, f"round {update.round}, the open round is {self.current.number}"
            )
        weight = staleness_weight(
            self.current.number, update.base_round, bound=self.schedule.staleness_bound, alpha=self.alpha
        )
        committing = self.committing.updates if self.committing is not None else {}
        if device in self.current.contributors or device in self.pending.updates or device in committing:
            raise refuse(
                Rejection.REPLAYED_UPDATE, f"{device} already contributed to round {self.current.number}"
            )
        if update.round < self.current.number and device in self._participants_of(update.round):
            raise refuse(Rejection.REPLAYED_UPDATE, f"{device} already contributed to round {update.round}")
        problem = self._check_body(update)
        if problem is not None:
            raise refuse(Rejection.WRONG_BODY, problem)
        return weight, self.current.number - update.base_round

    def _participants_of(self, closed_round: int) -> frozenset[str]:
        if closed_round not in self._closed_participants:
            earlier = self.store.get_round(self.task.task_id, closed_round)
            participants = frozenset(earlier.participants) if earlier is not None else frozenset()
            if earlier is None or earlier.state != "closed":
                return participants  # (not cached: only a closed round never changes)
            if len(self._closed_participants) >= 64:
                self._closed_participants.clear()
            self._closed_participants[closed_round] = participants
        return self._closed_participants[closed_round]

    def _check_body(self, update: messages.Update) -> str | None:
        if self.expected is None:
            return None
        body = update.body
        if set(body) != set(self.expected):
            return f"body has {sorted(body)}, expected {sorted(self.expected)}"
        for name, shape in self.expected.items():
            coded = body[name]  # (masks stay packed: shape and coding say enough)
            if coded.shape != tuple(shape):
                return f"{name} has shape {coded.shape}, expected {tuple(shape)}"
            array = None if coded.coding == "bits" else coded.array
            if array is not None and array.dtype.kind == "f" and not np.isfinite(array).all():
                return f"{name} holds NaN or infinity"
        return None

    def on_result(self, device: str, result: messages.Result, payload: bytes, topic: str) -> Decision:
        """Store a device's personalized model at once (rare and large: not batched)."""
        self._require_committed()
        size = len(payload)
        if result.device != device:
            return self.reject(
                Rejection.DEVICE_MISMATCH, "result for another device", device=device, topic=topic, size=size
            )
        if result.task_id != self.task.task_id:
            return self.reject(
                Rejection.WRONG_TASK, f"task {result.task_id!r}", device=device, topic=topic, size=size
            )
        m = result.metrics
        self.store.save_personalized_model(
            self.task.task_id,
            device,
            mask=result.mask,
            weights=result.weights,
            tflite=result.tflite,
            accuracy=float(m["accuracy"]),
            latency_ms=float(m["latency_ms"]),
            size_bytes=int(m["size_bytes"]),
            peak_rss_bytes=int(m["peak_rss_bytes"]),
            num_test=int(m["num_test"]),
            density=float(m["density"]),
            metrics=dict(m),
        )
        self.results.add(device)
        self._check_done()
        return Decision(True)


def storable(value: Any) -> Any:
    """Capabilities as JSON can hold them: bytes (a device's consensus digest) as hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [storable(item) for item in value]
    if isinstance(value, dict):
        return {key: storable(item) for key, item in value.items()}
    return value


def stored_body(payload: bytes) -> dict[str, np.ndarray]:
    """The arrays of a stored update. Only the body is decoded: the whole message was validated
    (checksum included) before it was stored, and the store checks its SHA-256 on every read."""
    return {k: c.array for k, c in decode_coded_body(msgpack.unpackb(payload, raw=False)["body"]).items()}


def pack_body(body) -> bytes:
    """A global body as stored bytes (the same coded arrays the round announcement carries)."""
    return msgpack.packb(encode_body(body or {}), use_bin_type=True)


def unpack_body(data: bytes):
    return decode_coded_body(msgpack.unpackb(data, raw=False))
