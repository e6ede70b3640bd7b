"""Fault-injection campaign: seeded random kill points over real processes, and the invariants after.

Each trial runs a private Mosquitto (its own OS process, persistence on, autosave every 30 s), the
aggregator (`fedmask aggregator run`, SQLite store) and N device agents (`fedmask agent run`), each its
own OS process, through a short FedMask task (har_cnn on the smallest HMP devices, payload cap 2 KiB so
updates and results travel as frames). A seeded RNG picks the trial's kills:

- an agent or the aggregator SIGKILLs itself at a named point (``FEDMASK_KILL_AT``, see
  ``fedmask.protocol.faults``): before / after publishing an update or a result, between two frames
  of a result (mid-chunk), right after the finalize directive arrived; the aggregator between its commit and
  its ack, between the ack and the receipt, or before announcing the next round;
- the broker is SIGKILLed at a random time (0-8 s after the aggregator started serving, if the run is
  still going) before its first autosave (30 s): it comes back with nothing: no sessions, no queued
  messages, no retained task or round.

A killed process is started again (same arguments, same state directory / store). The trial ends when
every process has exited, or at its deadline (then whatever still runs is a hang). Invariants, checked
against the store and the agents' logs:

- every receipt an agent got has exactly one stored row (lost = receipts without one);
- no (task, device, base round) is stored twice (double);
- every participant (a device with an accepted update) ends with a personalized model;
- every round closes;
- no process waits without a deadline: every process exits before the trial's deadline (hang), the
  aggregator with 0 and the agents with 0 or a one-line error.

    .venv/bin/python benchmarks/faults.py                     # 26 seeds x 2 kills, runs/bench_faults.json
    .venv/bin/python benchmarks/faults.py --seeds 0-3 --kills 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fedmask.broker_config.embedded import EmbeddedBroker
from fedmask.protocol.faults import AGENT_POINTS, AGGREGATOR_POINTS, ENV

ROOT = Path(__file__).resolve().parents[1]
FLEET = "faults"
TASK_ID = "fault-campaign"
PYTHON = sys.executable


@dataclasses.dataclass(frozen=True)
class Kill:
    target: str  # "agent-<i>", "aggregator" or "broker"
    point: str | None = None  # the kill point of an agent or the aggregator
    hit: int = 1  # which time the point is reached
    at_s: float | None = None  # the broker: seconds after the trial started

    def label(self) -> str:
        if self.target == "broker":
            return f"broker@serving+{self.at_s:.1f}s"
        return f"{self.target}:{self.point}" + (f"#{self.hit}" if self.hit > 1 else "")


@dataclasses.dataclass
class TrialResult:
    seed: int
    kills: list[str]
    fired: list[str]
    wall_s: float
    receipts: int = 0
    lost: int = 0  # receipts without a stored row
    double: int = 0  # (device, base round) stored more than once
    missing_models: list[str] = dataclasses.field(default_factory=list)
    open_rounds: list[int] = dataclasses.field(default_factory=list)
    hangs: list[str] = dataclasses.field(default_factory=list)
    exit_codes: dict[str, int | None] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)  # one-line errors processes ended with

    @property
    def ok(self) -> bool:
        failed_exit = self.exit_codes.get("aggregator") != 0
        return not (
            self.lost or self.double or self.missing_models or self.open_rounds or self.hangs
        ) and not (failed_exit)


# A FedMask update of this task compresses to ~300 bytes, one frame: its mid-chunk point never comes,
# so mid-chunk kills are planned on results (tens of KiB, dozens of frames) only.
CAMPAIGN_AGENT_POINTS = tuple(p for p in AGENT_POINTS if p != "agent.update.mid_chunk")


def plan_kills(seed: int, agents: int, kills: int) -> list[Kill]:
    """The trial's kill points, from its seed alone."""
    rng = random.Random(seed)
    targets = [f"agent-{i}" for i in range(agents)] + ["aggregator", "broker"]
    chosen = rng.sample(targets, kills)
    plan = []
    for target in chosen:
        if target == "broker":
            # Seconds after the aggregator started serving (its retained task is in the broker).
            plan.append(Kill("broker", at_s=round(rng.uniform(0.0, 8.0), 1)))
        elif target == "aggregator":
            point = rng.choice(AGGREGATOR_POINTS)
            hit = rng.randint(1, 3) if point != "aggregator.before_announce" else rng.randint(1, 2)
            plan.append(Kill(target, point, hit))
        else:
            plan.append(Kill(target, rng.choice(CAMPAIGN_AGENT_POINTS), 1))
    return plan


