"""End to end under the test/production broker policy: password file, no anonymous clients, and the
project ACL (`broker_config/fedmask.acl`), which lets each device write only its own topics.

`tests/test_broker_acl.py` checks the ACL rule by rule with raw clients; this checks that the real
protocol needs nothing the ACL refuses: an aggregator and agents with per-device credentials run a
whole task (presence and last will, retained task and rounds, chunked updates, receipts, finalize
directives, chunked results) on MQTT 5 and MQTT 3.1.1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fixtures.broker import AGGREGATOR, BrokerHandle
from fixtures.fleet import fedmask_task, poll, renamed, smallest

from fedmask.aggregator.service import AggregatorService
from fedmask.datasets.federated import FederatedDataset
from fedmask.device_agent.agent import DeviceAgent
from fedmask.protocol.broker_url import parse_broker_url
from fedmask.protocol.transport import MqttConnection, TransportError
from fedmask.storage import Store

pytestmark = pytest.mark.broker

FLEET = "e2e-auth"
MAX_PAYLOAD = 2048  # results (the .tflite file) and most updates travel as frames


def test_anonymous_clients_are_refused(mosquitto: BrokerHandle) -> None:
    anonymous = MqttConnection(mosquitto.url(), "dev-1")
    with pytest.raises(TransportError, match="Not authorized"):
        anonymous.connect(timeout_s=5)


def test_a_run_with_per_device_credentials_needs_nothing_the_acl_refuses(
    mosquitto: BrokerHandle,
    hmp_fleet: FederatedDataset,
    one_torch_thread: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fedmask")
    devices = [renamed(d, f"dev-{i}") for i, d in enumerate(smallest(hmp_fleet, 3), start=1)]
    task = fedmask_task(
        FLEET,
        hmp_fleet.num_classes,
        task_id="auth",
        rounds=2,
        quorum=len(devices),
        deadline_s=120.0,
        max_payload=MAX_PAYLOAD,
    )
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    # Credentials as operators hand them out: one `user:password` file per account.
    aggregator_url = parse_broker_url(
        mosquitto.url(), credentials_file=mosquitto.credentials_file(AGGREGATOR)
    )
    aggregator = AggregatorService(aggregator_url, FLEET, task, store)
    agents = [
        DeviceAgent(
            parse_broker_url(mosquitto.url(), credentials_file=mosquitto.credentials_file(d.device_id)),
            FLEET,
            d.device_id,
            d,
            state_dir=tmp_path / "agents",
            protocol="3.1.1" if i == 0 else "5",  # 3.1.1 brokers drop refused publishes silently
            latency_runs=5,
        )
        for i, d in enumerate(devices)
    ]
    try:
        for agent in agents:
            agent.start()
        aggregator.start()
        assert aggregator.wait(120), "the run did not complete under auth + ACL"
        poll(lambda: all(a.finished.is_set() for a in agents), 30, "finished agents")
    finally:
        aggregator.stop()
        for agent in agents:
            agent.stop()

    everyone = sorted(d.device_id for d in devices)
    rounds = store.list_rounds(task_id=task.task_id)
    assert [(r.state, r.participants, r.rejections) for r in rounds] == [("closed", 3, 0)] * 2
    models = store.list_models(task_id=task.task_id)
    assert sorted(m.device_id for m in models) == everyone
    assert all(m.size_bytes > MAX_PAYLOAD for m in models)  # so every result travelled as frames
    assert sorted(d.device_id for d in store.list_devices(FLEET)) == everyone
    assert all(a.rounds_seen[-1] == 3 for a in agents)  # the final aggregate reached every device
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == []
    store.close()
