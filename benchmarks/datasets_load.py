"""How long loading the real data sets takes, against a naive baseline measured in the same run.

Baselines: HMP parsed file by file with ``np.loadtxt`` (the obvious implementation) against our
parser; cold loads (per-process cache cleared) against warm ones. Prints a table of medians and
writes JSON.

    python benchmarks/datasets_load.py [--repeats 5] [--out runs/bench-datasets] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedmask.datasets import hmp, idx
from fedmask.datasets.workloads import FASHION_MNIST_SYSTEM, default_data_root, load_workload


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hmp_loadtxt_baseline(root: Path) -> list[np.ndarray]:
    return [np.loadtxt(p, dtype=np.uint8, ndmin=2) for p in sorted(root.glob("*/*.txt"))]


def hmp_parse_cold(root: Path) -> None:
    hmp._CACHE.clear()
    hmp.read_recordings(root, include_model_excerpts=True)


def hmp_load_cold(root: Path) -> None:
    hmp._CACHE.clear()
    hmp.load_hmp(root)


def fashion_cold() -> None:
    idx._CACHE.clear()
    load_workload("fashion_mnist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-datasets"), help="output directory")
    parser.add_argument("--data-root", type=Path, help="data sets directory (default ../shared/datasets)")
    args = parser.parse_args()
    data_root = args.data_root or default_data_root()
    hmp_root = data_root / "hmp" / "HMP_Dataset"
    shakespeare_file = data_root / "shakespeare" / "tinyshakespeare.txt"

    rows: list[dict[str, object]] = []

    def measure(case: str, fn: Callable[[], object], baseline: float | None = None) -> float:
        seconds = median_seconds(fn, args.repeats)
        ratio = round(baseline / seconds, 2) if baseline else None
        rows.append({"case": case, "median_s": round(seconds, 4), "speedup_vs_baseline": ratio})
        return seconds

    if hmp_root.is_dir():
        naive = measure("hmp parse, np.loadtxt per file (baseline)", lambda: hmp_loadtxt_baseline(hmp_root))
        measure("hmp parse, fedmask (cold)", lambda: hmp_parse_cold(hmp_root), naive)
        cold = measure("hmp load + windows (cold)", lambda: hmp_load_cold(hmp_root))
        measure("hmp load + windows (warm)", lambda: hmp.load_hmp(hmp_root), cold)
    if (FASHION_MNIST_SYSTEM / "train-images-idx3-ubyte.gz").is_file():
        cold = measure("fashion_mnist shards 100 devices (cold)", fashion_cold)
        measure("fashion_mnist shards 100 devices (warm)", lambda: load_workload("fashion_mnist"), cold)
    if shakespeare_file.is_file():
        measure("shakespeare 98 speakers, capped", lambda: load_workload("shakespeare", shakespeare_file))

    width = max(len(str(r["case"])) for r in rows)
    print(f"{'case':<{width}}  {'median s':>9}  {'x baseline':>10}")
    for r in rows:
        ratio = f"{r['speedup_vs_baseline']:.2f}" if r["speedup_vs_baseline"] else "-"
        print(f"{r['case']:<{width}}  {r['median_s']:>9.4f}  {ratio:>10}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "datasets_load",
        "repeats": args.repeats,
        "python": platform.python_version(),
        "rows": rows,
    }
    (args.out / "datasets_load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'datasets_load.json'}")


if __name__ == "__main__":
    main()