class Process:
    """One `fedmask` command; restarted (without the kill point) after a fault-injection kill."""

    def __init__(self, name: str, args: list[str], log: Path, kill: Kill | None) -> None:
        self.name, self.args, self.log_path, self.kill = name, args, log, kill
        self.starts = 0
        self.process: subprocess.Popen | None = None
        self.fired: list[str] = []

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if self.kill is not None and self.starts == 0:
            env[ENV] = f"{self.kill.point}@{self.kill.hit}"
        self.starts += 1
        with open(self.log_path, "ab") as out:
            out.write(f"----- start {self.starts} -----\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [PYTHON, "-m", "fedmask", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.log_path.parent,
            )

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def _devices(count: int):
    from fedmask.datasets.workloads import load_workload

    root = (
        Path(os.environ.get("FEDMASK_DATA_ROOT", ROOT.parent / "shared" / "datasets")) / "hmp" / "HMP_Dataset"
    )
    fleet = load_workload("hmp", root, num_devices=8, stride=128)
    chosen = sorted(fleet.devices, key=lambda d: (d.num_train, d.device_id))[:count]
    return chosen, fleet.num_classes


def run_trial(
    seed: int,
    workdir: Path,
    *,
    agents: int = 3,
    kills: int = 2,
    rounds: int = 3,
    deadline_s: float = 8.0,
    timeout_s: float = 240.0,
) -> TrialResult:
    from fedmask.datasets.federated import save_device

    workdir.mkdir(parents=True, exist_ok=True)
    plan = plan_kills(seed, agents, kills)
    devices, num_classes = _devices(agents)
    task_file = workdir / "task.yaml"
    task_file.write_text(
        yaml.safe_dump(
            {
                "task_id": TASK_ID,
                "strategy": "fedmask",
                "arch": "har_cnn",
                "num_classes": num_classes,
                "seed": seed,
                "hyper": {"local_epochs": 1, "finalize_deadline_s": 90, "max_round_extensions": 20},
                "schedule": {
                    "rounds": rounds,
                    "quorum": agents,
                    "deadline_s": deadline_s,
                    "staleness_bound": 2,
                    "max_payload": 2048,
                },
            }
        )
    )
    db = f"sqlite:///{workdir / 'store.db'}"
    broker = EmbeddedBroker(workdir=workdir / "broker", backend="mosquitto").start()
    url = broker.url
    by_target = {k.target: k for k in plan}
    processes = {
        "aggregator": Process(
            "aggregator",
            ["aggregator", "run", "--broker", url, "--fleet", FLEET, "--task", str(task_file), "--db", db],
            workdir / "aggregator.log",
            by_target.get("aggregator"),
        )
    }
    for i, device in enumerate(devices):
        data = save_device(device, workdir / f"{device.device_id}.npz")
        name = f"agent-{i}"
        processes[name] = Process(
            name,
            [
                "agent",
                "run",
                "--broker",
                url,
                "--fleet",
                FLEET,
                "--device-id",
                device.device_id,
                "--data",
                str(data),
                "--state-dir",
                str(workdir / "agents"),
                "--threads",
                "1",
            ],
            workdir / f"{name}.log",
            by_target.get(name),
        )
    started = time.monotonic()
    broker_kill = by_target.get("broker")
    serving: float | None = None  # when the aggregator first said it serves
    fired: list[str] = []
    for process in processes.values():
        process.start()
    try:
        while time.monotonic() - started < timeout_s:
            if serving is None and "aggregator serving" in processes["aggregator"].log():
                serving = time.monotonic()
            if (
                broker_kill is not None
                and serving is not None
                and time.monotonic() - serving >= (broker_kill.at_s or 0)
            ):
                if processes["aggregator"].returncode is None:  # the run is still going: kill it
                    broker.kill()  # SIGKILL, well before the 30 s autosave of a broker this young
                    time.sleep(1.0)
                    broker.start()
                    fired.append(broker_kill.label())
                broker_kill = None
            for process in processes.values():
                code = process.returncode
                if code == -signal.SIGKILL and process.kill is not None and process.starts == 1:
                    if f"fault injection: SIGKILL at {process.kill.point}" in process.log():
                        fired.append(process.kill.label())
                    time.sleep(0.5)
                    process.start()
            if all(p.returncode is not None for p in processes.values()) and broker_kill is None:
                break
            time.sleep(0.2)
        wall = time.monotonic() - started
        result = TrialResult(seed, [k.label() for k in plan], fired, wall)
        for name, process in processes.items():
            result.exit_codes[name] = process.returncode
            if process.returncode is None:
                result.hangs.append(name)
            for line in process.log().splitlines():
                if line.startswith(("fedmask agent run:", "fedmask aggregator run:")):
                    result.errors.append(f"{name}: {line}")
    finally:
        for process in processes.values():
            process.stop()
        broker.close()
    _check_store(db, processes, result, rounds)
    return result


