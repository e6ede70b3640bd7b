"""docs/deployment.md, run as written: every ``sh`` block in order, in one bash, on this machine.

The page is a one-machine trial of a fleet: CA and accounts, production.conf (TLS, per-listener
accounts, ACL) on loopback ports, a PostgreSQL database, the aggregator and three agents as separate
processes, a short task to completion, the store's queries, and ``fedmask predict`` on a device's own
model. The test only sets the variables the page itself reads (``FEDMASK_HOME``, ``DATA_ROOT``, the
three ports, ``FEDMASK_DB``), then checks what the run left behind. Blocks fenced ``sh skip`` need a host
the test does not have (systemd, root, docker, a database server) and are not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmask.broker_config.binaries import find_mosquitto
from fedmask.broker_config.embedded import free_loopback_port
from fedmask.storage import Store

pytestmark = pytest.mark.broker

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
# What a skipped block may do: things this machine (or a test) cannot.
SKIPPED_FOR = ("createdb", "sudo", "docker")


def shell_blocks(text: str) -> tuple[list[str], list[str]]:
    """The ``sh`` blocks to run and the ``sh skip`` blocks, in page order."""
    run, skipped = [], []
    for match in FENCE.finditer(text):
        info = match.group("info").split()
        if info[:1] == ["sh"]:
            (skipped if info[1:] == ["skip"] else run).append(match.group("body"))
    return run, skipped


def test_the_page_has_runnable_blocks_and_skips_only_what_needs_another_host() -> None:
    run, skipped = shell_blocks(DOC.read_text())
    assert len(run) >= 10
    for block in skipped:
        assert any(word in block for word in SKIPPED_FOR), block
    # Flags the page uses exist (a --credentials that is really --credentials-file was a bug once).
    assert "--credentials " not in DOC.read_text()


def test_every_command_of_the_page_runs_as_written(tmp_path: Path, hmp_root: Path, postgres_url: str) -> None:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: scripts/setup.sh installs it")
    run, _ = shell_blocks(DOC.read_text())
    script = tmp_path / "deployment.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(run))
    home = tmp_path / "trial"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FEDMASK_")},
        "FEDMASK_HOME": str(home),
        "DATA_ROOT": str(hmp_root.parents[1]),
        "DEVICE_PORT": str(free_loopback_port()),
        "AGGREGATOR_PORT": str(free_loopback_port()),
        "HEALTH_PORT": str(free_loopback_port()),
        "FEDMASK_DB": postgres_url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    # Its own process group: whatever the page starts in the background (broker, aggregator, agents)
    # goes with it, even when a step fails half-way.
    shell = subprocess.Popen(
        ["bash", str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = shell.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    done = subprocess.CompletedProcess(shell.args, shell.returncode, stdout, stderr)
    logs = "\n".join(
        f"--- {p.relative_to(home)}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted(home.rglob("*.log"))
    )
    assert done.returncode == 0, f"{done.stderr[-4000:]}\n{logs}"
    out = done.stdout

    # The run: a task done in both rounds, a model of every device, nothing refused.
    with Store(postgres_url) as store:
        (task,) = store.task_status()
        assert (task.task_id, task.state, task.rounds_closed, task.rounds_total) == (
            "kitchens-trial",
            "done",
            2,
            2,
        )
        assert (task.participants, task.models, task.missing) == (3, 3, [])
        assert all(r.participants == 3 and r.rejections == 0 for r in store.list_rounds(task_id=task.task_id))
        models = store.list_models(task_id=task.task_id)
        assert sorted(m.device_id for m in models) == ["f2", "f3", "f4"]
        assert all(m.num_test and m.density is not None and 0 < m.density < 1 for m in models)
        exported = store.export_model("f2", "tflite", task_id=task.task_id)
    assert (home / "f2.tflite").read_bytes() == exported
    kept = home / "devices" / "f2" / "state" / "f2.models" / "kitchens-trial.tflite"
    assert kept.read_bytes() == exported  # the device's own copy is the model the registry holds

    # The printed queries and the prediction: names, not numbers.
    assert re.search(r"kitchens-trial\s+fedmask\s+done\s+2/2", out), out
    assert "f2.tflite" in out
    prediction = out[out.index("confidence") - 200 :]
    assert re.search(r"walk|climb_stairs|getup_bed|drink_glass|pour_water", prediction), prediction
    assert "samples, accuracy" in prediction

    # Quiet and clean: no traceback anywhere, no XNNPACK banner, no deprecated broker option.
    assert "Traceback" not in done.stderr + logs
    assert "XNNPACK" not in done.stderr
    broker_log = (home / "broker" / "mosquitto.log").read_text()
    assert "deprecated" not in broker_log.lower(), broker_log
    assert broker_log.count("Opening ipv4 listen socket on port") == 3
