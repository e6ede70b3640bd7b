"""The aggregator service: the round manager wired to MQTT.

One MQTT session (persistent, manual acknowledgements) subscribes to every device's uplink and presence.
Handlers run on the transport's single worker thread, a ticker thread checks deadlines and a flusher
thread closes batches; all go through one lock, so the round manager never sees two things at once.

Group commit: each whole message is decoded and judged as it arrives (the round manager's decision),
and waits in a batch; a batch is committed to the store in one transaction when it holds
``batch_max`` messages, when its first message has waited ``batch_wait_s``, or at once when it reaches
the round's quorum. Only then are its messages acknowledged to the broker and answered with a
``receipt`` (or ``rejected``) directive: nothing is acked or receipted before it is durable, and a
crash before the commit leaves every message of the batch unacked, so the broker delivers it again.
Presence messages join the same batches (acked after the commit, no receipt): their devices are written
in the batch's transaction, before its updates, so a reconnection storm costs a few transactions, not
one per device; what a presence calls for (a finalize directive, an announcement copy) is published
after the commit.
Pipelined: the flusher thread writes a batch without holding the lock, while the next batch is judged
(against both: a twin or a replay of a committing update is recognised); it retakes the lock to count,
ack and answer. Anything else that writes waits for that commit first. So under load a batch grows to
what arrived during the previous commit, up to ``batch_max`` (then judging waits for the flusher).
If a commit fails, the batch judged meanwhile is dropped too (acked, never answered; the devices send
it again). ``batch_max=1`` turns batching off: each message is committed, acked and answered in its
handler (the baseline of ``benchmarks/ingest.py``).
Frames of a chunked message are acknowledged as they arrive, except the one that completes it: the
broker sends a client at most ``max_inflight_messages`` unacknowledged messages, so holding every frame
would stall delivery. A frame lost in a crash is covered end to end: the device republishes its message
(same bytes) until it has a receipt, and the store is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time

import msgpack

from fedmask.aggregator.mask_books import StoredBases, refused_update
from fedmask.aggregator.round_manager import Decision, Outbound, RoundManager
from fedmask.protocol import messages
from fedmask.protocol.chunking import Reassembler, publications, wire_size
from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.faults import kill_point
from fedmask.protocol.mask_bases import plain
from fedmask.protocol.mask_coding import MASK_CODINGS
from fedmask.protocol.tensor_codec import MAX_ELEMENTS
from fedmask.protocol.topics import Topics
from fedmask.protocol.transport import MqttConnection, ReceivedMessage, TransportError
from fedmask.storage.writer import WriterProcess

logger = logging.getLogger(__name__)

DUPLICATE = "duplicate delivery"  # the detail of a decision that answers an update already stored
# How long anything that writes waits for the flusher's commit before it gives up with an error.
COMMIT_WAIT_S = 60.0
# Batches of 512 beat 256 in every paired run of benchmarks/ingest.py (SQLite +3-35%, PostgreSQL +3-51%:
# the commit's fixed cost, and the broker's wait for acks, spread over more updates); 768 gained nothing.
DEFAULT_BATCH_MAX = 512
MAX_UNCONFIRMED = 4096  # receipts published and not yet confirmed by the broker, before the flusher waits
STORE_WRITERS = ("thread", "process")  # where a batch's SQL runs: the flusher thread, or a child process


class CommitStalled(RuntimeError):
    """The flusher's commit did not finish in time (a database that hangs): nothing else can write."""


@dataclasses.dataclass
class _Waiting:
    """A message judged and waiting for its batch's commit; then acked and (with a receipt) answered."""

    message: ReceivedMessage
    started: float  # perf_counter at delivery
    device: str | None = None
    decision: Decision | None = None  # None: acked only (nothing to answer)
    round_no: int = 0  # what the receipt names
    detail: str = ""
    update: messages.Update | None = None  # a decoded update (for the mask books once it is stored)
    masks: tuple | None = None  # its mask rows (``StoredBases.mask_rows``)
    wire_bytes: int = 0


