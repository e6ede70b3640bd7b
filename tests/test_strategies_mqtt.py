"""Every baseline over the real MQTT deployment: broker, aggregator, agents, store, TFLite, no special cases.

The same task run in process and over MQTT must end with the same per-device accuracy: the halves see
the same bodies on both transports, and the agents' TFLite models compute what the torch models do.
"""

from __future__ import annotations

import pytest
from strategy_harness import tiny_federation, tiny_spec, torch_threads

from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.inproc import InProcessRun
from fedmask.simulator.mqtt import MqttRun

pytestmark = pytest.mark.broker

BASELINES = ("topk", "bnn", "perfedavg", "perfedavg_hf", "lgfedavg", "fedpm")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("name", BASELINES)
def test_same_accuracy_in_process_and_over_mqtt(name, tmp_path):
    data = tiny_federation(train_per_device=40)
    spec = tiny_spec(name, target_bits_per_param=2.0) if name == "topk" else tiny_spec(name)
    results = {}
    for transport, run in (("inproc", InProcessRun), ("mqtt", MqttRun)):
        config = SimulationConfig(
            dataset="tiny", rounds=2, output_dir=tmp_path / transport, transport=transport
        )
        results[transport] = run(config, data, spec).run()
    mqtt, inproc = results["mqtt"], results["inproc"]
    assert [len(r.participants) for r in mqtt.rounds] == [len(data.devices)] * 2
    by_device = {d.device_id: d.accuracy for d in inproc.devices}
    assert {d.device_id: d.accuracy for d in mqtt.devices} == by_device
    # Uplink counted from the bytes the agents published: the same coding on both transports.
    assert mqtt.uplink_bits_per_param() == pytest.approx(inproc.uplink_bits_per_param(), rel=0.05)
