"""What the round manager says and records when a round's deadline passes with nobody answering: the
quorum it waits for (not "0 of the 1 updates it needs" when the quorum is 5), and the task's state."""

from __future__ import annotations

import logging

from fixtures.fleet import fedmask_task

from fedmask.aggregator.round_manager import RoundManager
from fedmask.storage import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_an_empty_deadline_names_the_quorum_and_the_task_stays_running(tmp_path, caplog) -> None:
    task = fedmask_task("log-fleet", 14, task_id="quorum-5", rounds=3, quorum=5, deadline_s=10.0)
    clock = Clock()
    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upgrade()
        manager = RoundManager("log-fleet", task, store, clock=clock)
        manager.start()
        clock.now += 11
        with caplog.at_level(logging.WARNING, logger="fedmask.aggregator.round_manager"):
            assert manager.tick()  # the announcement again, with the new deadline
        (record,) = caplog.records
        assert record.getMessage().startswith(
            "round 1: no update by its deadline (quorum 5); deadline extended"
        )
        assert "of the 1 updates" not in record.getMessage()
        (status,) = store.task_status()
        assert (status.state, status.rounds_closed, status.rounds_total, status.open_round) == (
            "running",
            0,
            3,
            1,
        )
