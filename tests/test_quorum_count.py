"""The quorum share counts the expected devices (participants and devices online) as they change, not
by recounting the fleet at every commit: the kept count must equal the recount after any sequence of
presences and accepted updates. Real SQLite store."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import numpy as np
from fixtures.fleet import fedmask_task, mask_update

from fedmask.aggregator.round_manager import RoundManager
from fedmask.protocol import messages
from fedmask.protocol.topics import Topics
from fedmask.storage import Store

FLEET = "quorum-count"
TASK_ID = "quorum-count-task"
TOPICS = Topics(FLEET)


def recounted(manager: RoundManager) -> int:
    share = math.ceil(manager.schedule.quorum_fraction * len(manager.expected_devices()) - 1e-9)
    return max(manager.schedule.quorum, share)


def test_the_kept_count_matches_a_recount(tmp_path) -> None:
    rng = random.Random(7)
    devices = [f"dev-{i}" for i in range(12)]
    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upgrade()
        for device in devices[:4]:  # online before the aggregator starts: loaded from the store
            store.upsert_device(FLEET, device, presence="online")
        task = fedmask_task(FLEET, 14, task_id=TASK_ID, rounds=2, quorum=1, deadline_s=600.0)
        task = dataclasses.replace(task, schedule=dataclasses.replace(task.schedule, quorum_fraction=0.9))
        manager = RoundManager(FLEET, task, store)
        manager.start()
        assert manager.needed() == recounted(manager) == 4  # ceil(0.9 * 4)
        (name, shape), *_ = manager.expected.items()
        sent: set[str] = set()
        for step in range(60):
            device = rng.choice(devices)
            if rng.random() < 0.6 or device in sent:
                status = rng.choice(["online", "offline"])
                presence = messages.Presence(fleet=FLEET, device=device, status=status, at=time.time() + step)
                manager.on_presence(device, presence)
            else:
                manager.known_devices.add(device)
                mask = np.random.default_rng(step).random(shape) < 0.5
                payload = mask_update(FLEET, TASK_ID, device, mask, entry=name)
                update = messages.decode(payload, messages.Update, fleet=FLEET)
                assert manager.on_update(device, update, payload, TOPICS.up(device))[0].accepted
                sent.add(device)
            manager.commit()
            assert manager.needed() == recounted(manager), f"step {step}"
        assert manager.participants == sent and len(sent) >= 3
