"""What every benchmark ends with: a plain-text table and a JSON report (imported by the scripts
beside it)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

SECRET_SETTINGS = ("pg_admin",)  # connection strings: not written into a report


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (row key, header, format) triples; columns are padded to their widest cell."""
    print(f"\n{title}")
    cells = [[fmt.format(row[key]) for key, _, fmt in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def write_report(
    out: Path,
    benchmark: str,
    argv: list[str] | None,
    settings: argparse.Namespace | None = None,
    **sections: Any,
) -> None:
    """Write ``{benchmark, created, command, machine, settings, **sections}`` as JSON to ``out``; ``argv``
    as ``main`` got it (None: the command line)."""
    report: dict[str, Any] = {
        "benchmark": benchmark,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    if settings is not None:
        report["settings"] = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(settings).items()
            if k not in SECRET_SETTINGS
        }
    report.update(sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
