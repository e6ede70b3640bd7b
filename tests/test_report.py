"""`fedmask report` on stores filled by real runs (tiny federation over a real Mosquitto, aggregator,
agents, TFLite): the Markdown tables say what the store holds, the HTML page carries its plots inside it,
two tasks compare side by side, and the same report reads PostgreSQL. The simulator's own report is
drawn by the same code."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from report_harness import REJECTIONS, png_size, record_rejections, run_into_store
from sqlalchemy import text

from fedmask.cli import main
from fedmask.report.plots import PLOTS
from fedmask.storage import Store
from fedmask.storage.render import size

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def sqlite_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """A SQLite store holding two real runs (FedMask and FedAvg) and the rejections of the first."""
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp / 'runs.db'}"
    tasks = [run_into_store(url, strategy, tmp / "sim") for strategy in ("fedmask", "fedavg")]
    record_rejections(url, tasks[0])
    return url, tasks


def _report(url: str, out: Path, *tasks: str) -> tuple[str, str]:
    argv = ["report", "--db", url, "--out", str(out)]
    for task in tasks:
        argv += ["--task", task]
    assert main(argv) == 0
    return (out / "report.md").read_text(), (out / "report.html").read_text()


def _md_table(markdown: str, heading: str) -> list[list[str]]:
    """The rows of the first table after ``## heading``, as cells."""
    section = markdown.split(f"## {heading}\n", 1)[1]
    lines = [line for line in section.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_markdown_tables_are_what_the_store_holds(sqlite_runs, tmp_path: Path) -> None:
    url, (task, _) = sqlite_runs
    markdown, _ = _report(url, tmp_path, task)
    with Store(url) as store:
        rounds = store.list_rounds(task_id=task)
        models = store.list_models(task_id=task)
        details = {r.round_no: store.round_detail(task, r.round_no) for r in rounds}
    rows = _md_table(markdown, f"{task}: rounds")
    assert [int(r[0]) for r in rows] == [r.round_no for r in rounds] == [1, 2, 3]
    for row, summary in zip(rows, rounds):
        detail = details[summary.round_no]
        assert row[1] == "closed"
        assert row[2] == f"{summary.participants}/{summary.quorum}" == "4/4"
        assert row[5] == size(summary.payload_bytes)
        # Accuracy per round: the participants' reported test accuracy, sample-weighted.
        reported = [u.metrics for u in detail.updates]
        weighted = sum(m["test_accuracy"] * m["num_test"] for m in reported) / sum(
            m["num_test"] for m in reported
        )
        assert row[7] == f"{weighted:.3f}"
        assert row[10] == str(sum(1 for r, _, _ in REJECTIONS if r == summary.round_no))
    devices = _md_table(markdown, f"{task}: final model per device")
    assert sorted(r[0] for r in devices) == sorted(m.device_id for m in models)
    by_device = {m.device_id: m for m in models}
    for row in devices:
        model = by_device[row[0]]
        assert row[1] == f"{model.accuracy:.3f}"
        assert row[4] == size(model.size_bytes)
        assert row[5] == f"{model.latency_ms:.3f}"
        assert 0 < float(row[3]) < 1  # FedMask's mask density, from the model's metrics
    reasons = dict(_md_table(markdown, f"{task}: rejections by reason"))
    assert reasons == {"stale_round": "2", "malformed_msgpack": "1"}


def test_html_page_embeds_every_plot(sqlite_runs, tmp_path: Path) -> None:
    url, (task, _) = sqlite_runs
    _, page = _report(url, tmp_path, task)
    assert not re.search(r"""(src|href)=["']?(https?:|//|[a-z_]+\.png)""", page), "an external resource"
    images = dict(re.findall(r'data-plot="([a-z_]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page))
    expected = [n for n in PLOTS if n != "uplink"]  # the store does not know parameters per update
    assert sorted(images) == sorted(expected)
    for name, encoded in images.items():
        png = base64.b64decode(encoded)
        width, height = png_size(png)
        assert width >= 400 and height >= 200, name
        assert png == (tmp_path / f"{name}.png").read_bytes(), name  # the Markdown's PNG files too
    assert "<td>stale_round</td><td>2</td>" in page


def test_two_tasks_side_by_side(sqlite_runs, tmp_path: Path) -> None:
    url, tasks = sqlite_runs
    markdown, page = _report(url, tmp_path, *tasks)
    summary = markdown.split("\n\n")[2].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in summary] == tasks
    strategies = [row.split("|")[2].strip() for row in summary]
    assert strategies == ["fedmask", "fedavg"]
    for task in tasks:
        assert f"## {task}: rounds" in markdown and f"<h2>{task}: rounds</h2>" in page
    # FedAvg sends weights, FedMask bits: the uplink column tells them apart by far.
    with Store(url) as store:
        uplink = {t: sum(r.payload_bytes for r in store.list_rounds(task_id=t)) for t in tasks}
    assert uplink[tasks[1]] > 20 * uplink[tasks[0]]
    assert [row.split("|")[9].strip() for row in summary] == [size(uplink[t]) for t in tasks]


def test_without_task_every_stored_task_is_reported(sqlite_runs, tmp_path: Path) -> None:
    url, tasks = sqlite_runs
    markdown, _ = _report(url, tmp_path)
    assert all(f"## {t}: rounds" in markdown for t in tasks)


@pytest.mark.postgres
def test_report_reads_postgresql(postgres_url: str, tmp_path: Path) -> None:
    task = run_into_store(postgres_url, "fedmask", tmp_path / "sim", rounds=2)
    record_rejections(postgres_url, task)
    markdown, page = _report(postgres_url, tmp_path / "report", task)
    rows = _md_table(markdown, f"{task}: rounds")
    assert [(r[0], r[2], r[10]) for r in rows] == [("1", "4/4", "0"), ("2", "4/4", "2")]
    assert len(_md_table(markdown, f"{task}: final model per device")) == 4
    assert page.count('src="data:image/png;base64,') == len(PLOTS) - 1
    from fedmask.storage.reporting import read_only_engine

    engine = read_only_engine(postgres_url)
    try:
        with engine.connect() as connection, pytest.raises(Exception, match="read-only transaction"):
            connection.execute(text("DELETE FROM rejections"))
    finally:
        engine.dispose()


def test_report_errors_are_one_line(sqlite_runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url, _ = sqlite_runs
    assert main(["report", "--db", f"sqlite:///{tmp_path / 'none.db'}"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    assert main(["report", "--db", url, "--task", "nope", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'nope'; the store knows 'sim-fedavg-3', 'sim-fedmask-3'" in err
    assert err.count("\n") == 1


def test_simulate_db_needs_the_mqtt_transport(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["simulate", "--transport", "inproc", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--rounds", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "only the MQTT transport" in capsys.readouterr().err


def test_read_only_engine_refuses_writes(sqlite_runs) -> None:
    from fedmask.storage.reporting import read_only_engine

    url, (task, _) = sqlite_runs
    engine = read_only_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM tasks")).scalar() == 2
            with pytest.raises(Exception, match="readonly"):
                connection.execute(text("DELETE FROM rejections"))
    finally:
        engine.dispose()
    with Store(url) as store:
        assert sum(len(store.round_detail(task, n).rejections) for n in (1, 2, 3)) == len(REJECTIONS)


def test_simulator_report_is_drawn_by_the_same_code(tmp_path: Path) -> None:
    """The in-process simulator keeps no store: its results document becomes the same report."""
    from strategy_harness import tiny_federation, tiny_spec, torch_threads

    from fedmask.simulator.config import SimulationConfig
    from fedmask.simulator.inproc import InProcessRun
    from fedmask.simulator.report import write_report

    config = SimulationConfig(dataset="tiny", rounds=2, output_dir=tmp_path, tflite_devices=0)
    with torch_threads(1):
        method = InProcessRun(config, tiny_federation(), tiny_spec("fedmask")).run()
    header = {"dataset": "tiny", "partition": "pathological", "devices": 4, "rounds": 2, "arch": "har_cnn"}
    write_report(tmp_path, header, {"fedmask": method})
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    rows = _md_table(markdown, "fedmask: rounds")
    assert [(r[0], r[2]) for r in rows] == [("1", "4/-"), ("2", "4/-")]
    assert rows[1][5] == size(method.rounds[1].uplink_bytes)
    expected = [n for n in PLOTS if n != "rejections"]  # only a store records refused messages
    assert sorted(re.findall(r'data-plot="([a-z_]+)" src="data:image/png', page)) == sorted(expected)
    for name in ("accuracy", "uplink"):  # the file names the simulator always wrote
        assert png_size((tmp_path / f"{name}.png").read_bytes())[0] > 0


def test_a_store_keeps_one_run_per_task_id(sqlite_runs, tmp_path: Path) -> None:
    """`simulate --db` never mixes a second run into a stored task: it is refused before any training."""
    from fedmask.config import ConfigError

    url, (task, _) = sqlite_runs
    with pytest.raises(ConfigError, match=f"already holds task '{task}'; choose another --fleet or --seed"):
        run_into_store(url, "fedmask", tmp_path)
    with Store(url) as store:
        assert [r.participants for r in store.list_rounds(task_id=task)] == [4, 4, 4]


def test_a_large_fleet_is_drawn_as_ranked_lines() -> None:
    """Past MAX_DEVICE_LABELS devices the per-device plots rank values instead of drawing a bar each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmask.report import plots
    from fedmask.report.model import DeviceStats, TaskReport

    devices = [DeviceStats(f"d{i:03d}", accuracy=(i % 10) / 10, density=0.3) for i in range(120)]
    report = TaskReport(name="big", source="store", strategy="fedmask", devices=devices)
    fig = plt.figure()
    try:
        plots.device_accuracy(fig, [report])
        (ax,) = fig.axes
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == list(range(1, 121))
        assert list(line.get_ydata()) == sorted((d.accuracy for d in devices), reverse=True)
        assert not ax.patches and ax.get_xlabel() == "devices, ranked"
    finally:
        plt.close(fig)
    assert png_size(plots.render("device_models", [report]))[0] > 0
