"""Writes a run's results: results.json, results.md (a table) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def plot(document: dict[str, Any], out_dir: Path) -> list[Path]:
    """Accuracy per round and uplink bits per round, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, name, transform in (
        ("accuracy_mean", "personalized test accuracy", "accuracy.png", lambda r, m: r["accuracy_mean"]),
        (
            "uplink_bytes",
            "uplink bits per parameter per device",
            "uplink.png",
            lambda r, m: (
                r["uplink_bytes"] * 8 / max(1, len(r["participants"])) / max(1, m["params_per_update"])
            ),
        ),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, m in document["methods"].items():
            points = [(r["round"], transform(r, m)) for r in m["rounds"] if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=method)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        if key == "uplink_bytes":
            ax.set_yscale("log")
        ax.set_title(f"{document['dataset']} ({document['partition']})")
        ax.grid(alpha=0.3)
        if ax.get_lines():  # a method without rounds (the FT-only ablation) draws nothing
            ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out_dir: Path, header: dict[str, Any], methods: dict[str, MethodResult]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    document = results_document(header, methods)
    (out_dir / "results.json").write_text(json.dumps(document, indent=2))
    (out_dir / "results.md").write_text(markdown_table(document))
    plot(document, out_dir)
    return document
