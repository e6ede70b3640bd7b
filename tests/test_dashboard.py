"""`fedmask dashboard` in a real headless Chromium, over a store filled by a real run (tiny federation
over Mosquitto) plus a task whose first round is open: the page lists the fleet's devices, the rounds,
the models, the open round and who has reported, its plots load, and it follows the store live.

Chromium and its WebDriver are the Debian packages (scripts/setup.sh installs them); the dashboard runs
as the real command in its own process."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from report_harness import FLEET, png_size, record_rejections, run_into_store

from fedmask.storage import Store

pytestmark = pytest.mark.broker

OPEN_TASK = "sim-live"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_round_update(store: Store, device_id: str) -> None:
    """An update as the aggregator records it on arrival."""
    store.record_update(
        OPEN_TASK,
        1,
        device_id,
        base_round=0,
        staleness=0,
        weight=1.0,
        num_samples=40,
        payload=f"update of {device_id}".encode(),
        metrics={"test_accuracy": 0.5, "num_test": 20, "loss": 1.0, "density": 0.5},
    )


@pytest.fixture(scope="module")
def live_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A finished real run, and a second task whose round 1 is open with dev0 and dev1 reported."""
    tmp = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{tmp / 'fleet.db'}"
    finished = run_into_store(url, "fedmask", tmp / "sim")
    record_rejections(url, finished)
    with Store(url) as store:
        store.register_task(
            FLEET,
            OPEN_TASK,
            spec={"strategy": "fedmask"},
            seed=1,
            weights_digest="0" * 64,
            strategy="fedmask",
            arch="har_cnn",
        )
        deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        store.open_round(OPEN_TASK, 1, quorum=4, deadline=deadline)
        for device in ("dev0", "dev1"):
            _open_round_update(store, device)
    return url, finished


@pytest.fixture(scope="module")
def dashboard(live_store: tuple[str, str]) -> Iterator[str]:
    """`fedmask dashboard` serving the store; yields its base URL."""
    url, _ = live_store
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fedmask", "dashboard", "--db", url, "--port", str(port), "--refresh", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/health", timeout=5) as response:
                    assert json.load(response) == {"ok": True}
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the dashboard did not start within 60 s"
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert f"dashboard on {base}/ (read-only" in output  # loopback by default


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_api_answers_what_the_store_holds(dashboard: str, live_store: tuple[str, str]) -> None:
    _, finished = live_store
    status, body = _get(f"{dashboard}/api/tasks")
    tasks = json.loads(body)
    assert status == 200 and [t["task_id"] for t in tasks] == [OPEN_TASK, finished]
    assert (tasks[0]["open_round"], tasks[1]["open_round"], tasks[1]["rounds"]) == (1, None, 3)
    live = json.loads(_get(f"{dashboard}/api/tasks/{OPEN_TASK}")[1])
    assert live["open_round"]["reported"] == ["dev0", "dev1"]
    assert live["open_round"]["waiting"] == ["dev2", "dev3"]
    done = json.loads(_get(f"{dashboard}/api/tasks/{finished}")[1])
    assert [r["participants"] for r in done["rounds"]] == [4, 4, 4]
    assert done["rejections_by_reason"] == {"stale_round": 2, "malformed_msgpack": 1}
    devices = json.loads(_get(f"{dashboard}/api/fleets/{FLEET}/devices")[1])
    assert [(d["device_id"], d["presence"]) for d in devices] == [(f"dev{i}", "online") for i in range(4)]
    status, png = _get(f"{dashboard}/api/tasks/{finished}/plots/accuracy.png")
    assert status == 200 and png_size(png)[0] > 0
    status, body = _get(f"{dashboard}/api/tasks/nope")
    assert status == 404 and "unknown task 'nope'" in json.loads(body)["error"]
    assert _get(f"{dashboard}/api/tasks/{finished}/plots/nope.png")[0] == 404


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, script: str, what: str, timeout: float = 60) -> object:
    """Poll ``script`` in the page until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:.0f} s; page error: {driver.execute_script(ERROR)}")


ERROR = "return document.getElementById('error').textContent"
ROWS = "return [...document.querySelectorAll('#{} tbody tr')].map(r => [...r.cells].map(c => c.textContent))"
PLOTS_LOADED = """
const images = [...document.querySelectorAll('#plots img')];
return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0) ?
    images.map(i => [i.dataset.plot, i.naturalWidth]) : null;
"""


def test_page_shows_the_fleet_rounds_models_and_plots(
    dashboard: str, live_store: tuple[str, str], browser, tmp_path: Path
) -> None:
    from selenium.webdriver.support.ui import Select

    _, finished = live_store
    browser.get(dashboard + "/")
    _wait(browser, "return document.querySelectorAll('#task option').length == 2", "both tasks listed")
    Select(browser.find_element("id", "task")).select_by_value(finished)
    _wait(browser, f"return document.body.dataset.task == '{finished}'", "the task shown")
    rounds = browser.execute_script(ROWS.format("rounds"))
    assert [(r[0], r[1], r[2], r[8]) for r in rounds] == [
        ("1", "closed", "4/4", "0"),
        ("2", "closed", "4/4", "2"),
        ("3", "closed", "4/4", "1"),
    ]
    devices = browser.execute_script(ROWS.format("devices"))
    assert [(d[0], d[1]) for d in devices] == [(f"dev{i}", "online") for i in range(4)]
    models = browser.execute_script(ROWS.format("models"))
    assert sorted(m[0] for m in models) == [f"dev{i}" for i in range(4)]
    assert all(0 <= float(m[1]) <= 1 and m[4].endswith("KiB") for m in models)
    plots = _wait(browser, PLOTS_LOADED, "every plot loaded")
    assert [name for name, _ in plots] == [
        "accuracy",
        "participation",
        "traffic",
        "rejections",
        "device_accuracy",
        "device_models",
    ]
    assert all(width >= 400 for _, width in plots)
    assert "no open round (all 3 closed)" in browser.find_element("id", "open-round").text
    assert browser.execute_script(ERROR) == ""
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert png_size(shot.read_bytes()) == tuple(
        browser.execute_script(
            "return [window.innerWidth * devicePixelRatio, window.innerHeight * devicePixelRatio]"
        )
    )
    if os.environ.get("FEDMASK_DASHBOARD_SCREENSHOT"):  # refreshes docs/images/dashboard.png
        shutil.copy(shot, os.environ["FEDMASK_DASHBOARD_SCREENSHOT"])


def test_open_round_follows_the_store_live(dashboard: str, live_store: tuple[str, str], browser) -> None:
    from selenium.webdriver.support.ui import Select

    url, _ = live_store
    browser.get(dashboard + "/")
    _wait(browser, "return document.querySelectorAll('#task option').length == 2", "both tasks listed")
    Select(browser.find_element("id", "task")).select_by_value(OPEN_TASK)
    _wait(browser, f"return document.body.dataset.task == '{OPEN_TASK}'", "the task shown")
    text = "return document.getElementById('open-round').textContent"
    status = browser.execute_script(text)
    assert "reported (dev0, dev1); waiting for dev2, dev3" in status
    with Store(url) as store:  # the aggregator accepts one more update while the page is open
        _open_round_update(store, "dev3")
    _wait(
        browser, text + ".includes('3 of quorum 4 reported (dev0, dev1, dev3); waiting for dev2')", "refresh"
    )
    rounds = browser.execute_script(ROWS.format("rounds"))
    assert [(r[0], r[1], r[2]) for r in rounds] == [("1", "open", "3/4")]
