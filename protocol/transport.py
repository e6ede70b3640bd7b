"""A thin, explicit wrapper over paho-mqtt 2.x shared by the aggregator and the device agent.

What it adds to paho, and nothing more:

- a **persistent session** always (MQTT 5: ``clean_start=False`` plus a session expiry interval;
  MQTT 3.1.1: ``clean_session=False``), a last will, TLS and credentials from a :class:`BrokerUrl`;
- automatic **reconnect** with exponential backoff (paho's ``reconnect_delay_set``), every CONNACK and
  DISCONNECT reason code logged, and **re-subscription** when the broker comes back without the session
  (and on the first connection of the process, whose stored subscriptions may be stale);
- **failover** over several broker URLs (the nodes of one broker cluster): the first connection tries
  them in order, and every reconnection goes to the next one. Each URL gets its own session (client id
  ``<id>``, ``<id>.1``, ``<id>.2``, ...): RabbitMQ 3.x keeps a session on one node, and a client that
  resumes it on another node while that one is down is disconnected again at every subscribe
  (observed with 3.10). On the other node we start a new session and re-subscribe; what the dead
  node held is re-sent end to end by the protocol (the aggregator announces the round again, devices
  republish updates that have no receipt yet, receipts are idempotent);
- ``publish(..., wait=True)`` that blocks until the broker's PUBACK (or raises on timeout or on an
  MQTT 5 failure reason code such as 0x87 "Not authorized");
- per-filter handlers, run on one **worker thread** in arrival order (``dispatch="worker"``, the
  default: a handler may block on a database commit without stalling keepalives) or directly on
  paho's network thread (``dispatch="network"``: lowest latency, the handler must not block);
- **manual acknowledgement** (``manual_ack=True``): the handler gets a :class:`ReceivedMessage` and
  the owner calls :meth:`MqttConnection.ack` once the message is durably stored. A message that is
  never acked is redelivered by the broker after the next reconnect. (Without manual ack, paho acks a
  QoS 1 message as soon as it is handed over, i.e. before a worker-thread handler has run.)

Bytes in, bytes out: encoding, chunking and decoding live in ``messages`` and ``chunking``.
"""

from __future__ import annotations

import logging
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedmask.protocol.broker_url import BrokerUrl, parse_broker_url
from fedmask.protocol.topics import filter_pattern, validate_id

logger = logging.getLogger(__name__)

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
DISPATCH_MODES = ("worker", "network")
# Small request/response messages (an update, then its receipt) must not wait for Nagle's algorithm:
# with it, each receipt sat ~40 ms in the kernel and capped ingest at ~20 updates/s (benchmarks/wire.py).
DEFAULT_TCP_NODELAY = True
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600  # a device may stay offline for days and still get its queue


class TransportError(RuntimeError):
    """The broker refused or did not answer (connect, subscribe or publish)."""


def broker_list(broker: BrokerUrl | str | Sequence[BrokerUrl | str]) -> list[BrokerUrl]:
    """One or several broker URLs (nodes of one cluster: same TLS and credentials) as a list."""
    items = [broker] if isinstance(broker, (str, BrokerUrl)) else list(broker)
    if not items:
        raise ValueError("no broker URL")
    brokers = [parse_broker_url(b) if isinstance(b, str) else b for b in items]
    first = brokers[0]
    for other in brokers[1:]:
        if (other.tls, other.username, other.password) != (first.tls, first.username, first.password):
            raise ValueError(
                f"broker URLs {first} and {other} differ in TLS or credentials; the URLs of one "
                "connection name the nodes of one cluster"
            )
    return brokers


