"""The report's plots as PNG bytes, one line (or bar group) per task, drawn with matplotlib's Agg backend.

Matplotlib's pyplot keeps global state, so drawing is serialized (the dashboard draws from several
request threads).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fedmask.report.model import TaskReport

_LOCK = threading.Lock()
MAX_DEVICE_LABELS = 40  # beyond this many devices the x axis shows no device names


def _figure(draw: Callable[[Any, Sequence[TaskReport]], None], reports: Sequence[TaskReport], **kw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _LOCK:
        fig = plt.figure(figsize=kw.get("figsize", (6.4, 3.8)))
        try:
            draw(fig, reports)
            fig.tight_layout()
            out = io.BytesIO()
            fig.savefig(out, format="png", dpi=kw.get("dpi", 100))
            return out.getvalue()
        finally:
            plt.close(fig)


def _finish(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    if xlabel == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    if not ax.has_data():
        ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes, color="grey")


def _lines(ax: Any, reports: Sequence[TaskReport], value: Callable[[Any], float | None], **style) -> None:
    for index, report in enumerate(reports):
        points = [(r.round, value(r)) for r in report.rounds if value(r) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, color=f"C{index}", label=report.name, **style)


def accuracy(fig: Any, reports: Sequence[TaskReport]) -> None:
    ax = fig.add_subplot()
    _lines(ax, reports, lambda r: r.accuracy)
    ax.set_ylim(0, 1)
    _finish(ax, "round", "test accuracy (participants, sample-weighted)", "Accuracy per round")


def participation(fig: Any, reports: Sequence[TaskReport]) -> None:
    ax = fig.add_subplot()
    for index, report in enumerate(reports):
        label = report.name if len(reports) > 1 else None
        rounds = [r.round for r in report.rounds]
        color = f"C{index}"
        ax.plot(rounds, [r.participants for r in report.rounds], "o-", ms=3, color=color, label=label)
        ax.plot(rounds, [r.late for r in report.rounds], "s--", ms=3, color=color)
        missing = [(r.round, r.missing) for r in report.rounds if r.missing is not None]
        if missing:
            ax.plot(*zip(*missing), "x:", ms=4, color=color)
        quorum = [(r.round, r.quorum) for r in report.rounds if r.quorum is not None]
        if quorum:
            ax.step(*zip(*quorum), where="mid", color=color, alpha=0.3, lw=3)
    # A key for the line styles, whatever the number of tasks.
    for style, what in (("o-", "accepted"), ("s--", "late (stale)"), ("x:", "missing"), ("-", "quorum")):
        ax.plot([], [], style, color="grey", alpha=0.3 if what == "quorum" else 1, label=what)
    _finish(ax, "round", "devices", "Participation and stragglers per round")


def traffic(fig: Any, reports: Sequence[TaskReport]) -> None:
    ax = fig.add_subplot()
    _lines(ax, reports, lambda r: r.uplink_bytes / 1024 if r.participants else None)
    for index, report in enumerate(reports):
        points = [(r.round, r.downlink_bytes / 1024) for r in report.rounds if r.downlink_bytes]
        if points:
            ax.plot(*zip(*points), "--", color=f"C{index}", alpha=0.7)
    values = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if values and max(values) > 50 * min(values):  # tasks (or directions) orders of magnitude apart
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.plot([], [], "-", color="grey", label="uplink")
    ax.plot([], [], "--", color="grey", label="downlink")
    _finish(ax, "round", "KiB per round", "Traffic per round")


def uplink_bits(fig: Any, reports: Sequence[TaskReport]) -> None:
    ax = fig.add_subplot()
    _lines(ax, reports, lambda r: r.uplink_bits_per_param)
    if ax.has_data():
        ax.set_yscale("log")
    _finish(ax, "round", "uplink bits per parameter per device", "Uplink bits per parameter")


def rejections(fig: Any, reports: Sequence[TaskReport]) -> None:
    ax = fig.add_subplot()
    reasons = sorted({reason for r in reports for reason in r.rejections_by_reason})
    height = 0.8 / max(1, len(reports))
    for index, report in enumerate(reports):
        counts = [report.rejections_by_reason.get(reason, 0) for reason in reasons]
        if any(counts):
            ax.barh(
                [i + index * height for i in range(len(reasons))],
                counts,
                height=height,
                color=f"C{index}",
                label=report.name,
            )
    ax.set_yticks([i + height * (len(reports) - 1) / 2 for i in range(len(reasons))], reasons)
    _finish(ax, "messages", "", "Rejections by reason")


def _per_device(ax: Any, reports: Sequence[TaskReport], value: Callable[[Any], float | None]) -> str:
    """One bar per device (grouped by task) for a small fleet; for a large one, each task's values
    sorted, best first, as a line: readable, and drawn in milliseconds instead of seconds. Returns the
    x axis label."""
    devices = sorted({d.device_id for r in reports for d in r.devices})
    if len(devices) > MAX_DEVICE_LABELS:
        for index, report in enumerate(reports):
            ys = sorted((v for d in report.devices if (v := value(d)) is not None), reverse=True)
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, color=f"C{index}", label=report.name)
        return "devices, ranked"
    width = 0.8 / max(1, len(reports))
    for index, report in enumerate(reports):
        values = {d.device_id: value(d) for d in report.devices}
        points = [(i, values[d]) for i, d in enumerate(devices) if values.get(d) is not None]
        if points:
            xs, ys = zip(*points)
            ax.bar([x + index * width for x in xs], ys, width=width, color=f"C{index}", label=report.name)
    ax.set_xticks(
        [i + width * (len(reports) - 1) / 2 for i in range(len(devices))],
        devices,
        rotation=90,
        fontsize="x-small",
    )
    return "device"


def device_accuracy(fig: Any, reports: Sequence[TaskReport]) -> None:
    ax = fig.add_subplot()
    xlabel = _per_device(ax, reports, lambda d: d.accuracy)
    ax.set_ylim(0, 1)
    _finish(ax, xlabel, "accuracy", "Final accuracy per device")


def device_models(fig: Any, reports: Sequence[TaskReport]) -> None:
    panels = (
        (lambda d: d.density, "density", "Mask density"),
        (lambda d: None if d.size_bytes is None else d.size_bytes / 1024, "KiB", "Model size (.tflite)"),
        (lambda d: d.latency_ms, "ms", "Inference latency (median)"),
    )
    for position, (value, ylabel, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(3, 1, position)
        xlabel = _per_device(ax, reports, value)
        _finish(ax, xlabel if position == 3 else "", ylabel, title)


def _from_store(reports: Sequence[TaskReport]) -> bool:
    return any(r.source == "store" for r in reports)


def _has_bits(reports: Sequence[TaskReport]) -> bool:
    return any(x.uplink_bits_per_param is not None for r in reports for x in r.rounds)


Draw = Callable[[Any, Sequence[TaskReport]], None]
# name -> (title, how to draw, figure options, whether it applies); the order is the page's.
PLOTS: dict[str, tuple[str, Draw, dict[str, Any], Callable[[Sequence[TaskReport]], bool]]] = {
    "accuracy": ("Accuracy per round", accuracy, {}, bool),
    "participation": ("Participation and stragglers per round", participation, {}, bool),
    "traffic": ("Traffic per round", traffic, {}, bool),
    # The simulator knows the parameters an update describes; the store does not keep that number.
    "uplink": ("Uplink bits per parameter", uplink_bits, {}, _has_bits),
    # Only a store records refused messages.
    "rejections": ("Rejections by reason", rejections, {}, _from_store),
    "device_accuracy": ("Final accuracy per device", device_accuracy, {}, bool),
    "device_models": ("Density, size and latency per device", device_models, {"figsize": (6.4, 8.0)}, bool),
}


def applicable(reports: Sequence[TaskReport]) -> list[str]:
    """The plots that say something about these reports, in page order."""
    return [name for name, (_, _, _, applies) in PLOTS.items() if applies(reports)]


def render(name: str, reports: Sequence[TaskReport]) -> bytes:
    """One plot as PNG bytes; ``KeyError`` for a name not in ``PLOTS``."""
    _, draw, options, _ = PLOTS[name]
    return _figure(draw, reports, **options)


def render_all(reports: Sequence[TaskReport]) -> dict[str, bytes]:
    return {name: render(name, reports) for name in applicable(reports)}
