"""A report as Markdown (plots beside it as PNG files) and as one self-contained HTML page (plots
embedded as base64 PNG). Both are written from the same tables, so they always say the same thing."""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmask.report.model import TaskReport
from fedmask.report.plots import PLOTS, render_all

Table = tuple[tuple[str, ...], list[tuple[str, ...]]]


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _size(value: int | None) -> str:
    from fedmask.storage.render import size

    return size(value)


def summary_table(reports: Sequence[TaskReport]) -> Table:
    headers = (
        "task",
        "strategy",
        "source",
        "rounds",
        "updates",
        "devices",
        "acc mean",
        "acc p10",
        "uplink",
        "downlink",
        "rejected",
    )
    rows = []
    for r in reports:
        s = r.summary()
        rows.append(
            (
                r.name,
                r.strategy,
                r.source,
                str(s["rounds"]),
                str(s["updates"]),
                str(s["devices"]),
                _num(s["accuracy_mean"]),
                _num(s["accuracy_p10"]),
                _size(s["uplink_bytes"]),
                _size(s["downlink_bytes"]),
                str(s["rejections"]),
            )
        )
    return headers, rows


def rounds_table(report: TaskReport) -> Table:
    headers = (
        "round",
        "state",
        "accepted/quorum",
        "late",
        "missing",
        "uplink",
        "downlink",
        "accuracy",
        "loss",
        "density",
        "rejected",
        "closed by",
        "took s",
    )
    rows = [
        (
            str(r.round),
            r.state,
            f"{r.participants}/{'-' if r.quorum is None else r.quorum}",
            str(r.late),
            "-" if r.missing is None else str(r.missing),
            _size(r.uplink_bytes),
            _size(r.downlink_bytes),
            _num(r.accuracy),
            _num(r.loss),
            _num(r.density),
            str(r.rejections),
            r.closed_by or "-",
            _num(r.duration_s, "{:.1f}"),
        )
        for r in report.rounds
    ]
    return headers, rows


def rejections_table(report: TaskReport) -> Table:
    return ("reason", "messages"), [(reason, str(n)) for reason, n in report.rejections_by_reason.items()]


def devices_table(report: TaskReport) -> Table:
    headers = ("device", "accuracy", "test samples", "density", "size", "latency ms")
    rows = [
        (
            d.device_id,
            _num(d.accuracy),
            "-" if d.num_test is None else str(d.num_test),
            _num(d.density),
            _size(d.size_bytes),
            _num(d.latency_ms, "{:.3f}"),
        )
        for d in sorted(report.devices, key=lambda d: (-d.accuracy, d.device_id))
    ]
    return headers, rows


def sections(reports: Sequence[TaskReport]) -> list[tuple[str, str, Table]]:
    """(heading, note, table) in page order, after the summary and the plots."""
    out = []
    for r in reports:
        where = ", ".join(f"{k} {v}" for k, v in (("fleet", r.fleet), ("arch", r.arch)) if v)
        note = f"{r.strategy}; {where}; downlink: {r.downlink_note}"
        out.append((f"{r.name}: rounds", note, rounds_table(r)))
        if r.source == "store":
            out.append((f"{r.name}: rejections by reason", "", rejections_table(r)))
        out.append((f"{r.name}: final model per device", "best first", devices_table(r)))
    return out


def title(reports: Sequence[TaskReport]) -> str:
    names = ", ".join(r.name for r in reports)
    return f"FedMask report: {names}" if len(reports) > 1 else f"FedMask report: task {names}"


# -- Markdown ---------------------------------------------------------------------------------------------


def _escape_md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(table: Table) -> str:
    headers, rows = table
    if not rows:
        return "(none)"
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_escape_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(reports: Sequence[TaskReport], images: dict[str, str], generated: str) -> str:
    """The report in Markdown; ``images`` maps plot names to the file names written beside it."""
    parts = [f"# {title(reports)}", "", f"Generated {generated}.", "", markdown_table(summary_table(reports))]
    for name, (plot_title, *_) in PLOTS.items():
        if name in images:
            parts += ["", f"![{plot_title}]({images[name]})"]
    for heading, note, table in sections(reports):
        parts += ["", f"## {heading}", ""]
        if note:
            parts += [note, ""]
        parts.append(markdown_table(table))
    return "\n".join(parts) + "\n"


# -- HTML -------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots figure { margin: 0; flex: 0 1 560px; } .plots img { width: 100%; }
.note { color: #666; font-size: 0.85em; }
"""


def html_table(table: Table, table_id: str = "") -> str:
    headers, rows = table
    if not rows:
        return '<p class="note">(none)</p>'
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_page(reports: Sequence[TaskReport], pngs: dict[str, bytes], generated: str) -> str:
    """One page, no external resources: the plots are data: URIs."""
    figures = "".join(
        f'<figure><img alt="{html.escape(t)}" data-plot="{name}" src="{data_uri(pngs[name])}"></figure>'
        for name, (t, *_) in PLOTS.items()
        if name in pngs
    )
    body = [
        f"<h1>{html.escape(title(reports))}</h1>",
        f'<p class="note">Generated {html.escape(generated)}.</p>',
        html_table(summary_table(reports), "summary"),
        f'<div class="plots">{figures}</div>',
    ]
    for heading, note, table in sections(reports):
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if note:
            body.append(f'<p class="note">{html.escape(note)}</p>')
        body.append(html_table(table))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title(reports))}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write(reports: Sequence[TaskReport], out_dir: Path) -> dict[str, Any]:
    """Write report.md, report.html and one PNG per plot to ``out_dir``; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    pngs = render_all(reports)
    images = {}
    for name, png in pngs.items():
        (out_dir / f"{name}.png").write_bytes(png)
        images[name] = f"{name}.png"
    markdown_path = out_dir / "report.md"
    html_path = out_dir / "report.html"
    markdown_path.write_text(markdown(reports, images, generated))
    html_path.write_text(html_page(reports, pngs, generated))
    return {"markdown": markdown_path, "html": html_path, "images": [out_dir / i for i in images.values()]}