class AggregatorService:
    def __init__(
        self,
        broker,  # one URL or several (the nodes of one cluster, see MqttConnection)
        fleet: str,
        task: messages.Task,
        store,
        *,
        protocol: str = "5",
        client_id: str | None = None,
        tick_s: float = 0.2,
        shared_group: str | None = None,
        reassembly_timeout_s: float = 120.0,
        republish_task_s: float = 60.0,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_wait_s: float = 0.005,
        commit_wait_s: float = COMMIT_WAIT_S,
        store_writer: str = "process",
    ) -> None:
        if batch_max < 1 or batch_wait_s < 0:
            raise ValueError(f"batch_max must be >= 1 and batch_wait_s >= 0, got {batch_max}, {batch_wait_s}")
        self.fleet = fleet
        self.topics = Topics(fleet)
        if not task.codings:  # tell the devices which mask codings we decode
            task = dataclasses.replace(task, codings=list(MASK_CODINGS))
        if store_writer not in STORE_WRITERS:
            raise ValueError(f"store_writer must be one of {', '.join(STORE_WRITERS)}, got {store_writer!r}")
        # "process" (the default): each batch's SQL runs in a child process (``storage.writer``), off
        # this process's interpreter lock (+18-24% ingest on 2 cores, docs/capacity.md); started with
        # the service. "thread": in the flusher thread, as one process.
        self.writer = None
        if store_writer == "process":
            self.writer = WriterProcess(
                store.url.render_as_string(hide_password=False),
                sqlite_synchronous=store.sqlite_synchronous,
                timeout_s=commit_wait_s,
            )
        self.manager = RoundManager(fleet, task, store, writer=self.writer)
        # Masks coded against what each side holds (uplink bases per device, announced bodies).
        self.bases = StoredBases(store, task.task_id)
        self.manager.encode_body = lambda round_no, body: self.bases.announcement(
            round_no, body, self.manager.known_devices
        )
        self.max_payload = task.schedule.max_payload
        self.tick_s = tick_s
        self.shared_group = shared_group
        self.reassembler = Reassembler(timeout_s=reassembly_timeout_s, on_expired=self._on_expired)
        # Decoding refuses a body declaring more elements than the model has, before allocating it.
        expected = self.manager.expected
        self.max_elements = sum(math.prod(shape) for shape in expected.values()) if expected else MAX_ELEMENTS
        self._frames_left: dict[str, int] = {}  # retained chunk frames we published per topic
        # The retained task and announcement live in the broker, which may lose them (killed before its
        # autosave): published again after every reconnect, and the task every ``republish_task_s``.
        self.republish_task_s = republish_task_s
        self._republish = threading.Event()
        self._last_task_publish = time.monotonic()
        self._lock = threading.RLock()
        # Group commit (see the module docstring): messages judged and not yet committed, what their
        # commit lets us publish, and when the batch's first message arrived.
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self._waiting: list[_Waiting] = []
        self._unconfirmed: list = []  # receipts published, PUBACK not seen yet
        self._outbound: list[Outbound] = []
        self._batch_opened = 0.0
        self._batch_due = threading.Condition(self._lock)
        self._committing = False  # the flusher is writing a batch, without the lock
        self._flusher_waits = False  # its write is done and it waits for the lock (set without it)
        self.commit_wait_s = commit_wait_s
        self._receipts: dict[tuple[str, int, str], bytes] = {}  # encoded receipts (see ``_receipt``)
        self.batch_sizes: list[int] = []  # messages per committed batch
        self._stop = threading.Event()
        self.finished = threading.Event()
        self.published_bytes = 0
        # Seconds per whole update from delivery to its receipt (decoded, checked, committed, acked,
        # answered), and per round announcement published: what `benchmarks/wire.py` reports.
        self.ingest_s: list[float] = []
        self.announce_s: list[float] = []
        # Wire bytes (frames included) of each accepted update by (device, round), and of each round's
        # announcement (retained, last published) and the per-device copies of it: the store keeps
        # updates in full coding, so these are what the simulator's MQTT transport counts.
        self.update_wire_bytes: dict[tuple[str, int], int] = {}
        self.announcement_wire_bytes: dict[int, int] = {}
        self.copy_wire_bytes: dict[int, int] = {}
        self.connection = MqttConnection(
            broker,
            client_id or f"fedmask-aggregator-{fleet}",
            protocol=protocol,
            manual_ack=True,
            dispatch="worker",
            on_connect=self._on_connect,
            # A batch can only fill with messages the broker sends before we ack any of them.
            receive_maximum=min(2 * batch_max, 65535),
        )
        self._ticker = threading.Thread(target=self._tick_loop, name="aggregator-ticker", daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="aggregator-flusher", daemon=True)

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> AggregatorService:
        if self.writer is not None:  # before any message can arrive: a batch must find it serving
            self.writer.start()
        up, state = self.topics.aggregator_filters(self.shared_group)
        self.connection.subscribe(up, self._on_up)
        self.connection.subscribe(state, self._on_state)
        # Messages the broker queued for our session arrive as soon as we connect: the handlers wait
        # for this lock until the rounds and devices are loaded from the store and announced. The
        # connection comes first: a broker we cannot use (down, or refusing MQTT 5) opens no round.
        try:
            with self._lock:
                self.connection.connect()
                outbound = self.manager.start()
                self._publish(outbound)
                self._republish.clear()  # the first connection's retained messages are the ones just sent
                self._last_task_publish = time.monotonic()
        except BaseException:
            if self.writer is not None:  # a service that never started leaves no child behind
                self.writer.close()
            raise
        self._ticker.start()
        self._flusher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            try:  # what is judged gets stored and answered; anything later the broker delivers again
                if self._waiting or self.manager.pending:
                    self._flush()
            except Exception:
                logger.exception("storing the last batch failed")
            self._batch_due.notify_all()
        for thread in (self._ticker, self._flusher):
            if thread.is_alive():
                thread.join(timeout=15)
        self.connection.close()
        if self.writer is not None:
            self.writer.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every device reported its personalized model (or finalization timed out)."""
        return self.finished.wait(timeout)

    def _on_connect(self, session_present: bool) -> None:
        # paho's network thread: no blocking publish here; the ticker republishes.
        self._republish.set()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                with self._lock:
                    self._flush()  # a round closes only on committed updates
                    # Incomplete messages expire here too, not only when the next frame arrives.
                    self.reassembler.expire()
                    self._flush()
                    self._publish(self.manager.tick())
                    self._republish_retained()
                    if self.manager.done:
                        self.finished.set()
            except Exception:  # keep serving: a failed tick is retried at the next one
                logger.exception("aggregator tick failed")

    def _republish_retained(self) -> None:
        now = time.monotonic()
        if self._republish.is_set():
            self._republish.clear()
            logger.info("reconnected: publishing the retained task and round announcement again")
            self._publish(self.manager.retained())
            self._last_task_publish = now
        elif now - self._last_task_publish >= self.republish_task_s and not self.manager.done:
            self._publish(self.manager.retained()[:1])
            self._last_task_publish = now

    # ----- publishing -------------------------------------------------------------------------

    def _publish(self, outbound: list[Outbound], *, wait: bool = True) -> None:
        """Publish everything, then wait for the broker's PUBACKs: one round trip, not one per message.
        ``wait=False`` (a batch's receipts): they are waited for by the next call that waits."""
        sent = self._unconfirmed
        announced = None
        started = time.perf_counter()
        for item in outbound:
            if not item.retain and len(item.payload) <= self.max_payload:  # a directive: as it is
                sent.append((item.topic, self.connection.publish(item.topic, item.payload, wait=False)))
                self.published_bytes += len(item.payload)
                continue
            plan = publications(
                item.topic,
                item.payload,
                max_payload=self.max_payload,
                retain=item.retain,
                previous_frames=self._frames_left.get(item.topic, 0),
            )
            if item.retain:
                self._frames_left[item.topic] = sum(1 for p in plan if p.payload and p.topic != item.topic)
            for publication in plan:
                info = self.connection.publish(
                    publication.topic, publication.payload, retain=publication.retain, wait=False
                )
                sent.append((publication.topic, info))
                self.published_bytes += len(publication.payload)
            if item.topic == self.topics.round:
                announced = started
                round_no = msgpack.unpackb(item.payload, raw=False).get("round")
                self.announcement_wire_bytes[round_no] = sum(len(p.payload) for p in plan)
        if not wait:
            return
        self._unconfirmed = []
        self.connection.wait_published(sent)
        if announced is not None:
            self.announce_s.append(time.perf_counter() - announced)

    # ----- inbound ----------------------------------------------------------------------------

    def _receipt(self, decision, *, round_no: int, detail: str) -> bytes:
        task_id = self.manager.task.task_id
        if decision.accepted:
            # Receipts name no device: one encoding serves every device of a round.
            key = (task_id, round_no, detail)
            if key not in self._receipts:
                if len(self._receipts) >= 64:
                    self._receipts.clear()
                self._receipts[key] = messages.encode(
                    messages.Directive(
                        fleet=self.fleet, kind="receipt", task_id=task_id, round=round_no, detail=detail
                    )
                )
            return self._receipts[key]
        directive = messages.Directive(
            fleet=self.fleet,
            kind="rejected",
            task_id=task_id,
            round=round_no,
            detail=detail,
            reason=decision.reason,
        )
        return messages.encode(directive)

    def _on_expired(self, sender: str, msg_id: str, error: ProtocolError) -> None:
        # Every frame was acked on arrival; the device republishes the whole message without a receipt.
        with self._lock:
            self.manager.reject(
                error.reason, error.detail, device=sender, topic=self.topics.up(sender), size=0
            )

    def _on_state(self, message: ReceivedMessage) -> None:
        with self._lock:
            try:
                self._handle_state(message)
            except Exception:
                logger.exception("failed to handle a message on %s", message.topic)
                self.connection.ack(message)
            self._after_judging()

    def _handle_state(self, message: ReceivedMessage) -> None:
        """A presence joins the batch like an update: judged now, its device written with the batch,
        acked after the commit; what it calls for (a finalize directive, an announcement copy) is
        published after the commit too."""
        if not message.payload:  # an empty retained message clears a presence: nothing to store
            self.connection.ack(message)
            return
        waiting = _Waiting(message, time.perf_counter())
        try:
            device = self.topics.parse(message.topic).device
            presence = messages.decode(message.payload, messages.Presence, fleet=self.fleet)
            if presence.device != device:
                raise ProtocolError(Rejection.DEVICE_MISMATCH, f"presence for {presence.device!r}")
            self._outbound.extend(self.manager.on_presence(device, presence))
            if presence.status == "online":  # (an offline will carries no capabilities)
                self.bases.on_presence(device, presence.capabilities)
                self._outbound.extend(self._copy_for(device))
        except ProtocolError as exc:
            self.manager.reject(
                exc.reason, exc.detail, device=None, topic=message.topic, size=len(message.payload)
            )
        self._wait_for_commit(waiting)

    def _copy_for(self, device: str) -> list[Outbound]:
        """A device that cannot decode the retained announcement (it lacks its base) gets its own copy,
        coded against the consensus it holds or in full, on its downlink (none if it needs none)."""
        manager = self.manager
        if manager.finalizing:
            round_no, deadline = manager.schedule.rounds + 1, manager.finalize_deadline
        elif manager.current is not None:
            round_no, deadline = manager.current.number, manager.current.deadline
        else:
            return []
        if not self.bases.needs_copy(device, round_no):
            return []
        copy = messages.RoundAnnouncement(
            fleet=self.fleet,
            task_id=manager.task.task_id,
            round=round_no,
            deadline=deadline,
            body=self.bases.copy_for(device, manager.global_body),
        )
        logger.info("%s lacks the base of round %d's announcement: sending it its own copy", device, round_no)
        payload = messages.encode(copy)
        self.copy_wire_bytes[round_no] = self.copy_wire_bytes.get(round_no, 0) + wire_size(
            payload, self.max_payload
        )
        return [Outbound(self.topics.down(device), payload)]

    def _on_up(self, message: ReceivedMessage) -> None:
        with self._lock:
            try:
                self._handle_up(message)
            except Exception:
                # Never let one message stop the service; it is acked so it cannot wedge the session.
                logger.exception("failed to handle a message on %s", message.topic)
                self.connection.ack(message)
            self._after_judging()

    def _after_judging(self) -> None:
        """Commit now (the quorum, or batching off), or hand the batch to the flusher when it is full, or
        due (its first message waited ``batch_wait_s``) while the flusher is idle."""
        if self.manager.must_commit() or (self.batch_max == 1 and self._waiting):
            self._flush()
            return
        batch = self._waiting
        full = len(batch) >= self.batch_max
        if full or (
            batch and not self._committing and time.monotonic() >= self._batch_opened + self.batch_wait_s
        ):
            # Judging waits until the flusher has taken the batch: a full one never grows, and a due one
            # is not kept from the flusher by this thread retaking the lock at every message (a lock is
            # not fair: the first batches of a burst waited ~100 ms for it).
            self._batch_due.notify_all()
            while self._waiting is batch and (full or not self._committing) and not self._stop.is_set():
                self._batch_due.wait(1.0)
        while self._flusher_waits and not self._stop.is_set():
            self._batch_due.wait(0.01)  # the flusher's commit is done: let it answer before judging more

    def _wait_for_commit(self, waiting: _Waiting) -> None:
        if not self._waiting:
            self._batch_opened = time.monotonic()
            self._batch_due.notify()
        self._waiting.append(waiting)

    def _handle_up(self, message: ReceivedMessage) -> None:
        started = time.perf_counter()
        size = len(message.payload)
        try:
            device = self.topics.parse(message.topic).device
        except ProtocolError as exc:
            self.manager.reject(exc.reason, exc.detail, device=None, topic=message.topic, size=size)
            self._wait_for_commit(_Waiting(message, started))
            return
        assert device is not None
        try:
            payload = self.reassembler.accept(device, message.payload)
        except ProtocolError as exc:  # recorded, duplicates included (benign: logged at DEBUG)
            self.manager.reject(exc.reason, exc.detail, device=device, topic=message.topic, size=size)
            self._wait_for_commit(_Waiting(message, started))
            return
        if payload is None:  # a frame of a message still incomplete (see the module docstring)
            self.connection.ack(message)
            return
        waiting = _Waiting(message, started, device)
        try:
            decoded = messages.decode(
                payload,
                (messages.Update, messages.Result),
                fleet=self.fleet,
                max_elements=self.max_elements,
                bases=self.bases.uplink_bases(device),
            )
        except ProtocolError as exc:
            waiting.decision = self.manager.reject(
                exc.reason, exc.detail, device=device, topic=message.topic, size=len(payload)
            )
            # A mask coded against a base we lack: name the update, so the device resends it in full.
            waiting.round_no, waiting.detail = refused_update(payload, exc.reason)
            self._wait_for_commit(waiting)
            return
        if isinstance(decoded, messages.Result):  # rare and large: stored at once, after the batch
            self._flush()
            decision = self.manager.on_result(device, decoded, payload, message.topic)
            self._flush()  # (its rejection, if any)
            self.connection.ack(message)
            receipt = self._receipt(decision, round_no=0, detail="result")
            self._publish([Outbound(self.topics.down(device), receipt)])
            if self.manager.done:
                self.finished.set()
            return
        assert isinstance(decoded, messages.Update)
        # Stored in full coding: the store's payloads decode without any base.
        stored = payload
        if any(c.context is not None for c in decoded.body.values()):
            stored = messages.encode(dataclasses.replace(decoded, body=plain(decoded.body)))
        masks = self.bases.mask_rows(decoded.round, decoded.body)
        waiting.decision, outbound = self.manager.on_update(device, decoded, stored, message.topic, masks)
        waiting.round_no, waiting.detail = decoded.base_round, "update"
        waiting.update, waiting.masks = decoded, masks
        waiting.wire_bytes = wire_size(payload, self.max_payload)
        self._outbound.extend(outbound)
        self._wait_for_commit(waiting)

    def _flush_loop(self) -> None:
        """Commits a batch that is full or whose first message has waited ``batch_wait_s``."""
        with self._lock:
            while not self._stop.is_set():
                if not self._waiting:
                    self._batch_due.wait(1.0)
                    continue
                remaining = self._batch_opened + self.batch_wait_s - time.monotonic()
                if remaining > 0 and len(self._waiting) < self.batch_max:
                    self._batch_due.wait(remaining)
                    continue
                try:
                    self._commit_pipelined()
                except Exception:  # keep serving: the next batch is tried anew
                    logger.exception("aggregator batch commit failed")

    def _commit_pipelined(self) -> None:
        """The flusher's commit (called holding the lock once): the store write runs without the lock,
        so the next batch is judged meanwhile; counting, acks and answers hold it again."""
        opened = self._open_batch()
        if opened is None:
            return
        waiting, outbound, unconfirmed = opened
        batch = self.manager.take()
        self._committing = True
        self._batch_due.notify_all()  # judging that waited for the flusher to take the batch goes on
        try:
            self._lock.release()
            try:
                created = self.manager.write(batch)
            finally:
                self._flusher_waits = True  # judging yields the lock at its next message
                self._lock.acquire()
                self._flusher_waits = False
        except Exception:
            self.manager.abandon()
            dropped, self._waiting = waiting + self._waiting, []
            self._failed(dropped, unconfirmed)
            return
        finally:
            self._committing = False
            self._batch_due.notify_all()
        try:
            corrections, after = self.manager.settle(batch, created)
        except Exception:
            self._failed(waiting, unconfirmed)
            return
        self._answer(waiting, outbound, unconfirmed, corrections, after)

    def _open_batch(self) -> tuple[list[_Waiting], list[Outbound], list] | None:
        """Take the pending batch to commit: (its messages, what to publish after it, the previous
        batch's receipts); None when nothing waits (what is to publish is published now)."""
        waiting, self._waiting = self._waiting, []
        outbound, self._outbound = self._outbound, []
        if not waiting and not self.manager.pending:
            if outbound:
                self._publish(outbound)
            return None
        kill_point("aggregator.before_commit")
        unconfirmed, self._unconfirmed = self._unconfirmed, []  # earlier batches' receipts
        return waiting, outbound, unconfirmed

    def _failed(self, waiting: list[_Waiting], unconfirmed: list) -> None:
        self._unconfirmed = unconfirmed + self._unconfirmed
        # Acked (so no message can wedge the session) and not answered: each device republishes its
        # message until it gets a receipt.
        logger.exception(
            "storing a batch of %d messages failed; their devices will send them again", len(waiting)
        )
        for item in waiting:
            self.connection.ack(item.message)

    def _flush(self) -> None:
        """Commit the pending batch in one transaction (after the flusher's commit, if one is under way);
        then ack its messages, answer them, and publish what followed (the next round's announcement
        when the batch reached the quorum)."""
        deadline = time.monotonic() + self.commit_wait_s
        while self._committing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommitStalled(
                    f"the flusher's commit has not finished within {self.commit_wait_s:g} s; nothing "
                    "new is stored until it does (is the database reachable?)"
                )
            self._batch_due.wait(min(1.0, remaining))
        opened = self._open_batch()
        if opened is None:
            return
        waiting, outbound, unconfirmed = opened
        try:
            corrections, after = self.manager.commit()
        except Exception:
            self._failed(waiting, unconfirmed)
            return
        self._answer(waiting, outbound, unconfirmed, corrections, after)

    def _answer(
        self, waiting: list[_Waiting], outbound: list[Outbound], unconfirmed: list, corrections, after
    ):
        """A committed batch: ack its messages, answer them, publish what followed."""
        self.batch_sizes.append(len(waiting))
        # Stored (accepted or rejected) and committed: now the broker may forget the messages.
        kill_point("aggregator.commit_before_ack")
        for item in waiting:
            self.connection.ack(item.message)
        try:
            # Earlier receipts whose PUBACK is not in yet are looked at again after the next batch,
            # unless too many are: a PUBACK comes after the messages the broker already sent us (up to
            # Receive Maximum of them), and waiting for it here held each batch of a burst 40-100 ms.
            unconfirmed = self.connection.unconfirmed(unconfirmed)
            if len(unconfirmed) > MAX_UNCONFIRMED:
                self.connection.wait_published(unconfirmed)
                unconfirmed = []
        except TransportError as exc:  # receipts the broker did not confirm: their devices ask again
            logger.warning("receipts of earlier batches unconfirmed: %s", exc)
            unconfirmed = []
        self._unconfirmed = unconfirmed + self._unconfirmed
        kill_point("aggregator.ack_before_receipt")
        receipts = []
        for item in waiting:
            if item.decision is None or item.device is None:
                continue
            decision = item.decision
            update = item.update
            if update is not None and decision.accepted:
                decision = corrections.get(item.device, decision)
            if update is not None and decision.accepted:
                # The masks of a stored update went to the store with it; a duplicate's are written now.
                stored = decision.detail != DUPLICATE
                self.bases.accept(update.device, update.round, update.body, stored=stored, rows=item.masks)
                self.update_wire_bytes[(item.device, update.round)] = item.wire_bytes
            receipt = self._receipt(decision, round_no=item.round_no, detail=item.detail)
            receipts.append(Outbound(self.topics.down(item.device), receipt))
        # Not waited for: their PUBACKs are looked at after the next batch's commit (see above).
        self._publish(receipts, wait=False)
        now = time.perf_counter()
        self.ingest_s.extend(now - item.started for item in waiting if item.update is not None)
        outbound += after
        if after:
            kill_point("aggregator.before_announce")
        if outbound:
            self._publish(outbound)
        if self.manager.done:
            self.finished.set()