RECEIPT = re.compile(r": (\S+): receipt for its update of base round (\d+)")


def _check_store(db: str, processes: dict[str, Process], result: TrialResult, rounds: int) -> None:
    from sqlalchemy import text

    from fedmask.storage import Store

    receipts: set[tuple[str, int]] = set()
    for process in processes.values():
        for match in RECEIPT.finditer(process.log()):
            receipts.add((match.group(1), int(match.group(2))))
    result.receipts = len(receipts)
    store = Store(db)
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT d.device_id, u.base_round, COUNT(*) FROM updates u "
                    "JOIN devices d ON d.id = u.device_pk JOIN tasks t ON t.id = u.task_pk "
                    "WHERE t.task_id = :task GROUP BY d.device_id, u.base_round"
                ),
                {"task": TASK_ID},
            ).all()
        stored = {(device, base): count for device, base, count in rows}
        result.lost = sum(1 for key in receipts if stored.get(key, 0) != 1)
        result.double = sum(1 for count in stored.values() if count > 1)
        try:
            participants = store.task_participants(TASK_ID)
            models = {m.device_id for m in store.list_models(task_id=TASK_ID)}
            result.missing_models = sorted(participants - models)
            states = {r.round_no: r.state for r in store.list_rounds(task_id=TASK_ID)}
        except Exception:  # the task was never registered: nothing ran at all
            states = {}
        result.open_rounds = [r for r in range(1, rounds + 1) if states.get(r) != "closed"]
    finally:
        store.close()


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from table import print_table

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0-25", help="e.g. 0-25 or 3,7,9 (default 0-25)")
    parser.add_argument("--kills", type=int, default=2, help="kill points per trial (default 2)")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_faults.json")
    parser.add_argument("--keep", action="store_true", help="keep each trial's directory (logs, store)")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    results: list[TrialResult] = []
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="fedmask-faults-"))
    for seed in seeds:
        result = run_trial(
            seed, base / f"seed-{seed}", agents=args.agents, kills=args.kills, rounds=args.rounds
        )
        results.append(result)
        print(
            f"seed {seed:3d}: {'ok  ' if result.ok else 'FAIL'} {result.wall_s:6.1f} s  "
            f"kills {', '.join(result.kills)}  fired {len(result.fired)}  lost {result.lost}  "
            f"double {result.double}  hangs {result.hangs or 0}  missing {result.missing_models or 0}  "
            f"open {result.open_rounds or 0}  exits {result.exit_codes}",
            flush=True,
        )
    total = time.monotonic() - started
    rows = [
        {
            "seed": r.seed,
            "kills": "; ".join(r.kills),
            "fired": len(r.fired),
            "receipts": r.receipts,
            "lost": r.lost,
            "double": r.double,
            "hangs": len(r.hangs),
            "no_model": len(r.missing_models),
            "open": len(r.open_rounds),
            "wall_s": r.wall_s,
            "ok": "ok" if r.ok else "FAIL",
        }
        for r in results
    ]
    print_table(
        f"Fault campaign: {len(results)} trials, {args.kills} kills each, {args.agents} agents",
        rows,
        [
            ("seed", "seed", "{}"),
            ("kills", "kill points", "{}"),
            ("fired", "fired", "{}"),
            ("receipts", "receipts", "{}"),
            ("lost", "lost", "{}"),
            ("double", "double", "{}"),
            ("hangs", "hangs", "{}"),
            ("no_model", "no model", "{}"),
            ("open", "open rounds", "{}"),
            ("wall_s", "s", "{:.1f}"),
            ("ok", "", "{}"),
        ],
    )
    summary = {
        "trials": len(results),
        "kill_points_planned": sum(len(r.kills) for r in results),
        "kill_points_fired": sum(len(r.fired) for r in results),
        "lost": sum(r.lost for r in results),
        "double": sum(r.double for r in results),
        "hangs": sum(len(r.hangs) for r in results),
        "missing_models": sum(len(r.missing_models) for r in results),
        "open_rounds": sum(len(r.open_rounds) for r in results),
        "failed_trials": [r.seed for r in results if not r.ok],
        "wall_s": round(total, 1),
    }
    print(json.dumps(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                "settings": vars(args),
                "seeds": seeds,
                "summary": summary,
                "trials": [{**dataclasses.asdict(r), "ok": r.ok} for r in results],
            },
            indent=2,
        )
    )
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"trial directories: {base}")
    return 0 if not summary["failed_trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
