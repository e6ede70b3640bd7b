"""``fedmask data``: partition a workload into per-device files, or describe it.

Light on purpose: NumPy and the loaders are imported only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmask.config import add_option

if TYPE_CHECKING:
    from fedmask.datasets.federated import FederatedDataset

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data partition`` and ``data info`` to the ``fedmask`` command."""
    data = subparsers.add_parser("data", help="partition data sets into per-device files, or describe them")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(handler=lambda _args: data.print_help() or 2)

    partition = actions.add_parser("partition", help="write one .npz per device plus manifest.json")
    _add_workload_options(partition)
    add_option(partition, "--out", help="output folder for the device files and manifest.json")
    partition.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    partition.set_defaults(handler=run_partition)

    info = actions.add_parser("info", help="print devices, train/test sizes and classes")
    _add_workload_options(info)
    info.set_defaults(handler=run_info)


def _add_workload_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--dataset", help="workload name, e.g. hmp, fashion_mnist, shakespeare")
    add_option(parser, "--partition", help="shards, dirichlet, iid or natural (default: the workload's)")
    add_option(parser, "--devices", type=int, help="number of devices (default: the workload's)")
    add_option(parser, "--seed", type=int, default=0, help="seed for splits and partitions")
    add_option(parser, "--data-root", help="folder holding the data sets (default: ../shared/datasets)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="loader or partitioner option, e.g. alpha=0.1 or stride=32 (repeatable; VALUE read as JSON)",
    )


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["alpha=0.1", "name=x"]`` -> ``{"alpha": 0.1, "name": "x"}``; values are JSON when they parse."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def _load(args: argparse.Namespace) -> FederatedDataset:
    from fedmask.datasets.workloads import WORKLOADS, load_workload

    if not args.dataset:
        raise ValueError(f"--dataset is required; one of {', '.join(WORKLOADS)}")
    return load_workload(
        args.dataset,
        Path(args.data_root) if args.data_root else None,
        partition=args.partition,
        num_devices=args.devices,
        seed=args.seed,
        **parse_params(args.param),
    )


def run_partition(args: argparse.Namespace) -> int:
    """Handler of ``fedmask data partition``."""
    from fedmask.datasets.errors import DatasetError
    from fedmask.datasets.federated import save_device

    if not args.out:
        logger.error("--out is required: the folder to write device files into")
        return 2
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        logger.error("%s is not empty; pass --overwrite to write into it", out)
        return 2
    try:
        data = _load(args)
    except (DatasetError, ValueError, TypeError) as exc:
        logger.error("%s", exc)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for dev in data.devices:
        path = save_device(dev, out / f"{dev.device_id}.npz", data.num_classes)
        entries.append(
            {
                "device_id": dev.device_id,
                "file": path.name,
                "num_train": dev.num_train,
                "num_test": dev.num_test,
                "train_label_counts": data.label_counts(dev, "train").tolist(),
            }
        )
    manifest = {
        "dataset": data.name,
        "partition": data.partition,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "input_dtype": data.input_dtype.name,
        "meta": data.meta,
        "devices": entries,
    }
    (out / MANIFEST).write_text(manifest_text(manifest))
    logger.info("wrote %d device files and %s to %s", len(entries), MANIFEST, out)
    return 0


def manifest_text(manifest: dict[str, Any]) -> str:
    """Pretty JSON with one line per device, so a 100-device manifest stays readable."""
    devices = manifest.get("devices", [])
    head = json.dumps({k: v for k, v in manifest.items() if k != "devices"}, indent=2, sort_keys=True)
    rows = ",\n".join("    " + json.dumps(d, sort_keys=True) for d in devices)
    return head[:-2] + ',\n  "devices": [\n' + rows + "\n  ]\n}\n"


def run_info(args: argparse.Namespace) -> int:
    """Handler of ``fedmask data info``."""
    from fedmask.datasets.errors import DatasetError

    try:
        data = _load(args)
    except (DatasetError, ValueError, TypeError) as exc:
        logger.error("%s", exc)
        return 1
    print(format_info(data))
    return 0


def format_info(data: FederatedDataset) -> str:
    """A table of devices with train/test sizes and classes held, then totals."""
    lines = [
        f"dataset {data.name}  partition {data.partition}  devices {data.num_devices}  "
        f"classes {data.num_classes}  input {data.input_dtype.name}{list(data.input_shape)}  "
        f"architecture {data.meta.get('architecture', '-')}",
        f"{'device':<24} {'train':>8} {'test':>8} {'classes':>8} {'test classes':>13}",
    ]
    for dev in data.devices:
        train_classes = int((data.label_counts(dev, "train") > 0).sum())
        test_classes = int((data.label_counts(dev, "test") > 0).sum())
        lines.append(
            f"{dev.device_id:<24} {dev.num_train:>8} {dev.num_test:>8} {train_classes:>8} {test_classes:>13}"
        )
    total_train = sum(d.num_train for d in data.devices)
    total_test = sum(d.num_test for d in data.devices)
    lines.append(f"{'total':<24} {total_train:>8} {total_test:>8}")
    return "\n".join(lines)