# What a broker that speaks only MQTT 3.1.1 (RabbitMQ 3.x) does with an MQTT 5 CONNECT: no CONNACK.
MQTT5_HINT = (
    "no answer to our MQTT 5 CONNECT; is the broker running there? a broker that speaks only MQTT "
    "3.1.1 (e.g. RabbitMQ 3.x) never answers one: then pass --mqtt-protocol 3.1.1 "
    "(FEDMASK_MQTT_PROTOCOL) to the aggregator and every device"
)


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us if we vanish without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(eq=False)
class ReceivedMessage:
    """One delivered MQTT message; pass it back to :meth:`MqttConnection.ack` when stored."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    duplicate: bool  # the broker's DUP flag: this is a redelivery
    mid: int
    epoch: int  # which connection delivered it; an ack on a later connection is not sent
    acked: bool = field(default=False, repr=False)


Handler = Callable[[ReceivedMessage], None]


_paho_logger = logging.getLogger(f"{__name__}.paho")


class _PahoLog(logging.LoggerAdapter):
    """paho's log lines, handed to our logger unformatted. paho's ``on_log`` hook formats every
    packet's debug line (an MQTT 5 message's properties too) whether or not anyone listens, four per
    update on the aggregator's ingest path; ``enable_logger`` lets logging drop them unformatted."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        # paho 2.2 reports "Client is not connected" as an error each time its loop runs while it waits
        # to reconnect or stops; our own connect/disconnect log lines already say so.
        if isinstance(msg, str) and msg.startswith("Client is not connected"):
            level = logging.DEBUG
        if self.logger.isEnabledFor(level):
            self.logger.log(level, msg, *args, **kwargs)


_paho_log = _PahoLog(_paho_logger, {})


