"""Tables and plots of the comparison benchmark (compare.json in, Markdown and PNGs out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (key in a method's summary, column label, format)
COLUMNS = (
    ("accuracy_mean", "acc mean", "{:.3f}"),
    ("accuracy_p10", "acc p10", "{:.3f}"),
    ("uplink_bits_per_param", "up bits/param", "{:.3f}"),
    ("downlink_bits_per_param", "down bits/param", "{:.3f}"),
    ("uplink_bytes_total", "up MB", "{:.2f}"),
    ("downlink_bytes_total", "down MB", "{:.2f}"),
    ("train_s_per_round", "train s/round", "{:.3f}"),
    ("train_gflops_per_round", "train GFLOP/round", "{:.2f}"),
    ("lr", "lr", "{:.3g}"),
    ("wall_s", "wall s", "{:.0f}"),
)
MEGABYTE_KEYS = {"uplink_bytes_total", "downlink_bytes_total"}


def _cell(method: dict[str, Any], key: str, fmt: str) -> str:
    value = method.get(key)
    if value is None:
        return "–"
    return fmt.format(value / 1e6 if key in MEGABYTE_KEYS else value)


def workload_table(name: str, workload: dict[str, Any]) -> str:
    """One workload: every method's accuracy, traffic and local cost (per device and round)."""
    title = (
        f"**{name}**: {workload['dataset']} ({workload['partition']}), {workload['devices']} devices, "
        f"{workload['devices_per_round']} per round, {workload['rounds']} rounds x "
        f"{workload['local_epochs']} local epochs, {workload['arch']} ({workload['params']:,} parameters)"
    )
    head = "| method | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    rows = [
        f"| {method} | " + " | ".join(_cell(m, key, fmt) for key, _, fmt in COLUMNS) + " |"
        for method, m in workload["methods"].items()
    ]
    return "\n".join([title, "", head, rule, *rows, ""])


def _methods(document: dict[str, Any]) -> list[str]:
    """Every method of any workload, in first-seen order."""
    methods: list[str] = []
    for w in document["workloads"].values():
        methods += [m for m in w["methods"] if m not in methods]
    return methods


def overview_table(document: dict[str, Any]) -> str:
    """The paper's layout: one row per method, per workload "accuracy (uplink bits per parameter)"."""
    workloads = document["workloads"]
    methods = _methods(document)
    head = "| method | " + " | ".join(f"{name} acc (up bits/param)" for name in workloads) + " |"
    rule = "|---|" + "---:|" * len(workloads)
    rows = []
    for method in methods:
        cells = []
        for w in workloads.values():
            m = w["methods"].get(method)
            cells.append("–" if m is None else f"{m['accuracy_mean']:.3f} ({m['uplink_bits_per_param']:.2f})")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows, ""])


def markdown(document: dict[str, Any]) -> str:
    size = "quick (smoke) size" if document["quick"] else "default size"
    parts = [
        f"# Comparison benchmark ({size}, seed {document['seed']}, {document['wall_s'] / 60:.1f} min)",
        "",
        f"`{document['command']}`" if document.get("command") else "",
        "",
        overview_table(document),
    ]
    parts += [workload_table(name, w) for name, w in document["workloads"].items()]
    return "\n".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_traffic(document: dict[str, Any], path: Path) -> Path:
    """Per workload: accuracy at each evaluated round against the fleet's cumulative traffic (log x).

    Lines are the per-round evaluations; the star at the end of each line is the final accuracy after
    finalization (fine-tuning, adaptation), the number in the tables.
    """
    plt = _pyplot()
    workloads = document["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.4), squeeze=False)
    colors = {method: f"C{i % 10}" for i, method in enumerate(_methods(document))}
    handles: dict[str, Any] = {}
    for ax, (name, w) in zip(axes[0], workloads.items()):
        for method, m in w["methods"].items():
            points = [(c, a) for c, a in zip(m["cumulative_bytes"], m["round_accuracy"]) if a is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot([max(1, x) / 1e6 for x in xs], ys, marker="o", markersize=3, color=colors[method])
            total = max(1, m["cumulative_bytes"][-1]) if m["cumulative_bytes"] else 1
            handles[method] = ax.scatter(
                [total / 1e6], [m["accuracy_mean"]], marker="*", s=90, color=colors[method], zorder=3
            )
        ax.set_xscale("log")
        ax.set_xlabel("cumulative traffic, uplink + downlink (MB, log)")
        ax.set_ylabel("personalized test accuracy")
        ax.set_title(f"{name} ({w['partition']}); star: final")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_device_accuracy(document: dict[str, Any], path: Path) -> Path:
    """Per workload: box plot of the final per-device test accuracy of each method."""
    plt = _pyplot()
    workloads = document["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, (name, w) in zip(axes[0], workloads.items()):
        labels = list(w["methods"])
        ax.boxplot([w["methods"][m]["device_accuracy"] for m in labels], showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right")
        ax.set_ylabel("final test accuracy per device (triangle: mean)")
        ax.set_title(f"{name}: {w['devices']} devices")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
