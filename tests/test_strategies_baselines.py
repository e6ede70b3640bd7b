"""Every baseline: learns on a tiny task, keeps all device state in arrays, runs in the real simulator."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_harness import run_federation, tiny_devices, tiny_federation, tiny_spec, torch_threads, wire

from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.inproc import InProcessRun
from fedmask.strategies import ClientUpdate, get_strategy, registry

# Hyperparameters for the tiny task (4 devices x 80 windows, 4 rounds); the benchmark tunes its own.
TINY_HYPER = {
    "topk": {"target_bits_per_param": 2.0},
    "bnn": {"lr": 0.01},
    "perfedavg": {},
    "perfedavg_hf": {},
    "lgfedavg": {},
    "fedpm": {"local_epochs": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def devices():
    return tiny_devices(train_per_device=80)


def test_registry_lists_every_baseline():
    assert set(TINY_HYPER) <= set(registry())


@pytest.mark.parametrize("name", sorted(TINY_HYPER))
def test_improves_over_its_starting_accuracy(devices, name):
    run = run_federation(tiny_spec(name, **TINY_HYPER[name]), devices, rounds=4)
    assert run.final_accuracy >= run.start_accuracy + 0.15, (run.start_accuracy, run.final_accuracy)


@pytest.mark.parametrize("name", sorted(TINY_HYPER))
def test_device_state_survives_a_restart_through_an_npz_file(devices, name, tmp_path):
    """A device that saves state_dict(), restarts and loads it sends exactly the update it would have."""
    spec = tiny_spec(name, **TINY_HYPER[name])
    strategy = get_strategy(name)
    clients = [strategy.client(spec, d) for d in devices]
    updates = [
        ClientUpdate(d.device_id, wire(c.fit(None, 1).body), len(d.y_train)) for d, c in zip(devices, clients)
    ]
    global_body = wire(strategy.server(spec).aggregate(updates, 1))

    path = tmp_path / "state.npz"
    np.savez(path, **clients[0].state_dict())
    with np.load(path, allow_pickle=False) as saved:
        state = {key: saved[key] for key in saved.files}
    restarted = strategy.client(spec, devices[0])
    restarted.load_state_dict(state)

    expected, got = clients[0].fit(global_body, 2), restarted.fit(global_body, 2)
    assert set(expected.body) == set(got.body)
    for key in expected.body:
        assert expected.body[key].coding == got.body[key].coding
        np.testing.assert_array_equal(expected.body[key].array, got.body[key].array, err_msg=key)


def test_every_baseline_runs_in_the_in_process_simulator(devices):
    data = tiny_federation(train_per_device=80)
    config = SimulationConfig(dataset="tiny", rounds=2, devices_per_round=3, eval_every=1)
    results = {}
    for name, hyper in TINY_HYPER.items():
        spec = tiny_spec(name, **hyper)
        results[name] = InProcessRun(config, data, spec).run()
    for name, result in results.items():
        assert len(result.devices) == len(devices), name
        assert [len(r.participants) for r in result.rounds] == [3, 3], name
        assert all(r.accuracy_mean is not None for r in result.rounds), name
        assert result.uplink_bytes_total > 0 and result.downlink_bytes_total > 0, name
    # Bits per parameter as the wire counted them (envelope included): the codings at work.
    # BNN's sign bits travel as a "bits" array: from round 2 coded against the previous signs (mctx).
    assert 0.4 < results["bnn"].uplink_bits_per_param() <= 1.15
    assert results["fedpm"].uplink_bits_per_param() < 1.15
    assert results["topk"].uplink_bits_per_param() == pytest.approx(2.0, abs=0.2)
    assert results["perfedavg"].uplink_bits_per_param() == pytest.approx(32.0, abs=0.5)
    assert results["lgfedavg"].uplink_bytes_total < results["perfedavg"].uplink_bytes_total