def _set_tcp_nodelay(client, userdata, sock) -> None:
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttConnection:
    """One MQTT client session. Create, ``subscribe``, ``connect``, then publish; ``close`` at the end.

    ``protocol`` is ``"5"`` (default) or ``"3.1.1"``. ``on_connect(session_present)`` runs on paho's
    network thread after every successful (re)connection: it may publish with ``wait=False`` but must
    not block. Subscriptions may be made before ``connect`` (they are sent on connection).
    ``broker`` is one URL or several (the nodes of one cluster, tried in turn; see failover above).
    """

    def __init__(
        self,
        broker: BrokerUrl | str | Sequence[BrokerUrl | str],
        client_id: str,
        *,
        protocol: str = "5",
        keepalive_s: int = 30,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        will: Will | Callable[[], Will] | None = None,
        manual_ack: bool = False,
        dispatch: str = "worker",
        reconnect_min_delay_s: int = 1,
        reconnect_max_delay_s: int = 60,
        on_connect: Callable[[bool], None] | None = None,
        max_pending_handlers: int = 10_000,
        tcp_nodelay: bool | None = None,
        receive_maximum: int | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        self.brokers = broker_list(broker)
        self._broker_index = 0
        self.client_id = validate_id(client_id, "MQTT client id")
        self.protocol = protocol
        self.keepalive_s = keepalive_s
        self.session_expiry_s = session_expiry_s
        self.manual_ack = manual_ack
        self.dispatch = dispatch
        self._on_connect_hook = on_connect
        self.tcp_nodelay = DEFAULT_TCP_NODELAY if tcp_nodelay is None else tcp_nodelay
        # MQTT 5: how many unacknowledged QoS 1 messages the broker may send us at once (else its own
        # limit, Mosquitto's max_inflight_messages, 20): a consumer that acks in batches needs more.
        self.receive_maximum = receive_maximum
        self._subscriptions: dict[str, tuple[int, Handler, re.Pattern[str]]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connack = threading.Event()  # any CONNACK, success or refusal
        self._refused: ReasonCode | None = None
        # The broker closed the socket after our CONNECT without any CONNACK (RabbitMQ 3.x does so
        # with MQTT 5): connect() stops waiting and says which --mqtt-protocol to use.
        self._closed_before_connack = False
        self._socket_opened = False  # the first connection was made: later ones are paho's reconnects
        self._closing = False
        self._ever_connected = False
        self._epoch = 0
        self._network_thread: int | None = None
        # SUBACK results by mid for waiting subscribe() calls; re-subscriptions are not waited on.
        self._suback: dict[int, list[ReasonCode]] = {}
        self._suback_ready = threading.Condition(self._lock)
        # Re-subscriptions (sent from the network thread) by mid; connect() waits for them.
        self._resubscribing: dict[int, str] = {}
        self._abandoned_mids: set[int] = set()  # subscribe() calls that timed out
        self._confirmed: set[str] = set()  # filters the broker acknowledged in the current session
        # MQTT 5 PUBACK failure reason codes by mid (a success clears the entry).
        self._puback_failures: dict[int, ReasonCode] = {}
        self._handler_queue: queue.Queue[tuple[Handler, ReceivedMessage] | None] = queue.Queue(
            maxsize=max_pending_handlers
        )
        self._worker: threading.Thread | None = None
        self._client = self._make_client(will, reconnect_min_delay_s, reconnect_max_delay_s)

    @property
    def broker(self) -> BrokerUrl:
        """The broker URL in use (or tried last)."""
        return self.brokers[self._broker_index]

    @property
    def session_id(self) -> str:
        """The MQTT client id of the session on the current broker URL (see failover above)."""
        return self.client_id if self._broker_index == 0 else f"{self.client_id}.{self._broker_index}"

    def _use_broker(self, index: int) -> None:
        """Point paho at URL ``index`` with that URL's session (called with the socket closed)."""
        self._broker_index = index
        # paho's setters refuse while it is reconnecting; reconnect() reads these fields.
        self._client._host, self._client._port = self.broker.host, self.broker.port
        self._client._client_id = self.session_id.encode()

    def _next_broker(self) -> None:
        if len(self.brokers) > 1:
            self._use_broker((self._broker_index + 1) % len(self.brokers))
            logger.warning("%s: failing over to %s as %s", self.client_id, self.broker, self.session_id)

    # --- setup ------------------------------------------------------------------------------------

    def _make_client(
        self, will: Will | Callable[[], Will] | None, min_delay: int, max_delay: int
    ) -> mqtt.Client:
        kwargs = {"clean_session": False} if self.protocol == "3.1.1" else {}
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=PROTOCOLS[self.protocol],
            manual_ack=self.manual_ack,
            **kwargs,
        )
        client.enable_logger(_paho_log)  # a LoggerAdapter: paho only calls its log()
        client.reconnect_delay_set(min_delay=min_delay, max_delay=max_delay)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            client.tls_set(
                ca_certs=self.broker.ca_file,
                certfile=self.broker.certfile,
                keyfile=self.broker.keyfile,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if callable(will):
            # A will made afresh before every (re)connection, e.g. carrying the connection's time.
            def refresh_will(client, userdata) -> None:
                fresh = will()
                client.will_set(fresh.topic, fresh.payload, qos=fresh.qos, retain=fresh.retain)

        elif will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

        def pre_connect(client, userdata) -> None:
            # paho's reconnections only (the first connection is _open_socket's): after a lost
            # connection or a failed attempt, the next node of the cluster.
            if self._socket_opened:
                self._next_broker()
            if callable(will):
                refresh_will(client, userdata)

        client.on_pre_connect = pre_connect
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        client.on_connect_fail = self._handle_connect_fail
        if self.tcp_nodelay:
            client.on_socket_open = _set_tcp_nodelay
        return client

    def __enter__(self) -> MqttConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- connection -------------------------------------------------------------------------------

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network loop; return once CONNACK and all SUBACKs are in.

        Raises :class:`TransportError` if the broker refuses (the reason code is in the message) or
        does not answer within ``timeout_s``; the connection is then closed.
        """
        if self._closing:
            raise TransportError(f"connection {self.client_id} is closed; make a new one")
        if self.dispatch == "worker" and self._worker is None:
            self._worker = threading.Thread(
                target=self._work, name=f"mqtt-handlers-{self.client_id}", daemon=True
            )
            self._worker.start()
        deadline = time.monotonic() + timeout_s
        self._open_socket(deadline)
        self._client.loop_start()  # from here on paho reconnects by itself, with backoff
        if self._connack.wait(max(0.0, deadline - time.monotonic())) and self._ever_connected:
            # Return only once the subscriptions are in place on this very connection, so nothing
            # published next is missed: a connection lost meanwhile is a failure, not a success.
            with self._suback_ready:
                epoch = self._epoch
                self._suback_ready.wait_for(
                    lambda: not self._resubscribing or self._epoch != epoch or not self.connected,
                    max(0.0, deadline - time.monotonic()),
                )
                lost = self._epoch != epoch or not self.connected
                ready = not lost and not self._resubscribing
            if ready:
                return
            self.close()
            if lost:
                raise TransportError(
                    f"connection to {self.broker} lost while subscribing (before every SUBACK was in)"
                )
            raise TransportError(f"no SUBACK from {self.broker} within {timeout_s:g} s")
        self.close()
        if self._refused is not None:
            raise TransportError(f"{self.broker} refused {self.client_id}: {self._refused.getName()}")
        if self.protocol == "5" and self._closed_before_connack:
            raise TransportError(
                f"{self.broker} closed the connection without answering our MQTT 5 CONNECT: it speaks "
                "only MQTT 3.1.1 (e.g. RabbitMQ 3.x); pass --mqtt-protocol 3.1.1 (FEDMASK_MQTT_PROTOCOL) "
                "to the aggregator and every device"
            )
        if self.protocol == "5":
            raise TransportError(f"no CONNACK from {self.broker} within {timeout_s:g} s: {MQTT5_HINT}")
        raise TransportError(f"no CONNACK from {self.broker} within {timeout_s:g} s")

    def _open_socket(self, deadline: float) -> None:
        """First TCP/TLS connection and CONNECT, retried until ``deadline``; the error says why it failed.

        Done here rather than in paho's loop because the loop swallows the cause (a refused port, a
        certificate the CA did not sign) into a DEBUG line.
        """
        kwargs: dict = {}
        if self.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
            if self.receive_maximum is not None:
                properties.ReceiveMaximum = self.receive_maximum
            kwargs = {"clean_start": False, "properties": properties}
        delay = 0.1
        while True:
            for index in range(len(self.brokers)):
                self._use_broker(index)
                try:
                    self._client.connect(self.broker.host, self.broker.port, self.keepalive_s, **kwargs)
                    self._socket_opened = True
                    return
                except OSError as exc:  # refused, unreachable, timeout, TLS (ssl.SSLError)
                    error = exc
                    logger.warning("cannot connect %s to %s (%s)", self.client_id, self.broker, exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                tried = ", ".join(str(b) for b in self.brokers)
                raise TransportError(f"cannot connect to {tried}: {error}") from error
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected (e.g. after a broker restart); False on timeout."""
        return self._connected.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (the broker keeps the session but discards the will), stop all threads."""
        if self._closing:
            return
        self._closing = True
        self._client.disconnect()  # also stops paho retrying while it is still connecting
        self._client.loop_stop()
        self._connected.clear()
        if self._worker is not None:
            self._handler_queue.put(None)
            self._worker.join(timeout_s)
            self._worker = None

    def _handle_connect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        self._network_thread = threading.get_ident()
        if reason_code.is_failure:
            logger.error("%s refused %s: %s", self.broker, self.client_id, reason_code.getName())
            self._refused = reason_code
            self._connack.set()
            return
        self._refused = None
        self._epoch += 1
        session_present = bool(flags.session_present)
        logger.info(
            "connected to %s as %s (MQTT %s, %s, session %s)",
            self.broker,
            self.session_id,
            self.protocol,
            reason_code.getName(),
            "resumed" if session_present else "new",
        )
        # Snapshot and flag under one lock: a concurrent subscribe() is either in the snapshot or
        # sees the connection and sends its own SUBSCRIBE.
        with self._lock:
            if not session_present or not self._ever_connected:
                self._confirmed.clear()
            subscriptions = [
                (f, q) for f, (q, _, _) in self._subscriptions.items() if f not in self._confirmed
            ]
            self._ever_connected = True
            self._connected.set()
        self._resubscribe(client, subscriptions)
        self._connack.set()
        if self._on_connect_hook is not None:
            try:
                self._on_connect_hook(session_present)
            except Exception:
                logger.exception("on_connect hook of %s failed", self.client_id)

    def _handle_connect_fail(self, client, userdata) -> None:
        if not self._closing:
            logger.warning(
                "%s: reconnecting to %s failed; retrying with backoff", self.client_id, self.broker
            )

    def _handle_disconnect(self, client, userdata, flags, reason_code: ReasonCode, properties) -> None:
        self._connected.clear()
        if not self._ever_connected and not self._connack.is_set() and not self._closing:
            self._closed_before_connack = True
            self._connack.set()  # connect() stops waiting: it raises with the reason
        with self._suback_ready:  # (self._lock) connect() stops waiting for SUBACKs
            self._resubscribing.clear()
            self._suback_ready.notify_all()
        if self._closing:
            logger.info("disconnected %s from %s", self.client_id, self.broker)
        elif self._refused is not None:  # the refusal itself was logged as an error
            logger.info("%s: connection closed after the refusal; retrying with backoff", self.client_id)
        else:
            logger.warning(
                "lost connection of %s to %s: %s; reconnecting with backoff",
                self.client_id,
                self.broker,
                reason_code.getName(),
            )

    # --- subscriptions ----------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; waits for SUBACK when connected.

        Each message goes to the first subscription (in subscription order) whose filter matches it,
        so overlapping filters never make a message be handled, or acked, twice.
        """
        pattern = filter_pattern(topic_filter)
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler, pattern)
            if not self._connected.is_set():
                return  # sent by _resubscribe on connection
        result, mid = self._client.subscribe(topic_filter, qos=qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return  # connection dropped in between; the reconnect re-subscribes
        with self._suback_ready:
            if not self._suback_ready.wait_for(lambda: mid in self._suback, timeout_s):
                self._abandoned_mids.add(mid)
                raise TransportError(f"no SUBACK for {topic_filter!r} within {timeout_s:g} s")
            codes = self._suback.pop(mid)
            failures = [code for code in codes if code.is_failure]
            if not failures:
                self._confirmed.add(topic_filter)
        if failures:
            raise TransportError(f"subscription to {topic_filter!r} refused: {failures[0].getName()}")

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and tell the broker (not waited for)."""
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
            self._confirmed.discard(topic_filter)
        self._client.unsubscribe(topic_filter)

    def _resubscribe(self, client: mqtt.Client, subscriptions: list[tuple[str, int]]) -> None:
        # Runs on the network thread, so no SUBACK can be handled before its mid is recorded.
        for topic_filter, qos in subscriptions:
            _, mid = client.subscribe(topic_filter, qos=qos)
            with self._lock:
                self._resubscribing[mid] = topic_filter
            logger.info("subscribing %s to %s (qos %d)", self.client_id, topic_filter, qos)

    def _handle_subscribe(
        self, client, userdata, mid: int, reason_codes: list[ReasonCode], properties
    ) -> None:
        for code in reason_codes:
            if code.is_failure:
                logger.error("%s: subscription (mid %d) refused: %s", self.client_id, mid, code.getName())
        with self._suback_ready:
            if mid in self._resubscribing:
                topic_filter = self._resubscribing.pop(mid)
                if not any(code.is_failure for code in reason_codes):
                    self._confirmed.add(topic_filter)
            elif mid in self._abandoned_mids:
                self._abandoned_mids.discard(mid)
            else:
                self._suback[mid] = reason_codes  # for the subscribe() call waiting on it
            self._suback_ready.notify_all()

    # --- publishing -------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        timeout_s: float = 30.0,
    ) -> mqtt.MQTTMessageInfo:
        """Publish; with ``wait`` (QoS 1), return only once the broker's PUBACK arrived.

        While disconnected, a QoS 1 message is queued by paho and sent after reconnecting; ``wait``
        then covers the reconnect too. Raises :class:`TransportError` on timeout or when an MQTT 5
        broker answers with a failure reason code.
        """
        if wait and threading.get_ident() == self._network_thread:
            raise RuntimeError("publish(wait=True) on the network thread would wait for itself")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS  # queued: paho resends it once reconnected
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if wait:
            self.wait_published([(topic, info)], timeout_s)
        return info

    def wait_published(self, sent: list[tuple[str, mqtt.MQTTMessageInfo]], timeout_s: float = 30.0) -> None:
        """Wait for the PUBACKs of several ``publish(topic, ..., wait=False)`` calls, given as (topic,
        info), all within ``timeout_s``: one round trip for a burst, not one per message. Raises like
        ``publish``."""
        deadline = time.monotonic() + timeout_s
        for topic, info in sent:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TransportError(f"no PUBACK for {topic!r} within {timeout_s:g} s")
            self._raise_if_refused(topic, info)

    def unconfirmed(
        self, sent: list[tuple[str, mqtt.MQTTMessageInfo]]
    ) -> list[tuple[str, mqtt.MQTTMessageInfo]]:
        """Of several ``publish(topic, ..., wait=False)`` calls, given as (topic, info), those whose PUBACK
        has not come yet; not waiting. Raises :class:`TransportError` if the broker refused one."""
        pending = []
        for topic, info in sent:
            if not info.is_published():
                pending.append((topic, info))
                continue
            self._raise_if_refused(topic, info)
        return pending

    def _raise_if_refused(self, topic: str, info: mqtt.MQTTMessageInfo) -> None:
        failure = self._puback_failures.pop(info.mid, None) if self._puback_failures else None
        if failure is not None:
            raise TransportError(f"broker refused publish to {topic!r}: {failure.getName()}")

    def _handle_publish(self, client, userdata, mid: int, reason_code: ReasonCode, properties) -> None:
        # Runs before paho marks the message published, so publish() sees the reason code. (A dict's
        # pop and item assignment are atomic: no lock on this path, once per message published.)
        if reason_code.is_failure:
            logger.warning("%s: publish mid %d refused: %s", self.client_id, mid, reason_code.getName())
            self._puback_failures[mid] = reason_code
        elif self._puback_failures:
            self._puback_failures.pop(mid, None)

    # --- receiving --------------------------------------------------------------------------------

    def ack(self, message: ReceivedMessage) -> None:
        """Acknowledge a message (manual-ack mode; otherwise a no-op). Idempotent.

        An ack for a message delivered on an earlier connection is not sent: the broker redelivers
        that message on the current connection, and its new copy is the one to ack.
        """
        if not self.manual_ack or message.qos == 0 or message.acked:
            return
        message.acked = True
        if message.epoch != self._epoch:
            logger.debug("not acking mid %d of an earlier connection; it will be redelivered", message.mid)
            return
        result = self._client.ack(message.mid, message.qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.info(
                "ack of mid %d not sent (%s); it will be redelivered", message.mid, mqtt.error_string(result)
            )

    def _route(self, topic: str) -> Handler | None:
        with self._lock:
            for _, handler, pattern in self._subscriptions.values():
                if pattern.fullmatch(topic):
                    return handler
            return None

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self._network_thread = threading.get_ident()
        message = ReceivedMessage(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            duplicate=bool(msg.dup),
            mid=msg.mid,
            epoch=self._epoch,
        )
        handler = self._route(message.topic)
        if handler is None:
            logger.warning("%s: no handler for %s; acknowledged and dropped", self.client_id, message.topic)
            self.ack(message)
        elif self.dispatch == "network":
            self._run(handler, message)
        else:
            self._handler_queue.put((handler, message))  # blocks when full: backpressure on the broker

    def _work(self) -> None:
        while (item := self._handler_queue.get()) is not None:
            self._run(*item)

    def _run(self, handler: Handler, message: ReceivedMessage) -> None:
        try:
            handler(message)
        except Exception:
            # Not acked (manual mode): it is redelivered after the next reconnect. An owner that
            # wants a poison message gone acks it in its own except clause.
            logger.exception("%s: handler for %s failed", self.client_id, message.topic)
