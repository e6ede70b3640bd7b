"""End to end over a real Mosquitto: bad input on a device's uplink gets a specific, logged, recorded
rejection, and the aggregator keeps serving.

A raw paho client acts as registered devices (`dev-a`, `dev-b`: they announced their presence) and
publishes what a broken or hostile device could: 40 kinds of bad input at the codec, chunking and
round layers, reaching every rejection reason of the protocol. For each, the test waits for the
rejection the store recorded, checks its reason and the aggregator's log line, and (for whole
messages) the `rejected` directive the device got back. Valid updates in between are accepted, and
the rounds close.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
from fixtures.broker import BrokerHandle, MqttProbe
from fixtures.fleet import fedmask_task, poll, presence, round_state
from sqlalchemy import Row, select

from fedmask.aggregator.service import AggregatorService
from fedmask.protocol import messages
from fedmask.protocol.chunking import split
from fedmask.protocol.errors import Rejection
from fedmask.protocol.mask_coding import Base, MaskContext
from fedmask.protocol.messages import seal
from fedmask.protocol.tensor_codec import Coded, encode_array
from fedmask.protocol.topics import Topics
from fedmask.storage import Store
from fedmask.storage.schema import Rejection as RejectionRow

pytestmark = pytest.mark.broker

FLEET = "e2e-bad-input"
TOPICS = Topics(FLEET)
DEVICES = ("dev-a", "dev-b")
NUM_CLASSES = 14
EXPIRY_S = 2.0  # the aggregator's reassembly timeout in this test: incomplete messages expire fast


class Harness:
    """The aggregator under test, a raw MQTT client speaking for the devices, and the store."""

    def __init__(self, broker: BrokerHandle, store: Store, caplog: pytest.LogCaptureFixture) -> None:
        self.store = store
        self.caplog = caplog
        self.task = fedmask_task(
            FLEET,
            NUM_CLASSES,
            task_id="bad-input",
            rounds=2,
            quorum=2,
            deadline_s=600.0,
            staleness_bound=0,  # one round late is already too late: stale_round is reachable
        )
        self.aggregator = AggregatorService(
            broker.url(), FLEET, self.task, store, reassembly_timeout_s=EXPIRY_S
        )
        self.num_bits = self.aggregator.manager.expected["mask"][0]
        self.client = MqttProbe(broker.host, broker.port, client_id="raw-devices")
        self.rng = np.random.default_rng(0)

    def start(self) -> None:
        self.client.connect()
        self.client.subscribe(f"{TOPICS.prefix}/down/+")
        for device in DEVICES:
            online = messages.Presence(fleet=FLEET, device=device, status="online", at=0.0)
            self.client.publish(TOPICS.state(device), messages.encode(online), retain=True)
        self.aggregator.start()
        for device in DEVICES:
            poll(lambda d=device: presence(self.store, FLEET, d) == "online", 10, f"{device} registered")

    def stop(self) -> None:
        self.aggregator.stop()
        self.client.close()

    # --- what a device sends -------------------------------------------------------------------

    def update(self, device: str = "dev-a", round_no: int = 1, **fields) -> messages.Update:
        values = {
            "fleet": FLEET,
            "task_id": self.task.task_id,
            "device": device,
            "round": round_no,
            "base_round": round_no,
            "num_samples": 50,
            "metrics": {"loss": 1.0},
            "body": {"mask": Coded(self.rng.random(self.num_bits) < 0.5, "bits")},
            **fields,
        }
        return messages.Update(**values)

    def raw_update(self, **changes) -> dict:
        """A valid update as its wire map (no checksum), with ``changes`` applied: for ``seal``."""
        raw = msgpack.unpackb(messages.encode(self.update()), raw=False)
        del raw["sha256"]
        raw.update(changes)
        return raw

    def mask_map(self, **changes) -> dict:
        """The wire form of a valid mask, with ``changes`` to its coded fields (c, s, z, d)."""
        return {**encode_array(Coded(self.rng.random(self.num_bits) < 0.5, "bits")), **changes}

    def publish(self, payload: bytes, device: str = "dev-a") -> None:
        self.client.publish(TOPICS.up(device), payload)

    # --- what the aggregator did about it -----------------------------------------------------

    def rejections(self) -> list[Row]:
        """Every rejection recorded, oldest first; also those outside a round (e.g. after the last)."""
        with self.store.engine.connect() as connection:
            return list(connection.execute(select(RejectionRow).order_by(RejectionRow.id)))

    def directives(self, device: str) -> list[messages.Directive]:
        return [
            messages.decode(bytes(m.payload), messages.Directive)
            for m in list(self.client.messages)
            if m.topic == TOPICS.down(device)
        ]

    def expect_rejection(
        self,
        reason: str,
        send: Callable[[], None],
        *,
        device: str = "dev-a",
        directive: bool = True,
        detail: str = "",
    ) -> Row:
        """Send, then wait for the recorded rejection; check the log line and the device's directive."""
        recorded, answered = len(self.rejections()), len(self.directives(device))
        send()

        def new() -> list[Row]:
            return [r for r in self.rejections()[recorded:] if r.reason == reason and detail in r.detail]

        rejection = poll(new, 15, f"a {reason} rejection")[0]
        assert rejection.device_id == device and rejection.topic == TOPICS.up(device)
        assert rejection.task_id == self.task.task_id
        assert f"rejected message from {device} on {TOPICS.up(device)}: {reason} (" in self.caplog.text
        if directive:  # a whole message was refused: the device is told why
            poll(lambda: len(self.directives(device)) > answered, 10, f"the {reason} directive")
            answer = self.directives(device)[answered]
            assert (answer.kind, answer.reason) == ("rejected", reason)
        return rejection

    def expect_accepted(self, update: messages.Update) -> None:
        answered = len(self.directives(update.device))
        self.publish(messages.encode(update), update.device)
        poll(lambda: len(self.directives(update.device)) > answered, 10, "a receipt")
        answer = self.directives(update.device)[answered]
        assert (answer.kind, answer.round) == ("receipt", update.base_round), answer


