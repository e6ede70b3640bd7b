"""protocol.transport against a real Mosquitto (tests/fixtures/broker.py): round trips on MQTT 5 and
3.1.1, persistent sessions, redelivery of unacknowledged messages, retained task and chunked round for a
late subscriber, the last will, credentials and ACL refusals, reconnects and shared subscriptions."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from fedmask.protocol import messages as m
from fedmask.protocol.chunking import Reassembler, publications
from fedmask.protocol.tensor_codec import Coded
from fedmask.protocol.topics import Topics, chunk_base
from fedmask.protocol.transport import MqttConnection, ReceivedMessage, TransportError, Will

pytestmark = pytest.mark.broker

PROTOCOLS = ["5", "3.1.1"]
TOPICS = Topics("fleet-a")


class Inbox:
    """A handler that records messages (acking them unless told not to) and lets a test wait."""

    def __init__(self, connection: Callable[[], MqttConnection] | None = None, ack: bool = True) -> None:
        self.connection, self.do_ack = connection, ack
        self.messages: list[ReceivedMessage] = []
        self._cond = threading.Condition()

    def __call__(self, message: ReceivedMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()
        if self.do_ack and self.connection is not None:
            self.connection().ack(message)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"{len(self.messages)} of {count} messages within {timeout}s")
            return list(self.messages)

    def payloads(self) -> list[bytes]:
        with self._cond:
            return [msg.payload for msg in self.messages]


@pytest.fixture
def connections() -> Iterator[Callable[..., MqttConnection]]:
    """Factory of MqttConnections that are closed at teardown."""
    made: list[MqttConnection] = []

    def make(url: str, client_id: str, **options) -> MqttConnection:
        options.setdefault("reconnect_max_delay_s", 2)
        connection = MqttConnection(url, client_id, **options)
        made.append(connection)
        return connection

    yield make
    for connection in made:
        connection.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_subscribe_round_trip(open_mosquitto, connections, protocol: str) -> None:
    sub = connections(open_mosquitto.url(), "agg-1", protocol=protocol)
    inbox = Inbox()
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    pub = connections(open_mosquitto.url(), "dev-1", protocol=protocol)
    pub.connect()
    payload = m.encode(m.Presence(fleet="fleet-a", device="dev-1", status="online", at=time.time()))
    info = pub.publish(TOPICS.up("dev-1"), payload)
    assert info.is_published()
    [received] = inbox.wait_for(1)
    assert (received.topic, received.payload, received.qos, received.retain) == (
        TOPICS.up("dev-1"),
        payload,
        1,
        False,
    )
    assert m.decode(received.payload, m.Presence).device == "dev-1"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_session_receives_what_was_published_while_offline(
    open_mosquitto, connections, protocol
) -> None:
    first = connections(open_mosquitto.url(), "agg-1", protocol=protocol)
    first.subscribe(TOPICS.all_up, Inbox())
    first.connect()
    first.close()  # clean disconnect: the broker keeps the session and queues for it
    pub = connections(open_mosquitto.url(), "dev-1", protocol=protocol)
    pub.connect()
    sent = [f"update {i}".encode() for i in range(5)]
    for payload in sent:
        pub.publish(TOPICS.up("dev-1"), payload)
    inbox = Inbox()
    again = connections(open_mosquitto.url(), "agg-1", protocol=protocol)
    again.subscribe(TOPICS.all_up, inbox)
    again.connect()
    assert [msg.payload for msg in inbox.wait_for(5)] == sent


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unacked_message_is_redelivered_after_reconnect(open_mosquitto, connections, protocol) -> None:
    """Mosquitto keeps an unacknowledged QoS 1 message in flight for the session and resends it, with
    the DUP flag, when the client reconnects; an acknowledged one is not resent."""
    pub = connections(open_mosquitto.url(), "dev-1", protocol=protocol)
    pub.connect()
    sub = connections(open_mosquitto.url(), "agg-1", protocol=protocol, manual_ack=True)
    unacked = Inbox(ack=False)
    sub.subscribe(TOPICS.all_up, unacked)
    sub.connect()
    pub.publish(TOPICS.up("dev-1"), b"not yet stored")
    [first] = unacked.wait_for(1)
    assert not first.duplicate
    sub.close()  # as if the aggregator crashed before committing

    holder: list[MqttConnection] = []
    inbox = Inbox(lambda: holder[0])
    sub = connections(open_mosquitto.url(), "agg-1", protocol=protocol, manual_ack=True)
    holder.append(sub)
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    [again] = inbox.wait_for(1)
    assert again.payload == b"not yet stored" and again.duplicate
    sub.close()  # this time it was acked

    inbox = Inbox(lambda: holder[1])
    sub = connections(open_mosquitto.url(), "agg-1", protocol=protocol, manual_ack=True)
    holder.append(sub)
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    pub.publish(TOPICS.up("dev-1"), b"next")
    # in-flight messages are resent before anything new, so seeing "next" first proves no redelivery
    assert inbox.wait_for(1)[0].payload == b"next"


def announcement(round_no: int, n_bits: int) -> m.RoundAnnouncement:
    import numpy as np

    mask = np.random.default_rng(round_no).random(n_bits) > 0.5
    return m.RoundAnnouncement(
        fleet="fleet-a",
        task_id="t1",
        round=round_no,
        deadline=time.time() + 60,
        body={"mask": Coded(mask, "bits")},
    )


def make_task() -> m.Task:
    return m.Task(
        fleet="fleet-a",
        task_id="t1",
        strategy="fedmask",
        arch="mlp",
        num_classes=6,
        seed=1,
        weights_digest="0" * 64,
        mask_config={},
        hyper={"lr": 0.1, "local_epochs": 1, "batch_size": 16, "finetune_epochs": 1, "finetune_lr": 0.01},
        schedule=m.Schedule(rounds=3, quorum=1, deadline_s=30, staleness_bound=2, max_payload=4096),
        created_at=time.time(),
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_late_subscriber_gets_retained_task_and_chunked_round(open_mosquitto, connections, protocol) -> None:
    aggregator = connections(open_mosquitto.url(), "aggregator", protocol=protocol)
    aggregator.connect()
    task = make_task()
    # an earlier, larger announcement leaves more retained frames than the current one needs
    for pub in publications(TOPICS.task, m.encode(task), max_payload=4096, retain=True):
        aggregator.publish(pub.topic, pub.payload, retain=pub.retain)
    old = publications(TOPICS.round, m.encode(announcement(1, 120_000)), max_payload=4096, retain=True)
    current = announcement(2, 40_000)
    new = publications(
        TOPICS.round,
        m.encode(current),
        max_payload=4096,
        retain=True,
        previous_frames=sum(p.topic.startswith(TOPICS.round + "/chunk/") for p in old),
    )
    for pub in [*old, *new]:
        aggregator.publish(pub.topic, pub.payload, retain=pub.retain)

    device = connections(open_mosquitto.url(), "dev-1", protocol=protocol)
    inbox = Inbox()
    for topic_filter in TOPICS.device_filters("dev-1"):
        device.subscribe(topic_filter, inbox)
    device.connect()
    frames_needed = 1 + sum(p.payload != b"" and p.topic != TOPICS.task for p in new)
    received = inbox.wait_for(frames_needed)
    assert all(msg.retain for msg in received)
    reassembler = Reassembler()
    decoded = []
    for msg in received:
        assert TOPICS.parse(msg.topic).kind in ("task", "round")
        whole = reassembler.accept(chunk_base(msg.topic), msg.payload)
        if whole is not None:
            decoded.append(m.decode(whole, (m.Task, m.RoundAnnouncement), fleet="fleet-a"))
    assert len(decoded) == 2 and task in decoded and current in decoded
    assert reassembler.pending_messages == 0  # no stale frame of round 1 survived


def test_last_will_marks_a_vanished_device_offline(open_mosquitto, connections) -> None:
    aggregator = connections(open_mosquitto.url(), "aggregator")
    inbox = Inbox()
    aggregator.subscribe(TOPICS.all_state, inbox)
    aggregator.connect()
    offline = m.encode(m.Presence(fleet="fleet-a", device="dev-1", status="offline", at=0.0))
    online = m.encode(m.Presence(fleet="fleet-a", device="dev-1", status="online", at=1.0))
    script = (
        "import sys, time\n"
        "from fedmask.protocol.transport import MqttConnection, Will\n"
        "c = MqttConnection(sys.argv[1], 'dev-1', will=Will(sys.argv[2], bytes.fromhex(sys.argv[3])))\n"
        "c.connect()\n"
        "c.publish(sys.argv[2], bytes.fromhex(sys.argv[4]), retain=True)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    args = [
        sys.executable,
        "-c",
        script,
        open_mosquitto.url(),
        TOPICS.state("dev-1"),
        offline.hex(),
        online.hex(),
    ]
    device = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert device.stdout.readline().strip() == "ready"
        assert m.decode(inbox.wait_for(1)[0].payload, m.Presence).status == "online"
        os.kill(device.pid, signal.SIGKILL)  # no DISCONNECT: the broker publishes the will
    finally:
        device.kill()
        device.wait()
    assert m.decode(inbox.wait_for(2)[1].payload, m.Presence).status == "offline"
    # and it is retained: whoever looks next sees the device offline
    late = Inbox()
    watcher = connections(open_mosquitto.url(), "watcher")
    watcher.subscribe(TOPICS.state("dev-1"), late)
    watcher.connect()
    assert late.wait_for(1)[0].payload == offline


def test_credentials_and_acl_refusals_are_reported(mosquitto, connections, tmp_path) -> None:
    good = connections(mosquitto.url("dev-1"), "dev-1")
    good.connect()
    good.publish(TOPICS.up("dev-1"), b"mine")
    with pytest.raises(TransportError, match="Not authorized"):
        good.publish(TOPICS.up("dev-2"), b"not mine")  # MQTT 5 PUBACK 0x87 from the ACL
    with pytest.raises(TransportError, match="refused dev-3"):
        connections(mosquitto.url().replace("mqtt://", "mqtt://dev-3:wrong@"), "dev-3").connect(timeout_s=5)


def test_unconfirmed_publishes_are_looked_at_without_waiting(mosquitto, connections) -> None:
    # The aggregator checks its receipts' PUBACKs this way after each commit instead of waiting for them.
    good = connections(mosquitto.url("dev-1"), "dev-1")
    good.connect()
    sent = [
        (TOPICS.up("dev-1"), good.publish(TOPICS.up("dev-1"), b"x" * 1000, wait=False)) for _ in range(50)
    ]
    pending = good.unconfirmed(sent)
    assert all(entry in sent for entry in pending)  # a subset, in order, none of it waited for
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        time.sleep(0.01)
        pending = good.unconfirmed(pending)
    assert pending == []
    refused = [(TOPICS.up("dev-2"), good.publish(TOPICS.up("dev-2"), b"not mine", wait=False))]
    refused[0][1].wait_for_publish(10)
    with pytest.raises(TransportError, match=r"refused .*dev-2.*Not authorized"):
        good.unconfirmed(refused)


def test_credentials_file_logs_in(mosquitto, connections) -> None:
    from fedmask.protocol.broker_url import parse_broker_url

    broker = parse_broker_url(mosquitto.url(), credentials_file=mosquitto.credentials_file("dev-2"), env={})
    connection = connections(broker, "dev-2")
    connection.connect()
    connection.publish(TOPICS.up("dev-2"), b"ok")


def test_reconnects_and_resubscribes_when_the_broker_lost_the_session(
    open_mosquitto, connections, caplog
) -> None:
    inbox = Inbox()
    sub = connections(open_mosquitto.url(), "agg-1", reconnect_min_delay_s=1)
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    open_mosquitto.kill()  # SIGKILL: nothing saved, the session is gone
    assert _wait_disconnected(sub)
    with caplog.at_level(logging.INFO, logger="fedmask.protocol.transport"):
        open_mosquitto.start()
        assert sub.wait_connected(15)
        pub = connections(open_mosquitto.url(), "dev-1")
        pub.connect()
        deadline = time.monotonic() + 10
        while not inbox.payloads() and time.monotonic() < deadline:  # the SUBSCRIBE may still be in flight
            pub.publish(TOPICS.up("dev-1"), b"after restart")
            time.sleep(0.2)
    assert b"after restart" in inbox.payloads()
    assert "session new" in caplog.text and "lost connection of agg-1" in caplog.text


def _wait_disconnected(connection: MqttConnection, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while connection.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    return not connection.connected


def test_publish_waits_across_a_broker_restart(open_mosquitto, connections) -> None:
    inbox = Inbox()
    sub = connections(open_mosquitto.url(), "agg-1")
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    pub = connections(open_mosquitto.url(), "dev-1", reconnect_min_delay_s=1)
    pub.connect()
    open_mosquitto.restart()  # clean stop: sessions are saved and restored
    pub.publish(TOPICS.up("dev-1"), b"queued while down", timeout_s=20)
    assert inbox.wait_for(1, timeout=20)[0].payload == b"queued while down"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_subscription_splits_updates_between_workers(open_mosquitto, connections, protocol) -> None:
    inboxes = [Inbox(), Inbox()]
    for i, inbox in enumerate(inboxes):
        worker = connections(open_mosquitto.url(), f"agg-{i}", protocol=protocol)
        worker.subscribe(TOPICS.aggregator_filters("workers")[0], inbox)
        worker.connect()
    pub = connections(open_mosquitto.url(), "dev-1")
    pub.connect()
    sent = [f"u{i}".encode() for i in range(20)]
    for payload in sent:
        pub.publish(TOPICS.up("dev-1"), payload)
    deadline = time.monotonic() + 10
    while sum(len(i.payloads()) for i in inboxes) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = [p for inbox in inboxes for p in inbox.payloads()]
    assert sorted(got) == sorted(sent)  # each update handled exactly once
    assert all(inbox.payloads() for inbox in inboxes)  # and both workers took a share


def test_publish_with_wait_on_the_network_thread_is_refused(open_mosquitto, connections) -> None:
    errors: list[Exception] = []
    holder: list[MqttConnection] = []

    def handler(message: ReceivedMessage) -> None:
        try:
            holder[0].publish(TOPICS.down("dev-1"), b"reply")
        except RuntimeError as exc:
            errors.append(exc)

    sub = connections(open_mosquitto.url(), "agg-1", dispatch="network")
    holder.append(sub)
    sub.subscribe(TOPICS.all_up, handler)
    sub.connect()
    pub = connections(open_mosquitto.url(), "dev-1")
    pub.connect()
    pub.publish(TOPICS.up("dev-1"), b"x")
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        time.sleep(0.02)
    assert errors and "network thread" in str(errors[0])


def test_will_and_options_are_validated() -> None:
    with pytest.raises(ValueError, match="protocol"):
        MqttConnection("mqtt://127.0.0.1:1", "x", protocol="4")
    with pytest.raises(ValueError, match="dispatch"):
        MqttConnection("mqtt://127.0.0.1:1", "x", dispatch="threads")
    assert Will("t", b"x").retain and Will("t", b"x").qos == 1


def test_connect_to_nothing_times_out_with_a_clear_error(connections) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(TransportError, match=r"cannot connect to .*Connection refused"):
        connections(f"mqtt://127.0.0.1:{port}", "lonely").connect(timeout_s=1.5)


class DropOnSubscribe:
    """A TCP relay to a real broker that cuts the connection when the client sends a SUBSCRIBE
    (after the broker's CONNACK went through): a connection lost while connect() subscribes."""

    SUBSCRIBE = 0x82  # first byte of an MQTT SUBSCRIBE packet

    def __init__(self, host: str, port: int) -> None:
        import socket

        self.upstream = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            broker = socket.create_connection(self.upstream, timeout=5)
            threading.Thread(target=self._pump, args=(client, broker, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, False), daemon=True).start()

    def _pump(self, source, sink, from_client: bool) -> None:
        import socket

        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client and data[0] == self.SUBSCRIBE:
                    self.cuts += 1
                    break
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connect_fails_when_the_connection_drops_while_subscribing(
    open_mosquitto, connections, protocol
) -> None:
    relay = DropOnSubscribe(open_mosquitto.host, open_mosquitto.port)
    try:
        connection = connections(f"mqtt://127.0.0.1:{relay.port}", "cut-off", protocol=protocol)
        connection.subscribe("fleet-a/up/#", Inbox())
        started = time.monotonic()
        with pytest.raises(TransportError, match="lost while subscribing"):
            connection.connect(timeout_s=5)
        assert time.monotonic() - started < 4  # said at once, not after the SUBACK timeout
        assert relay.cuts >= 1 and not connection.connected
    finally:
        relay.close()


def test_tls_round_trip_verifies_the_broker_certificate(tls_mosquitto, connections, tmp_path) -> None:
    from fedmask.protocol.broker_url import parse_broker_url

    port, ca = tls_mosquitto
    broker = parse_broker_url(f"mqtts://127.0.0.1:{port}", ca_file=ca, env={})
    inbox = Inbox()
    sub = connections(broker, "agg-1")
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    pub = connections(broker, "dev-1")
    pub.connect()
    pub.publish(TOPICS.up("dev-1"), b"over tls")
    assert inbox.wait_for(1)[0].payload == b"over tls"
    # a CA that did not sign the broker's certificate: the TLS handshake fails, no connection
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(other / "k"),
            "-out",
            str(other / "ca.crt"),
            "-subj",
            "/CN=other",
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    wrong = parse_broker_url(f"mqtts://127.0.0.1:{port}", ca_file=other / "ca.crt", env={})
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        connections(wrong, "dev-2").connect(timeout_s=1)


def test_on_connect_hook_announces_presence_and_reports_the_session(open_mosquitto, connections) -> None:
    aggregator = connections(open_mosquitto.url(), "aggregator")
    inbox = Inbox()
    aggregator.subscribe(TOPICS.all_state, inbox)
    aggregator.connect()
    sessions: list[bool] = []
    online = m.encode(m.Presence(fleet="fleet-a", device="dev-1", status="online", at=1.0))

    def make_device() -> MqttConnection:
        holder: list[MqttConnection] = []

        def announce(session_present: bool) -> None:  # network thread: publish without waiting
            sessions.append(session_present)
            holder[0].publish(TOPICS.state("dev-1"), online, retain=True, wait=False)

        device = connections(open_mosquitto.url(), "dev-1", on_connect=announce)
        holder.append(device)
        return device

    first = make_device()
    first.connect()
    first.close()
    make_device().connect()
    assert [msg.payload for msg in inbox.wait_for(2)] == [online, online]
    assert sessions == [False, True]  # a new session, then the same one resumed


def test_broker_sends_at_most_max_inflight_unacked_messages(open_mosquitto, connections) -> None:
    """Why chunk frames are acked as they arrive (docs/protocol.md): with 20 QoS 1 messages unacked
    (the project's `max_inflight_messages 20`), Mosquitto sends nothing more until one is acked."""
    holder: list[MqttConnection] = []
    inbox = Inbox(ack=False)
    sub = connections(open_mosquitto.url(), "agg-1", manual_ack=True)
    holder.append(sub)
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    pub = connections(open_mosquitto.url(), "dev-1")
    pub.connect()
    for i in range(25):
        pub.publish(TOPICS.up("dev-1"), b"frame %d" % i)
    held = inbox.wait_for(20)
    time.sleep(0.5)  # give the broker every chance to send more
    assert len(inbox.payloads()) == 20
    for message in held[:5]:
        sub.ack(message)
    assert len(inbox.wait_for(25)) == 25


def test_paho_log_lines_are_formatted_only_when_someone_listens(open_mosquitto, connections, caplog) -> None:
    """paho's per-packet debug lines reach our logger at DEBUG, and cost nothing above it: the MQTT 5
    properties they print are not even turned into text (they were, at every packet, via ``on_log``)."""
    from paho.mqtt.properties import Properties

    formatted = []
    real_str = Properties.__str__

    def counting_str(self) -> str:
        formatted.append(1)
        return real_str(self)

    sub = connections(open_mosquitto.url(), "agg-log")
    inbox = Inbox()
    sub.subscribe(TOPICS.all_up, inbox)
    sub.connect()
    pub = connections(open_mosquitto.url(), "dev-log")
    pub.connect()
    paho_log = "fedmask.protocol.transport.paho"
    Properties.__str__ = counting_str
    try:
        with caplog.at_level(logging.INFO, logger=paho_log):
            pub.publish(TOPICS.up("dev-log"), b"quiet").wait_for_publish(5)
            inbox.wait_for(1)
        assert formatted == [], "a debug line was formatted with nobody listening"
        assert not [r for r in caplog.records if r.name == paho_log]
        with caplog.at_level(logging.DEBUG, logger=paho_log):
            pub.publish(TOPICS.up("dev-log"), b"heard").wait_for_publish(5)
            inbox.wait_for(2)
        lines = [r.getMessage() for r in caplog.records if r.name == paho_log]
        assert any(line.startswith("Received PUBLISH") for line in lines), lines
        assert formatted, "MQTT 5 properties were not in the debug lines"
    finally:
        Properties.__str__ = real_str


def test_paho_not_connected_error_is_logged_as_debug(caplog) -> None:
    from fedmask.protocol.transport import _paho_log

    with caplog.at_level(logging.DEBUG, logger="fedmask.protocol.transport.paho"):
        _paho_log.log(logging.ERROR, "Client is not connected (%s)", "x")
        _paho_log.log(logging.ERROR, "Caught exception in on_message: %s", "boom")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "Client is not connected (x)"),
        (logging.ERROR, "Caught exception in on_message: boom"),
    ]
