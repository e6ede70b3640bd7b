"""The plain-text table every benchmark prints (imported by the scripts beside it)."""

from __future__ import annotations

from typing import Any


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
