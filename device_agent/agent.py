"""The on-device process: joins a fleet's task, trains when a round opens, finalizes on command.

The agent holds one persistent MQTT session (its client id is its device id), announces itself on its
retained state topic (its last will flips that to offline), and reacts to three things:

- the retained **task**: it derives the frozen weights from the task's seed and refuses the task when
  its own digest differs (a device with another numeric library would otherwise train garbage);
- the retained **round** announcement: it merges the global body, trains for the round, and publishes
  its update (chunked under the task's payload limit), then records the round in its state file;
- a **finalize** directive on its downlink: it builds, compacts, exports and measures its personalized
  model with the TFLite runtime and publishes the result.

The agent keeps its finalized model, metrics and class names beside its state file
(``device_agent.local_model``), for ``fedmask predict``. One-shot by default; a serving agent
(``serve=True``) takes the next task the aggregator publishes, and a problem with one task (no receipt,
never asked to finalize) gives that task up instead of stopping the process.

The state file (``<state_dir>/<device>.npz``, arrays only) makes a restart resume where it stopped: it
skips rounds it already answered and keeps the strategy's local state (FedMask's scores, ...), and the
mask bases (``protocol.mask_bases``): the last consensus it decoded and its last accepted upload, so
its masks keep travelling coded against them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmask.protocol import messages
from fedmask.protocol.chunking import Reassembler, publications
from fedmask.protocol.errors import ProtocolError
from fedmask.protocol.faults import kill_point
from fedmask.protocol.mask_bases import STATE_PREFIX as MASK_STATE_PREFIX
from fedmask.protocol.mask_bases import DeviceBases, plain
from fedmask.protocol.mask_coding import MASK_CODINGS
from fedmask.protocol.topics import Topics
from fedmask.protocol.transport import MqttConnection, ReceivedMessage, TransportError, Will
from fedmask.strategies import ClientHalf, TaskSpec, get_strategy

logger = logging.getLogger(__name__)

STATE_PREFIX = "state__"
# Rejections that mean "the aggregator cannot use the base this mask was coded against".
BASE_REJECTIONS = ("missing_base", "stale_base", "base_mismatch", "bad_mask_digest")
# Times an agent announces itself again after an `unknown_device` rejection before accepting it: the
# aggregator missed our retained presence (RabbitMQ 3.x delivers no retained message to its wildcard
# subscription, and keeps retained messages on one node).
REANNOUNCE_ATTEMPTS = 3


def announced_round(payload: bytes) -> int:
    """The round number of an announcement that decoded up to its masks (checksum verified)."""
    try:
        value = msgpack.unpackb(payload, raw=False).get("round")
    except Exception:
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def spec_from_task(task: messages.Task) -> TaskSpec:
    return TaskSpec(
        strategy=task.strategy,
        arch=task.arch,
        num_classes=task.num_classes,
        seed=task.seed,
        arch_kwargs=dict(task.arch_kwargs),
        mask_config=dict(task.mask_config),
        hyper=dict(task.hyper),
    )


def task_digest(spec: TaskSpec) -> str:
    """The digest of the frozen weights this device derives for a task."""
    from fedmask.models import weights_digest
    from fedmask.models.layers import WeightMode
    from fedmask.strategies.model_factory import build_for

    return weights_digest(build_for(spec, WeightMode.MASK))


class AgentState:
    """The small file that lets an agent survive its own restart (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.task_id: str | None = None
        self.last_round = 0
        self.finalize_requested = False  # the aggregator's finalize directive arrived
        self.finalized = False  # the personalized model was sent
        self.result_confirmed = False  # ... and the aggregator's receipt for it arrived
        self.deadline_s: float | None = None  # the task's round deadline (how long to wait for answers)
        self.client_state: dict[str, np.ndarray] = {}
        self.mask_state: dict[str, np.ndarray] = {}  # DeviceBases.state_arrays()
        if path.exists():
            self._load()

    def _load(self) -> None:
        with np.load(self.path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            self.client_state = {
                k[len(STATE_PREFIX) :]: data[k] for k in data.files if k.startswith(STATE_PREFIX)
            }
            self.mask_state = {k: data[k] for k in data.files if k.startswith(MASK_STATE_PREFIX)}
        self.task_id = meta.get("task_id")
        self.last_round = int(meta.get("last_round", 0))
        self.finalized = bool(meta.get("finalized", False))
        # A file written before these keys existed: a finalized run there was a finished one.
        self.finalize_requested = bool(meta.get("finalize_requested", self.finalized))
        self.result_confirmed = bool(meta.get("result_confirmed", self.finalized))
        self.deadline_s = meta.get("deadline_s")

    def save(self) -> None:
        meta = json.dumps(
            {
                "task_id": self.task_id,
                "last_round": self.last_round,
                "finalize_requested": self.finalize_requested,
                "finalized": self.finalized,
                "result_confirmed": self.result_confirmed,
                "deadline_s": self.deadline_s,
            }
        )
        arrays = {STATE_PREFIX + k: v for k, v in self.client_state.items()}
        arrays.update(self.mask_state)
        tmp = self.path.with_suffix(".tmp.npz")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, meta=np.array(meta), **arrays)
        os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one, never half


@dataclass(frozen=True)
class UpdateTiming:
    """Where a round's update spent its time on the device (seconds)."""

    train_s: float  # local training and evaluation
    encode_s: float  # the Update message to bytes
    publish_s: float  # every frame out, each acknowledged by the broker (PUBACK)


class DeviceAgent:
    def __init__(
        self,
        broker,  # one URL or several (the nodes of one cluster, see MqttConnection)
        fleet: str,
        device_id: str,
        data: Any,
        *,
        state_dir: str | os.PathLike[str],
        protocol: str = "5",
        capabilities: dict[str, Any] | None = None,
        train_lock: threading.Semaphore | None = None,
        latency_runs: int = 50,
        receipt_timeout_s: float | None = None,
        receipt_attempts: int = 20,
        identity_timeout_s: float = 15.0,
        serve: bool = False,
    ) -> None:
        self.fleet = fleet
        # Serving: the agent outlives its task and takes the next one the aggregator publishes; a
        # problem with one task (no receipts, no finalize) gives that task up instead of stopping.
        self.serve = serve
        self.device_id = device_id
        self.data = data
        self.topics = Topics(fleet)
        self.state = AgentState(Path(state_dir) / f"{device_id}.npz")
        self.capabilities = capabilities or {"samples": len(data.y_train), "runtime": "tflite"}
        self.train_lock = train_lock or threading.Semaphore(1)
        self.latency_runs = latency_runs
        self._receipt_timeout_s = receipt_timeout_s  # None: the task's deadline_s
        # Publishes of one message without any answer before the agent gives up with an error: the
        # aggregator is gone, or the broker drops what we publish (MQTT 3.1.1 does so silently).
        self.receipt_attempts = receipt_attempts
        self.identity_timeout_s = identity_timeout_s
        # Messages sent but not yet answered by a receipt or a rejection, by kind ("update" / "result"),
        # with the base round of an update; republished (same bytes) on a timer until answered.
        self._unconfirmed: dict[str, tuple[int, bytes]] = {}
        self._unconfirmed_lock = threading.Lock()
        self.receipts = 0
        self._stopped = False
        self.rounds_seen: list[int] = []  # every round announcement processed, in order
        self.timings: dict[int, UpdateTiming] = {}  # round -> where the time of its update went
        self.task: messages.Task | None = None
        self.spec: TaskSpec | None = None
        self.client: ClientHalf | None = None
        self.global_body: dict[str, np.ndarray] | None = None
        self.pending_round: messages.RoundAnnouncement | None = None
        self.final_body_seen = False  # the last round's aggregate arrived (round ``rounds + 1``)
        self.finalize_requested = False
        self._early_directives: list[messages.Directive] = []  # arrived before the task
        self._final_body_timer: threading.Timer | None = None
        self.reassembler = Reassembler()
        # Mask bases (from the state file at once, so the first announcement decodes); the task says
        # which codings the aggregator decodes.
        self.bases = DeviceBases()
        self.bases.load_state_arrays(self.state.mask_state)
        self._last_update: messages.Update | None = None
        # The newest round announced, even one we could not decode yet (we lack its mask base and
        # wait for our own copy): an older announcement still queued in our session is not trained on.
        self._newest_round = 0
        self.bytes_sent = 0
        self.refused_task: str | None = None
        self.finished = threading.Event()  # personalized model sent (or the agent failed: see error)
        self.result_confirmed = threading.Event()  # ... and the aggregator's receipt arrived
        self.error: str | None = None  # why the agent cannot go on (one line); finished is set too
        self.given_up: str | None = None  # serving: the task this agent gave up (see fail)
        # The time of the current connection: its will and its online presence both carry it, so a
        # will published later wins over the online presence of the same connection (same time, later
        # arrival) and loses to the next connection's.
        self._connected_at = time.time()
        self._presence_sent: bytes | None = None
        self._reannounced = 0
        self._presence_sent_at: float | None = None
        self.identity_confirmed = threading.Event()  # our own presence came back from the broker
        self._busy = 0  # > 0 while training or finalizing (see _working)
        self._idle_since = 0.0
        self.connection = MqttConnection(
            broker,
            device_id,
            protocol=protocol,
            will=self._will,
            dispatch="worker",
            on_connect=self._announce_presence,
        )

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> DeviceAgent:
        for topic_filter in self.topics.device_filters(self.device_id):
            self.connection.subscribe(topic_filter, self._on_message)
        # Our own retained presence, read back: proof that the broker takes what we publish as this
        # device (a device id that is not the account's username is refused or, on MQTT 3.1.1,
        # silently dropped). The ACL lets a device read its own state topic.
        self.connection.subscribe(self.topics.state(self.device_id), self._on_own_presence)
        self.connection.connect()
        if self.identity_timeout_s:
            self._watch_identity()
        if self.state.finalize_requested and not self.state.result_confirmed:
            # Killed while finalizing: the task and last aggregate are retained, unless the broker lost
            # them after the aggregator ended; then this deadline ends the wait.
            self._watch_final_body()
        return self

    def _watch_identity(self) -> None:
        watchdog = threading.Timer(1.0, self._check_identity)
        watchdog.daemon = True
        watchdog.start()

    def fail(self, problem: str, *, fatal: bool = False) -> None:
        """Stop with an error: the CLI prints ``problem`` (one line) and exits non-zero. A serving
        agent gives up only the current task unless the problem is ``fatal`` (it concerns every task:
        the broker refuses us, no PyTorch)."""
        if self.serve and not fatal:
            task_id = self.task.task_id if self.task is not None else self.state.task_id
            logger.error(
                "%s: giving up task %s: %s; waiting for the next task", self.device_id, task_id, problem
            )
            with self._unconfirmed_lock:
                self._unconfirmed.clear()
            self.given_up = task_id
            return
        if self.error is None:
            self.error = problem
            logger.error("%s: %s", self.device_id, problem)
        self.finished.set()
        self.result_confirmed.set()

    def _will(self) -> Will:
        self._connected_at = time.time()
        offline = messages.Presence(
            fleet=self.fleet, device=self.device_id, status="offline", at=self._connected_at
        )
        return Will(self.topics.state(self.device_id), messages.encode(offline))

    def _on_own_presence(self, message: ReceivedMessage) -> None:
        if self._presence_sent is not None and bytes(message.payload) == self._presence_sent:
            if not self.identity_confirmed.is_set():
                logger.info("%s: the broker accepts our publishes as %s", self.device_id, self.device_id)
            self.identity_confirmed.set()

    @contextlib.contextmanager
    def _working(self):
        """Training or finalizing: the one handler thread is busy, so our presence cannot be read back."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._idle_since = time.time()

    def _check_identity(self) -> None:
        if self.identity_confirmed.is_set() or self._stopped or self.error is not None:
            return
        # Judged on one connection that stayed up for the whole timeout (a broker restart resets it),
        # counting only time in which the handler thread was free to read our presence back.
        up_since = self._presence_sent_at
        if (
            self._busy
            or not self.connection.connected
            or up_since is None
            or time.time() - max(up_since, self._idle_since) < self.identity_timeout_s
        ):
            self._watch_identity()
            return
        self.fail(
            fatal=True,
            problem=f"the broker did not deliver our own presence back within "
            f"{self.identity_timeout_s:g} s: it refuses what we publish as {self.device_id!r} (is "
            "--device-id the MQTT username of the credentials?)",
        )

    def stop(self) -> None:
        """Leave cleanly: presence offline (retained), then disconnect."""
        self._stopped = True
        if not self.connection.connected:
            # Never connected, or the broker is gone: a publish would only wait out its timeout (5 s
            # per agent); the broker publishes our will if it saw us at all.
            self.connection.close()
            return
        try:
            offline = messages.Presence(
                fleet=self.fleet, device=self.device_id, status="offline", at=time.time()
            )
            self.connection.publish(
                self.topics.state(self.device_id), messages.encode(offline), retain=True, timeout_s=5
            )
        except Exception:  # the broker may already be gone; the last will covers us then
            logger.debug("could not publish offline presence", exc_info=True)
        self.connection.close()

    def _announce_presence(self, session_present: bool) -> None:
        online = messages.Presence(
            fleet=self.fleet,
            device=self.device_id,
            status="online",
            at=self._connected_at,
            capabilities={**self.capabilities, **self._mask_capabilities()},
        )
        self._presence_sent = messages.encode(online)
        self._presence_sent_at = time.time()
        self.connection.publish(
            self.topics.state(self.device_id), self._presence_sent, retain=True, wait=False
        )

    def _mask_capabilities(self) -> dict[str, Any]:
        """Which mask codings we decode, and which consensus we hold (so we get a copy if we lack it)."""
        held = self.bases.consensus_ref
        return {"mask_codings": list(MASK_CODINGS), "consensus": None if held is None else held.to_wire()}

    # ----- inbound ----------------------------------------------------------------------------

    def _on_message(self, message: ReceivedMessage) -> None:
        try:
            route = self.topics.parse(message.topic)
            payload = self.reassembler.accept(route.kind, message.payload)
            if payload is None:
                return
            if route.kind == "task":
                self._on_task(messages.decode(payload, messages.Task, fleet=self.fleet))
            elif route.kind == "round":
                bases = self.bases.announcement_bases()
                try:
                    announcement = messages.decode(
                        payload, messages.RoundAnnouncement, fleet=self.fleet, bases=bases
                    )
                except ProtocolError as exc:
                    if exc.reason.value in BASE_REJECTIONS:  # our own copy follows on our downlink
                        self._newest_round = max(self._newest_round, announced_round(payload))
                    raise
                self._on_round(announcement)
            elif route.kind == "down":
                # A directive, or our own copy of an announcement we could not decode (base missing).
                decoded = messages.decode(
                    payload,
                    (messages.Directive, messages.RoundAnnouncement),
                    fleet=self.fleet,
                    bases=self.bases.announcement_bases(),
                )
                if isinstance(decoded, messages.RoundAnnouncement):
                    self._on_round(decoded)
                else:
                    self._on_directive(decoded)
        except ProtocolError as exc:
            logger.warning("%s: ignored a message on %s: %s", self.device_id, message.topic, exc)
        except TransportError as exc:
            if "refused" in str(exc):  # MQTT 5: the broker will not take our messages, ever
                self.fail(f"{exc} (is --device-id the MQTT username of the credentials?)", fatal=True)
            else:
                logger.warning("%s: %s; republished later", self.device_id, exc)
        except ImportError as exc:
            self.fail(f"cannot train: {exc} (install PyTorch on this device)", fatal=True)
        except Exception:
            logger.exception("%s: failed to handle a message on %s", self.device_id, message.topic)

    def _on_task(self, task: messages.Task) -> None:
        if self.task is not None and task.task_id == self.task.task_id:
            return
        if self.serve and task.task_id == self.given_up:
            return
        if self.serve and self.task is not None:
            self._forget_task()
        spec = spec_from_task(task)
        digest = task_digest(spec)
        if digest != task.weights_digest:
            self.refused_task = task.task_id
            logger.error(
                "%s: refusing task %s: derived weight digest %s differs from the task's %s",
                self.device_id,
                task.task_id,
                digest[:12],
                task.weights_digest[:12],
            )
            return
        self.task, self.spec = task, spec
        self.client = get_strategy(spec.strategy).client(spec, self.data)
        self.bases.codings = tuple(task.codings) or ("bits",)
        if self.state.task_id == task.task_id:
            if self.state.client_state:
                self.client.load_state_dict(self.state.client_state)
            logger.info(
                "%s: resuming task %s after round %d", self.device_id, task.task_id, self.state.last_round
            )
            if self.state.result_confirmed:  # its personalized model was received: nothing left to do
                logger.info("%s: task %s already finalized", self.device_id, task.task_id)
                self.finished.set()
                self.result_confirmed.set()
            elif self.state.finalize_requested:
                # Killed after the finalize directive (while building or uploading the result): the
                # directive was consumed, so finalize again from the retained last aggregate.
                logger.info("%s: finalization was requested before the restart; resuming it", self.device_id)
                self.finalize_requested = True
                self._watch_final_body()
        else:
            self.state.task_id, self.state.last_round = task.task_id, 0
            self.state.deadline_s = task.schedule.deadline_s
            self.state.finalize_requested = self.state.finalized = self.state.result_confirmed = False
            self.state.client_state = {}
            self.bases = DeviceBases(self.bases.codings)
            self.state.mask_state = {}
        logger.info("%s: joined task %s (%s on %s)", self.device_id, task.task_id, task.strategy, task.arch)
        early, self._early_directives = self._early_directives, []
        for directive in early:
            self._on_directive(directive)
        if self.pending_round is not None:
            pending, self.pending_round = self.pending_round, None
            self._on_round(pending)

    def _forget_task(self) -> None:
        """Serving: the aggregator published another task; what we held for the last one goes."""
        assert self.task is not None
        if not self.result_confirmed.is_set():
            logger.warning(
                "%s: task %s replaced by another before it ended here", self.device_id, self.task.task_id
            )
        self.task = self.spec = self.client = None
        self.global_body = self.pending_round = self._last_update = None
        self.final_body_seen = self.finalize_requested = False
        self.rounds_seen, self.timings, self._newest_round = [], {}, 0
        self._final_body_timer = None
        with self._unconfirmed_lock:
            self._unconfirmed.clear()
        self.finished, self.result_confirmed = threading.Event(), threading.Event()

    def _on_round(self, announcement: messages.RoundAnnouncement) -> None:
        if self.task is None:
            self.pending_round = announcement  # the task arrives right after; answer then
            return
        if announcement.task_id != self.task.task_id or announcement.task_id == self.given_up:
            return
        self.rounds_seen.append(announcement.round)
        body = announcement.body
        self.global_body = None if body is None else {k: c.array for k, c in body.items()}
        self.bases.received(announcement.round, body)
        self.state.mask_state = self.bases.state_arrays()
        newest, self._newest_round = self._newest_round, max(self._newest_round, announcement.round)
        if announcement.round > self.task.schedule.rounds:
            # The aggregate of the last round: nothing to train, but the model is finalized from it.
            self.final_body_seen = True
            if self.finalize_requested:
                self._finalize()
            elif announcement.deadline:
                # The aggregator asks its participants to finalize until this deadline; a device it
                # does not ask (it never contributed) stops then instead of waiting for ever.
                wait_s = max(0.0, announcement.deadline - time.time()) + 10.0
                timer = threading.Timer(wait_s, self._no_finalize, args=(announcement.task_id,))
                timer.daemon = True
                timer.start()
            return
        if (
            announcement.round <= self.state.last_round
            or self.state.finalize_requested
            or announcement.round < newest
        ):
            # Already answered (e.g. the retained announcement again after a reconnect), or old. The
            # aggregator announces again after it reconnected, maybe to another broker node that did
            # not have its session: an update still without a receipt may be lost there, so send it now.
            if announcement.round == self.state.last_round:
                self._republish_unconfirmed("update", announcement.round)
            return
        if announcement.deadline and time.time() > announcement.deadline + self.task.schedule.deadline_s:
            logger.info(
                "%s: round %d is long past its deadline; waiting for the next",
                self.device_id,
                announcement.round,
            )
            return
        self._train(announcement.round)

    def _train(self, round_no: int) -> None:
        assert self.client is not None and self.task is not None
        with self.train_lock, self._working():
            started = time.perf_counter()
            fit = self.client.fit(self.global_body, round_no)
            evaluation = self.client.evaluate(None)
            trained = time.perf_counter()
        # The device's own view of its personalized accuracy: lets operators follow a run per round.
        fit.metrics.update(test_accuracy=evaluation.accuracy, num_test=evaluation.num_samples)
        update = messages.Update(
            fleet=self.fleet,
            task_id=self.task.task_id,
            device=self.device_id,
            round=round_no,
            base_round=round_no,
            num_samples=fit.num_samples,
            metrics={k: float(v) for k, v in fit.metrics.items()},
            body=self.bases.uplink(fit.body, round_no),
        )
        self._last_update = update
        payload = messages.encode(update)
        encoded = time.perf_counter()
        try:
            self._send("update", round_no, payload)
        except TransportError as exc:
            if "refused" in str(exc):
                raise
            # The broker is away: the update stays pending and its timer republishes it.
            logger.warning(
                "%s: publishing the round-%d update failed (%s); republished later",
                self.device_id,
                round_no,
                exc,
            )
        timing = UpdateTiming(trained - started, encoded - trained, time.perf_counter() - encoded)
        self.timings[round_no] = timing
        self.state.last_round = round_no
        self.state.client_state = self.client.state_dict()
        self.state.mask_state = self.bases.state_arrays()
        self.state.save()
        logger.info(
            "%s: sent its update for round %d (%d bytes; train %.0f ms, encode %.1f ms, publish %.1f ms)",
            self.device_id,
            round_no,
            len(payload),
            timing.train_s * 1e3,
            timing.encode_s * 1e3,
            timing.publish_s * 1e3,
        )

    @property
    def receipt_timeout_s(self) -> float:
        """How long to wait for a receipt before republishing (default: the task's ``deadline_s``)."""
        if self._receipt_timeout_s is not None:
            return self._receipt_timeout_s
        if self.task is not None:
            return self.task.schedule.deadline_s
        return float(self.state.deadline_s) if self.state.deadline_s else 60.0

    def _send(self, kind: str, round_no: int, payload: bytes) -> None:
        """Publish and keep the message until the aggregator's receipt (republished on a timer)."""
        with self._unconfirmed_lock:
            self._unconfirmed[kind] = (round_no, payload)
        # The timer first: if publishing raises (broker away past the PUBACK timeout), it republishes.
        self._schedule_resend(kind, payload, 1)
        self._publish(payload, kind)

    def _schedule_resend(self, kind: str, payload: bytes, attempts: int) -> None:
        timer = threading.Timer(self.receipt_timeout_s, self._resend, args=(kind, payload, attempts))
        timer.daemon = True
        timer.start()

    def _resend(self, kind: str, payload: bytes, attempts: int) -> None:
        with self._unconfirmed_lock:
            pending = self._unconfirmed.get(kind)
            if pending is None or pending[1] is not payload or self._stopped:
                return
        if attempts >= self.receipt_attempts:
            self.fail(
                f"no receipt for its {kind} after {attempts} publishes over "
                f"{attempts * self.receipt_timeout_s:.0f} s: the aggregator is not running, or the broker "
                "drops our publishes (is --device-id the MQTT username of the credentials?)"
            )
            return
        logger.warning(
            "%s: no receipt for its %s after %.0fs; republishing",
            self.device_id,
            kind,
            self.receipt_timeout_s,
        )
        self._schedule_resend(kind, payload, attempts + 1)
        try:
            self._publish(payload, kind)
        except TransportError as exc:
            if "refused" in str(exc):
                self.fail(f"{exc} (is --device-id the MQTT username of the credentials?)", fatal=True)
            else:
                logger.warning("%s: republishing failed (%s); will retry", self.device_id, exc)
        except Exception:
            logger.warning("%s: republishing failed; will retry", self.device_id, exc_info=True)

    def _reannounce(self, directive: messages.Directive) -> bool:
        """The aggregator does not know us: our presence again, then the refused message again."""
        kind = directive.detail or "update"
        with self._unconfirmed_lock:
            pending = self._unconfirmed.get(kind)
        if pending is None or self._reannounced >= REANNOUNCE_ATTEMPTS or self._presence_sent is None:
            return False
        self._reannounced += 1
        logger.info("%s: unknown to the aggregator; announcing ourselves again", self.device_id)
        try:
            self.connection.publish(self.topics.state(self.device_id), self._presence_sent, retain=True)
            self._publish(pending[1], kind)
        except TransportError as exc:
            logger.warning("%s: announcing again failed (%s); its timer retries", self.device_id, exc)
        return True

    def _republish_unconfirmed(self, kind: str, round_no: int) -> None:
        """Publish the pending message of round ``round_no`` again now (its timer keeps running)."""
        with self._unconfirmed_lock:
            pending = self._unconfirmed.get(kind)
        if pending is None or pending[0] != round_no or self._stopped:
            return
        logger.info("%s: round %d announced again, no receipt yet: republishing", self.device_id, round_no)
        try:
            self._publish(pending[1], kind)
        except TransportError as exc:
            logger.warning("%s: republishing failed (%s); its timer retries", self.device_id, exc)

    def _publish(self, payload: bytes, kind: str = "update") -> None:
        plan = publications(
            self.topics.up(self.device_id), payload, max_payload=self.task.schedule.max_payload
        )
        kill_point(f"agent.{kind}.before_publish")
        for i, publication in enumerate(plan):
            self.connection.publish(publication.topic, publication.payload, retain=publication.retain)
            self.bytes_sent += len(publication.payload)
            if i == 0 and len(plan) > 1:
                kill_point(f"agent.{kind}.mid_chunk")
        kill_point(f"agent.{kind}.after_publish")

    def _on_directive(self, directive: messages.Directive) -> None:
        # Directives queued in our session arrive before the retained task: judged against the task
        # of the state file, or kept until the task is known.
        current = self.task.task_id if self.task is not None else self.state.task_id
        if directive.task_id != current:
            if self.task is None and len(self._early_directives) < 16:
                self._early_directives.append(directive)
            return
        if directive.kind == "finalize":
            kill_point("agent.directive.received")
            self.finalize_requested = True
            if not self.state.finalize_requested:
                self.state.finalize_requested = True  # a restart resumes finalization (not the rounds)
                self.state.save()
            if self.task is not None and self.final_body_seen:
                self._finalize()
            else:  # the final announcement is retained and follows; finalize from it
                logger.info("%s: finalize requested; waiting for the last aggregate", self.device_id)
                self._watch_final_body()
            return
        if directive.kind == "rejected":
            logger.warning(
                "%s: the aggregator rejected our %s of round %d: %s",
                self.device_id,
                directive.detail or "message",
                directive.round,
                directive.reason,
            )
            if directive.reason in BASE_REJECTIONS and self._resend_in_full(directive.round):
                return
            if directive.reason == "unknown_device" and self._reannounce(directive):
                return
        with self._unconfirmed_lock:
            result_pending = "result" in self._unconfirmed
        if directive.kind == "receipt" and directive.detail == "result" and not result_pending:
            # The answer to the result an earlier run of ours sent before it was killed: it is stored.
            if not self.state.result_confirmed:
                logger.info("%s: the aggregator confirmed the model sent before the restart", self.device_id)
                self.state.finalize_requested = self.state.finalized = self.state.result_confirmed = True
                self.state.save()
            self.finished.set()
            self.result_confirmed.set()
            return
        self._confirm(directive)
        if directive.kind == "receipt" and directive.detail == "update":
            self.bases.confirm(directive.round)
            self.state.mask_state = self.bases.state_arrays()
            self.state.save()

    def _resend_in_full(self, round_no: int) -> bool:
        """The aggregator lacks the base our update was coded against: send it again in full coding."""
        update = self._last_update
        if update is None or update.base_round != round_no:
            return False
        self.bases.forget_accepted()
        full = dataclasses.replace(update, body=plain(update.body))
        self._last_update = full
        logger.info("%s: resending its update of round %d in full coding", self.device_id, round_no)
        self._send("update", round_no, messages.encode(full))
        return True

    def _watch_final_body(self) -> None:
        """Finalization waits for the retained last aggregate, but not for ever: a broker that lost it
        after the aggregator ended (its run complete) would leave us waiting for nothing."""
        if self._final_body_timer is not None:
            return
        wait_s = self.receipt_attempts * self.receipt_timeout_s
        task_id = self.task.task_id if self.task is not None else self.state.task_id
        self._final_body_timer = threading.Timer(wait_s, self._no_final_body, args=(wait_s, task_id))
        self._final_body_timer.daemon = True
        self._final_body_timer.start()

    def _no_final_body(self, waited_s: float, task_id: str | None) -> None:
        if self.final_body_seen or self._stopped or self.finished.is_set() or not self._current(task_id):
            return
        self.fail(
            f"finalization was requested but the last aggregate did not arrive within {waited_s:.0f} s: the "
            "aggregator is not running (if it finished, it may already hold our model)"
        )

    def _current(self, task_id: str | None) -> bool:
        """A timer set for ``task_id`` still concerns the task at hand (a serving agent moves on)."""
        current = self.task.task_id if self.task is not None else self.state.task_id
        return task_id == current and task_id != self.given_up

    def _no_finalize(self, task_id: str) -> None:
        if self.finalize_requested or self._stopped or self.finished.is_set() or not self._current(task_id):
            return
        self.fail(
            f"task {task_id} ended its rounds and its finalization deadline passed without asking this "
            "device to finalize: no update of this device was accepted (it joined too late?)"
        )

    def _confirm(self, directive: messages.Directive) -> None:
        """A receipt or rejection answers our pending message of that kind: stop republishing it.

        The aggregator names the kind in ``detail`` ("update" / "result") and, for an update, its
        base round in ``round``; an answer to an older update leaves the newer one pending.
        """
        kind = directive.detail
        with self._unconfirmed_lock:
            pending = self._unconfirmed.get(kind)
            if pending is None or (kind == "update" and pending[0] != directive.round):
                return
            del self._unconfirmed[kind]
        if directive.kind == "receipt":
            self.receipts += 1
            logger.info("%s: receipt for its %s of base round %d", self.device_id, kind, directive.round)
        if kind == "result":
            if directive.kind != "receipt":
                self.fail(f"the aggregator refused our personalized model: {directive.reason}")
                return
            self.state.result_confirmed = True
            self.state.save()
            logger.info("%s: the aggregator confirmed our personalized model", self.device_id)
            self.result_confirmed.set()

    def _keep_model(self, artifacts: dict[str, Any]) -> None:
        """The device's own copy of its model (``device_agent.local_model``), before it is reported."""
        from fedmask.datasets.labels import label_names
        from fedmask.device_agent import local_model

        assert self.task is not None
        kept = local_model.save(
            self.state.path.parent,
            self.device_id,
            self.task.task_id,
            artifacts["tflite"],
            {
                "fleet": self.fleet,
                "strategy": self.task.strategy,
                "arch": self.task.arch,
                "num_classes": self.task.num_classes,
                "label_names": label_names(self.data.meta, self.task.num_classes),
                "metrics": artifacts["metrics"],
            },
        )
        logger.info("%s: kept its model in %s", self.device_id, kept.path)

    def _finalize(self) -> None:
        from fedmask.device_agent.finalize import personalized_artifacts

        assert self.client is not None and self.task is not None
        if self.state.result_confirmed:
            self.finished.set()
            self.result_confirmed.set()
            return
        with self._unconfirmed_lock:
            pending = self._unconfirmed.get("result")
        if pending is not None:  # sent and not yet answered (e.g. a repeated directive): same bytes again
            self._publish(pending[1], "result")
            return
        with self.train_lock, self._working():
            final = self.client.finalize(self.global_body)
            artifacts = personalized_artifacts(final, self.data.x_test, self.data.y_test, self.latency_runs)
        self._keep_model(artifacts)
        result = messages.Result(
            fleet=self.fleet,
            task_id=self.task.task_id,
            device=self.device_id,
            metrics=artifacts["metrics"],
            mask=artifacts["mask"],
            weights=artifacts["weights"],
            tflite=artifacts["tflite"],
        )
        try:
            self._send("result", self.task.schedule.rounds, messages.encode(result))
        except TransportError as exc:
            if "refused" in str(exc):
                raise
            logger.warning("%s: publishing the result failed (%s); republished later", self.device_id, exc)
        self.state.finalized = True
        self.state.save()
        logger.info(
            "%s: personalized model sent (TFLite accuracy %.3f, %.0f bytes)",
            self.device_id,
            artifacts["metrics"]["accuracy"],
            artifacts["metrics"]["size_bytes"],
        )
        self.finished.set()
