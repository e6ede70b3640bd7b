"""The aggregator's round logic, with no network in it: messages in, decisions and messages out.

Rounds are asynchronous. A round opens with a retained announcement (round number, deadline, the
previous aggregate). It closes as soon as ``quorum`` updates are accepted, or at its deadline if at least
``min_updates`` arrived (otherwise the deadline is extended: the aggregator never waits forever, but it
never aggregates nothing either). An update trained from base round ``b`` that arrives while round ``r``
is open has staleness ``r - b``; it counts in round ``r`` weighted by ``(1 + staleness) ** -alpha`` up to
``staleness_bound``, and is refused past it. Every decision, accepted or not, is recorded in the store
*before* the caller acknowledges the message to the broker, so a crash loses nothing and a redelivered
message is recognised (idempotent by task, round, device).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from fedmask.protocol import messages
from fedmask.protocol.messages import ProtocolError, Rejection
from fedmask.protocol.tensor_codec import CodecError, decode_body
from fedmask.protocol.topics import Topics
from fedmask.strategies import ClientUpdate, ServerHalf, TaskSpec, get_strategy
from fedmask.strategies.training import staleness_weight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    rounds: int
    quorum: int
    deadline_s: float = 60.0
    min_updates: int = 1
    staleness_bound: int = 2
    finalize_deadline_s: float = 300.0

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


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
class OpenRound:
    number: int
    deadline: float
    contributors: dict[str, int] = field(default_factory=dict)  # device -> staleness


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
    ) -> None:
        self.fleet = fleet
        self.task = task
        self.topics = Topics(fleet)
        self.store = store
        self.clock = clock
        self.spec = TaskSpec.from_dict(
            {
                "strategy": task.strategy,
                "arch": task.arch,
                "num_classes": task.num_classes,
                "seed": task.seed,
                "arch_kwargs": task.hyper.get("arch_kwargs", {}),
                "mask_config": task.mask_config,
                "hyper": task.hyper,
            }
        )
        self.schedule = Schedule.from_dict(task.schedule)
        self.server: ServerHalf = get_strategy(task.strategy).server(self.spec)
        self.expected = self.server.expected_update()
        self.alpha = float(self.spec.h("staleness_alpha"))
        self.current: OpenRound | None = None
        self.global_body = self.server.initial_body()
        self.known_devices: set[str] = set()
        self.finalizing = False
        self.finalize_deadline = 0.0
        self.results: set[str] = set()
        self.done = False

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
        )
        out = [Outbound(self.topics.task, messages.encode(self.task), retain=True)]
        latest = self.store.latest_round(self.task.task_id)
        if latest is None:
            return out + self._open(1)
        if latest.round_no > 1 or latest.state == "closed":
            closed = latest.round_no if latest.state == "closed" else latest.round_no - 1
            aggregate = self.store.get_aggregate(self.task.task_id, closed)
            if aggregate is not None:
                self.global_body = messages.decode_stored_body(aggregate)
        if latest.state == "closed":
            return out + self._after_close(latest.round_no)
        deadline = latest.deadline.timestamp()
        self.current = OpenRound(number=latest.round_no, deadline=deadline)
        for update in self.store.accepted_updates(self.task.task_id, latest.round_no):
            self.current.contributors[update.device_id] = update.staleness
        logger.info(
            "resumed round %d with %d stored updates", latest.round_no, len(self.current.contributors)
        )
        return out + [self._announcement()]

    def _open(self, number: int) -> list[Outbound]:
        deadline = self.clock() + self.schedule.deadline_s
        self.current = OpenRound(number=number, deadline=deadline)
        self.store.open_round(self.task.task_id, number, quorum=self.schedule.quorum, deadline=_utc(deadline))
        logger.info("round %d open (quorum %d, deadline in %.0fs)", number, self.schedule.quorum, self.schedule.deadline_s)
        return [self._announcement()]

    def _announcement(self) -> Outbound:
        assert self.current is not None
        msg = messages.RoundAnnouncement(
            fleet=self.fleet,
            task_id=self.task.task_id,
            round=self.current.number,
            deadline=self.current.deadline,
            body=self.global_body,
        )
        return Outbound(self.topics.round, messages.encode(msg), retain=True)

    def _after_close(self, closed: int) -> list[Outbound]:
        if closed >= self.schedule.rounds:
            return self._start_finalize()
        return self._open(closed + 1)

    def _start_finalize(self) -> list[Outbound]:
        self.current = None
        self.finalizing = True
        self.finalize_deadline = self.clock() + self.schedule.finalize_deadline_s
        logger.info("all %d rounds done: asking %d devices to finalize", self.schedule.rounds, len(self.known_devices))
        msg = messages.RoundAnnouncement(
            fleet=self.fleet,
            task_id=self.task.task_id,
            round=self.schedule.rounds + 1,
            deadline=self.finalize_deadline,
            body=self.global_body,
            finalize=True,
        )
        return [Outbound(self.topics.round, messages.encode(msg), retain=True)]

    def tick(self) -> list[Outbound]:
        """Called periodically: closes the round at its deadline, extends it if nobody answered."""
        now = self.clock()
        if self.finalizing:
            if now >= self.finalize_deadline and not self.done:
                logger.warning("finalization deadline passed with %d results", len(self.results))
                self.done = True
            return []
        if self.current is None or now < self.current.deadline:
            return []
        if len(self.current.contributors) >= self.schedule.min_updates:
            return self._close("deadline")
        self.current.deadline = now + self.schedule.deadline_s
        logger.warning("round %d: no updates by the deadline; extended", self.current.number)
        return [self._announcement()]

    def _close(self, closed_by: str) -> list[Outbound]:
        assert self.current is not None
        number = self.current.number
        stored = sorted(self.store.accepted_updates(self.task.task_id, number), key=lambda u: u.device_id)
        updates = [
            ClientUpdate(
                device_id=u.device_id,
                body=decode_body(messages.decode(u.payload, messages.Update).body),
                num_samples=u.num_samples,
                staleness=u.staleness,
                weight=u.weight,
            )
            for u in stored
        ]
        body = self.server.aggregate(updates, number)
        aggregate = messages.encode_stored_body(body)
        self.store.close_round(self.task.task_id, number, aggregate=aggregate, closed_by=closed_by)
        self.global_body = messages.decode_stored_body(aggregate)
        logger.info("round %d closed by %s with %d updates", number, closed_by, len(updates))
        return self._after_close(number)

    # ----- inbound -----------------------------------------------------------------------------

    def on_presence(self, device: str, presence: messages.Presence) -> None:
        self.known_devices.add(device)
        self.store.upsert_device(
            self.fleet,
            device,
            capabilities=presence.capabilities,
            presence=presence.status,
            seen_at=_utc(self.clock()),
        )

    def reject(self, reason: Rejection | str, detail: str, *, device: str | None, topic: str, size: int) -> Decision:
        reason = str(getattr(reason, "value", reason))
        logger.warning("rejected message from %s on %s: %s (%s)", device or "?", topic, reason, detail)
        self.store.record_rejection(
            self.fleet,
            reason=reason,
            detail=detail,
            task_id=self.task.task_id,
            round_no=self.current.number if self.current else None,
            device_id=device,
            topic=topic,
            payload_size=size,
        )
        return Decision(False, reason, detail)

    def on_update(self, device: str, payload: bytes, topic: str) -> tuple[Decision, list[Outbound]]:
        """Validate, store (committed) and count one update; the caller acks after this returns."""
        size = len(payload)
        try:
            update = messages.decode(payload, messages.Update)
        except ProtocolError as exc:
            return self.reject(exc.reason, exc.detail, device=device, topic=topic, size=size), []
        problem = self._check(device, update)
        if problem is not None:
            return self.reject(problem[0], problem[1], device=device, topic=topic, size=size), []
        assert self.current is not None
        staleness = self.current.number - update.base_round
        weight = staleness_weight(staleness, self.alpha)
        created = self.store.record_update(
            self.task.task_id,
            self.current.number,
            device,
            base_round=update.base_round,
            staleness=staleness,
            weight=weight,
            num_samples=update.num_samples,
            payload=payload,
            metrics=dict(update.metrics),
        )
        if not created:
            # A redelivery of what we already stored (e.g. the broker resent it after our crash): ack it.
            return Decision(True, None, "duplicate delivery"), []
        self.current.contributors[device] = staleness
        out: list[Outbound] = []
        if len(self.current.contributors) >= self.schedule.quorum:
            out = self._close("quorum")
        return Decision(True), out

    def _check(self, device: str, update: messages.Update) -> tuple[Rejection, str] | None:
        if update.fleet != self.fleet:
            return Rejection.WRONG_FLEET, f"fleet {update.fleet!r}, this aggregator serves {self.fleet!r}"
        if update.device != device:
            return Rejection.DEVICE_MISMATCH, f"payload says {update.device!r}, topic says {device!r}"
        if device not in self.known_devices:
            return Rejection.UNKNOWN_DEVICE, f"{device!r} has not announced itself on its state topic"
        if update.task_id != self.task.task_id:
            return Rejection.WRONG_TASK, f"task {update.task_id!r}, current task {self.task.task_id!r}"
        if self.current is None:
            return Rejection.ROUND_CLOSED, "no round is open (the run is finalizing)"
        if update.round > self.current.number or update.base_round > self.current.number:
            return Rejection.FUTURE_ROUND, f"round {update.round}, current round {self.current.number}"
        staleness = self.current.number - update.base_round
        if staleness > self.schedule.staleness_bound:
            return Rejection.STALE_ROUND, f"staleness {staleness} exceeds the bound {self.schedule.staleness_bound}"
        if device in self.current.contributors and update.round == self.current.number:
            stored = {u.device_id: u for u in self.store.accepted_updates(self.task.task_id, self.current.number)}
            previous = stored.get(device)
            if previous is not None and previous.payload != messages.encode(update):
                return Rejection.REPLAYED_UPDATE, f"{device} already contributed to round {self.current.number}"
        elif device in self.current.contributors:
            return Rejection.REPLAYED_UPDATE, f"{device} already contributed to round {self.current.number}"
        problem = self._check_body(update)
        if problem is not None:
            return Rejection.WRONG_BODY, problem
        return None

    def _check_body(self, update: messages.Update) -> str | None:
        if self.expected is None:
            return None
        try:
            body = decode_body(update.body)
        except CodecError as exc:
            return f"{exc.reason}: {exc.detail}"
        if set(body) != set(self.expected):
            return f"body has {sorted(body)}, expected {sorted(self.expected)}"
        for name, shape in self.expected.items():
            if tuple(body[name].shape) != tuple(shape):
                return f"{name} has shape {tuple(body[name].shape)}, expected {tuple(shape)}"
            if body[name].dtype.kind == "f" and not np.isfinite(body[name]).all():
                return f"{name} holds NaN or infinity"
        return None

    def on_result(self, device: str, payload: bytes, topic: str) -> Decision:
        try:
            result = messages.decode(payload, messages.Result)
        except ProtocolError as exc:
            return self.reject(exc.reason, exc.detail, device=device, topic=topic, size=len(payload))
        if result.device != device:
            return self.reject(Rejection.DEVICE_MISMATCH, "result for another device", device=device, topic=topic, size=len(payload))
        if result.task_id != self.task.task_id:
            return self.reject(Rejection.WRONG_TASK, f"task {result.task_id!r}", device=device, topic=topic, size=len(payload))
        m = result.metrics
        self.store.save_personalized_model(
            self.task.task_id,
            device,
            mask=result.mask,
            weights=result.weights,
            tflite=result.tflite,
            accuracy=float(m.get("accuracy", math.nan)),
            latency_ms=float(m.get("latency_ms", math.nan)),
            size_bytes=int(m.get("size_bytes", len(result.tflite))),
            peak_rss_bytes=int(m.get("peak_rss_bytes", 0)),
            metrics=dict(m),
        )
        self.results.add(device)
        if self.finalizing and self.known_devices and self.results >= self.known_devices:
            self.done = True
        return Decision(True)


def payload_digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()
