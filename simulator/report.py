"""Writes a run's results: results.json, results.md (a table), and the report (report.md, report.html and
PNG plots) through `fedmask.report`, the code behind `fedmask report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmask.report import render
from fedmask.report.model import TaskReport, from_results
from fedmask.simulator.results import MethodResult

SUMMARY_COLUMNS = (
    ("accuracy_mean", "acc mean", "{:.3f}"),
    ("accuracy_p10", "acc p10", "{:.3f}"),
    ("uplink_bits_per_param", "up bits/param", "{:.3f}"),
    ("downlink_bits_per_param", "down bits/param", "{:.3f}"),
    ("uplink_bytes_total", "up bytes", "{:,}"),
    ("downlink_bytes_total", "down bytes", "{:,}"),
    ("wall_s", "wall s", "{:.1f}"),
)


def results_document(header: dict[str, Any], methods: dict[str, MethodResult]) -> dict[str, Any]:
    return {**header, "methods": {name: m.summary() for name, m in methods.items()}}


def markdown_table(document: dict[str, Any]) -> str:
    title = (
        f"{document['dataset']} ({document['partition']}), {document['devices']} devices, "
        f"{document['rounds']} rounds, transport {document.get('transport', 'inproc')}"
    )
    head = "| method | " + " | ".join(label for _, label, _ in SUMMARY_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(SUMMARY_COLUMNS)
    rows = [
        f"| {name} | " + " | ".join(fmt.format(m[key]) for key, _, fmt in SUMMARY_COLUMNS) + " |"
        for name, m in document["methods"].items()
    ]
    return "\n".join([f"**{title}**", "", head, rule, *rows, "", *per_round_bits(document)])


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def per_round_bits(document: dict[str, Any]) -> list[str]:
    """Per method with masks: bits/param on the wire per round, the entropy estimate beside them."""
    out = []
    for name, m in document["methods"].items():
        rounds = [r for r in m["rounds"] if r.get("uplink_entropy_bits_per_param") is not None]
        if not rounds:
            continue
        out += [
            f"{name}: bits per parameter per round (wire, and the conditional-entropy estimate H of the "
            "masks given their bases)",
            "",
            "| round | up bits/param | up H | down bits/param | down H |",
            "|---:|---:|---:|---:|---:|",
        ]
        keys = (
            "uplink_bits_per_param",
            "uplink_entropy_bits_per_param",
            "downlink_bits_per_param",
            "downlink_entropy_bits_per_param",
        )
        out += [f"| {r['round']} | " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rounds]
        out.append("")
    return out


def task_reports(document: dict[str, Any]) -> list[TaskReport]:
    """Each method of the run as a report: the shape `fedmask report` draws from a store."""
    return [from_results(name, method, document) for name, method in document["methods"].items()]


def plot(document: dict[str, Any], out_dir: Path) -> list[Path]:
    """The report's plots and pages (report.md, self-contained report.html), drawn by the same code
    as `fedmask report`: accuracy.png, uplink.png, participation.png, traffic.png, device_*.png."""
    return render.write(task_reports(document), out_dir)["images"]


def write_report(out_dir: Path, header: dict[str, Any], methods: dict[str, MethodResult]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    document = results_document(header, methods)
    (out_dir / "results.json").write_text(json.dumps(document, indent=2))
    (out_dir / "results.md").write_text(markdown_table(document))
    plot(document, out_dir)
    return document