def frame(msg_id: str, index: int, count: int, size: int, data: bytes = b"x", digest: bytes = bytes(32)):
    """A chunk frame as a device could forge it (``chunking`` would never build a wrong one)."""
    fields = {"v": 1, "type": "chunk", "id": msg_id, "index": index, "count": count, "size": size}
    return msgpack.packb({**fields, "total_sha256": digest, "data": data}, use_bin_type=True)


@pytest.fixture
def harness(open_mosquitto: BrokerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="fedmask.aggregator")  # benign ones are logged at DEBUG
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    harness = Harness(open_mosquitto, store, caplog)
    harness.start()
    yield harness
    harness.stop()
    store.close()


def test_bad_input_is_rejected_specifically_and_the_aggregator_keeps_serving(harness: Harness) -> None:
    h = harness
    valid = messages.encode(h.update())
    seen: set[str] = set()

    def refused(reason: str, payload: bytes | Callable[[], None], **kwargs) -> Row:
        seen.add(reason)
        send = payload if callable(payload) else (lambda: h.publish(payload, kwargs.get("device", "dev-a")))
        return h.expect_rejection(reason, send, **kwargs)

    # --- the codec: what the payload itself says --------------------------------------------------
    # Not even a map: refused by the reassembler, before anything about it is known (no directive).
    refused("malformed_msgpack", b"\xc1 is never valid msgpack", directive=False)
    refused("malformed_msgpack", valid[:-7], directive=False)  # truncated
    refused("not_a_map", msgpack.packb([1, 2, 3]), directive=False)
    refused("unsupported_version", seal(h.raw_update(v=2)))
    refused("unknown_type", seal(h.raw_update(type="gossip")))
    presence = messages.Presence(fleet=FLEET, device="dev-a", status="online", at=0.0)
    refused("unexpected_type", messages.encode(presence))  # a known type this topic does not carry
    refused("bad_checksum", valid[:-1] + bytes([valid[-1] ^ 0x01]))
    without_samples = h.raw_update()
    del without_samples["num_samples"]
    refused("missing_field", seal(without_samples))
    refused("wrong_field_type", seal(h.raw_update(round="1")))
    refused("wrong_field_type", seal(h.raw_update(metrics=[1.0, 2.0])))
    refused("nan_metric", seal(h.raw_update(metrics={"loss": float("nan")})))
    refused("bad_value", seal(h.raw_update(num_samples=-1)))
    refused("bad_value", seal(h.raw_update(base_round=2)))  # after its own round
    refused("bad_id", seal(h.raw_update(device="dev a!")))
    refused("wrong_fleet", messages.encode(h.update(fleet="another-fleet")))
    # Bodies: the mask must be exactly the model's 78,048 bits, coded as declared.
    refused("oversize", seal(h.raw_update(body={"mask": h.mask_map(s=[h.num_bits * 2])})))
    short = h.mask_map(z=False, d=bytes(h.num_bits // 8 - 1))
    refused("wrong_mask_length", seal(h.raw_update(body={"mask": short})))
    refused("unknown_coding", seal(h.raw_update(body={"mask": h.mask_map(c="bits7")})))
    refused("bad_array", seal(h.raw_update(body={"mask": h.mask_map(z=True, d=b"not zlib")})))
    wrong_names = {"scores": Coded(np.zeros(16, np.float32), "f32")}
    refused("wrong_body", messages.encode(h.update(body=wrong_names)))
    wrong_shape = {"mask": Coded(np.ones(h.num_bits - 8, bool), "bits")}
    refused("wrong_body", messages.encode(h.update(body=wrong_shape)))

    # --- the round manager: who sends what, when ---------------------------------------------------
    refused("unknown_device", messages.encode(h.update(device="dev-z")), device="dev-z")
    refused("device_mismatch", messages.encode(h.update(device="dev-b")))  # on dev-a's topic
    refused("wrong_task", messages.encode(h.update(task_id="another-task")))
    refused("future_round", messages.encode(h.update(round_no=2)))

    # --- chunking: frames that cannot make a message -----------------------------------------------
    refused("chunk_out_of_range", frame("aaaa000000000001", index=3, count=3, size=30), directive=False)
    refused("chunk_out_of_range", frame("aaaa000000000002", index=0, count=0, size=30), directive=False)
    mismatched = split(valid, 2048)

    def disagreeing_frames() -> None:
        h.publish(mismatched[0])
        tampered = msgpack.unpackb(mismatched[1], raw=False)
        tampered["total_sha256"] = hashlib.sha256(b"something else").digest()
        h.publish(msgpack.packb(tampered, use_bin_type=True))

    refused("chunk_mismatch", disagreeing_frames, directive=False)
    frames = split(messages.encode(h.update()), 2048)
    msg_id = msgpack.unpackb(frames[0], raw=False)["id"]

    def twice() -> None:
        h.publish(frames[0])
        h.publish(frames[0])

    refused("duplicate_chunk", twice, directive=False)  # benign, still recorded
    # ...and the rest of that message never comes: it expires.
    refused("missing_chunk", lambda: None, directive=False, detail=msg_id)
    refused("oversize", frame("aaaa000000000003", 0, 2, 64 * 2**20 + 1), directive=False)

    def flood() -> None:
        # Declared sizes are reserved up front, at most 64 MiB per sender (one sender's fifth partial
        # message only supersedes its own): four senders holding 64 MiB each are the whole budget.
        for i in range(4):
            h.publish(frame(f"bbbb00000000000{i}", 0, 2, 64 * 2**20), f"flood-{i}")
        h.publish(frame("cccc000000000000", 0, 2, 64 * 2**20), "dev-b")

    refused("reassembly_full", flood, device="dev-b", directive=False)

    # --- the aggregator still serves: valid updates close the rounds ------------------------------
    first = h.update("dev-a", 1)
    h.expect_accepted(first)
    replay = h.update("dev-a", 1)  # another update for a round dev-a already contributed to
    refused("replayed_update", messages.encode(replay))
    # Masks coded against a base (mctx): the aggregator now holds dev-a's round-1 mask, dev-b none.
    held = Base(1, first.body["mask"].array)
    near = held.mask ^ (h.rng.random(h.num_bits) < 0.01)

    def against(base: Base, device: str = "dev-a") -> messages.Update:
        return h.update(device, 1, body={"mask": Coded(near, "bits", context=MaskContext(prev=base))})

    refused("missing_base", messages.encode(against(held, "dev-b")), device="dev-b")
    refused("stale_base", messages.encode(against(Base(0, held.mask))))
    refused("base_mismatch", messages.encode(against(Base(1, near))))
    forged = msgpack.unpackb(messages.encode(against(held)), raw=False)
    assert forged["body"]["mask"]["c"] == "mctx"
    del forged["sha256"]
    forged["body"]["mask"]["h"] = bytes(8)  # the checksum is redone: only the mask digest is wrong
    refused("bad_mask_digest", seal(forged))
    refused("replayed_update", messages.encode(against(held)))  # it decodes: then the round says no
    h.expect_accepted(h.update("dev-b", 1))
    poll(lambda: round_state(h.store, h.task.task_id, 1) == "closed", 10, "round 1 closed")
    refused("stale_round", messages.encode(h.update("dev-a", 2, base_round=1)))
    h.expect_accepted(h.update("dev-a", 2))
    h.expect_accepted(h.update("dev-b", 2))
    poll(lambda: round_state(h.store, h.task.task_id, 2) == "closed", 10, "round 2 closed")
    refused("round_closed", messages.encode(h.update("dev-a", 3)))  # the run is finalizing

    # Every reason in the protocol's one list is reachable from a device's uplink, and was reached.
    assert seen == {reason.value for reason in Rejection}
    # Refusals during a round are part of that round's history, as operators query it.
    round_one = h.store.round_detail(h.task.task_id, 1).rejections
    assert {"malformed_msgpack", "wrong_body", "replayed_update"} <= {r.reason for r in round_one}
    rounds = h.store.list_rounds(task_id=h.task.task_id)
    assert [(r.round_no, r.state, r.participants) for r in rounds] == [(1, "closed", 2), (2, "closed", 2)]
    stored = {u.device_id: u.payload for u in h.store.accepted_updates(h.task.task_id, 1)}
    assert stored["dev-a"] == messages.encode(first)  # the replay did not replace what was accepted
