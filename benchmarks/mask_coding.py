#!/usr/bin/env python3
"""Mask coding benchmark (issue 12): masks coded against what both sides hold, on real FedMask runs.

For each workload, runs FedMask *with its current defaults* (whatever ``strategies/fedmask.py`` says
today; the hyperparameters used are recorded in the JSON) in the in-process simulator, which encodes
every update and announcement exactly as the deployment does (``protocol.mask_bases``) and counts the
wire bytes. Reports, per round and averaged over rounds:

- uplink and downlink bits per parameter on the wire (whole messages: envelope, checksum, chunk
  frames), beside the conditional-entropy estimate of the context model (``mctx``) and the order-0
  entropy H(density);
- the same run's masks coded the version-1 way (``bits``: bit-packed + zlib), as the baseline;
- coded size of each ``mctx`` stream against its conditional-entropy estimate (target: within 5%);
- FedAvg's float32 (32 bits/param) over the uplink (target: >= 100x);
- encode + decode median time of a real 100,000-bit mask against its bases (target: <= 5 ms).

    python benchmarks/mask_coding.py                   # HMP 16 x 10 rounds, Fashion-MNIST 100 devices
    python benchmarks/mask_coding.py --quick           # fewer rounds / devices (a minute or two)
    python benchmarks/mask_coding.py --workloads hmp

Prints tables and writes <out>/mask_coding.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import print_table

from fedmask.datasets.workloads import WORKLOADS as DATA_WORKLOADS
from fedmask.datasets.workloads import load_workload
from fedmask.protocol.mask_coding import (
    Base,
    MaskContext,
    conditional_entropy_bits,
    decode_mask,
    encode_mask,
    order0_entropy_bits,
)
from fedmask.protocol.tensor_codec import Coded, encode_array
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.inproc import InProcessRun
from fedmask.simulator.run import task_spec
from fedmask.strategies import get_strategy

# name -> (config, overrides for --quick); the FedMask hyperparameters are the strategy's defaults.
WORKLOADS: dict[str, tuple[dict, dict]] = {
    "hmp": ({"dataset": "hmp", "rounds": 10, "local_epochs": 1}, {"rounds": 4}),
    "fashion_mnist": (
        {
            "dataset": "fashion_mnist",
            "partition": "shards",
            "devices": 100,
            "devices_per_round": 20,
            "rounds": 10,
            "local_epochs": 2,
            "arch_kwargs": {"width": 0.25},
        },
        {"rounds": 4, "devices": 20, "devices_per_round": 10, "dataset_kwargs": {"shard_size": 300}},
    ),
}
FEDAVG_BITS = 32.0


def median_ms(run, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (this process) milliseconds: on a shared machine the two differ."""
    run()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def run_workload(name: str, quick: bool, seed: int) -> tuple[dict, dict]:
    base, small = WORKLOADS[name]
    config = SimulationConfig(**{**base, **(small if quick else {})}, seed=seed, eval_every=0)
    data = load_workload(
        config.dataset, None, partition=config.partition, num_devices=config.devices, seed=seed,
        **config.dataset_kwargs,
    )  # fmt: skip
    spec = task_spec(config, "fedmask", DATA_WORKLOADS[name].architecture, data.num_classes)
    run = InProcessRun(config, data, spec)
    uploads: dict[tuple[str, int], np.ndarray] = {}
    run.on_update = lambda device, round_no, body: uploads.__setitem__(
        (device, round_no), np.asarray(body["mask"].array, dtype=bool).reshape(-1)
    )
    started = time.perf_counter()
    result = run.run()
    wall = time.perf_counter() - started
    announced = run.server_bases.announced
    rounds, streams = [], {"up": [0, 0.0], "down": [0, 0.0]}  # coded bits, estimate bits
    last: dict[str, tuple[int, np.ndarray]] = {}
    v1_up = v1_down = 0
    for record in result.rounds:
        r = record.round
        consensus = announced.get(r, {})
        side = consensus.get("keep", consensus.get("mask"))
        up_h0 = 0.0
        for device in record.participants:
            mask = uploads[(device, r)]
            context = MaskContext(
                prev=Base(*last[device]) if device in last else None,
                side=None if side is None else Base(r, side),
            )
            coded = len(encode_mask(mask, context)) * 8
            streams["up"][0] += coded
            streams["up"][1] += conditional_entropy_bits(mask, context)
            up_h0 += order0_entropy_bits(mask)
            v1_up += len(encode_array(Coded(mask, "bits"))["d"]) * 8
            last[device] = (r, mask)
        previous = announced.get(r - 1, {})
        for entry, mask in consensus.items():
            context = MaskContext(prev=Base(r - 1, previous[entry]) if entry in previous else None)
            streams["down"][0] += len(encode_mask(mask, context)) * 8 * len(record.participants)
            streams["down"][1] += conditional_entropy_bits(mask, context) * len(record.participants)
            v1_down += len(encode_array(Coded(mask, "bits"))["d"]) * 8 * len(record.participants)
        n = result.params_per_update * len(record.participants)
        rounds.append(
            {
                "round": r,
                "participants": len(record.participants),
                "density": record.density,
                "up_bits_per_param": record.uplink_bits_per_param,
                "up_entropy_bits_per_param": record.uplink_entropy_bits_per_param,
                "up_order0_bits_per_param": up_h0 / n,
                "down_bits_per_param": record.downlink_bits_per_param,
                "down_entropy_bits_per_param": record.downlink_entropy_bits_per_param,
            }
        )
    updates = sum(len(r.participants) for r in result.rounds)
    n_total = result.params_per_update * updates
    summary = {
        "workload": name,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("output_dir", "data_root")},
        "fedmask_hyper": get_strategy("fedmask").effective_hyper(spec),
        "params_per_update": result.params_per_update,
        "updates": updates,
        "wall_s": wall,
        "up_bits_per_param": result.uplink_bits_per_param(),
        "down_bits_per_param": result.downlink_bits_per_param(),
        "up_entropy_bits_per_param": _mean(r["up_entropy_bits_per_param"] for r in rounds),
        "down_entropy_bits_per_param": _mean(r["down_entropy_bits_per_param"] for r in rounds),
        "up_order0_bits_per_param": _mean(r["up_order0_bits_per_param"] for r in rounds),
        "up_v1_bits_per_param": v1_up / n_total,
        "down_v1_bits_per_param": v1_down / n_total,
        "up_mean_over_rounds": _mean(r["up_bits_per_param"] for r in rounds),
        "down_mean_over_rounds": _mean(r["down_bits_per_param"] for r in rounds),
        "up_coded_over_estimate": streams["up"][0] / streams["up"][1],
        "down_coded_over_estimate": streams["down"][0] / max(streams["down"][1], 1e-9),
        "fedavg_f32_over_up": FEDAVG_BITS / result.uplink_bits_per_param(),
        "rounds": rounds,
    }
    return summary, {"uploads": uploads, "announced": announced}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def timing(masks: dict, repeats: int, n: int = 100_000) -> dict:
    """encode + decode of a real 100,000-bit mask: a device's upload against its previous upload and the
    consensus, the masks of consecutive rounds concatenated until they reach n bits."""
    uploads, announced = masks["uploads"], masks["announced"]
    triples = []
    for (device, r), mask in sorted(uploads.items(), key=lambda kv: -kv[0][1]):  # settled masks first
        prev = uploads.get((device, r - 1))
        side = announced.get(r, {}).get("keep")
        if prev is not None and side is not None:
            triples.append((mask, prev, side))
    if not triples:
        return {}
    parts = [np.concatenate([t[i] for t in triples])[:n] for i in range(3)]
    reps = -(-n // parts[0].size)
    mask, prev, side = (np.tile(p, reps)[:n] for p in parts)
    context = MaskContext(Base(1, prev), Base(2, side))
    data = encode_mask(mask, context)
    assert np.array_equal(decode_mask(data, n, context), mask)
    out = {
        "bits": n,
        "density": float(mask.mean()),
        "coded_bits_per_param": len(data) * 8 / n,
    }
    for key, run in (
        ("encode", lambda: encode_mask(mask, context)),
        ("decode", lambda: decode_mask(data, n, context)),
        ("encode_decode", lambda: decode_mask(encode_mask(mask, context), n, context)),
    ):
        out[f"{key}_ms"], out[f"{key}_cpu_ms"] = median_ms(run, repeats)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and devices")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=51, help="timing runs (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="output directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    results, timings = [], {}
    for name in args.workloads:
        summary, masks = run_workload(name, args.quick, args.seed)
        results.append(summary)
        timings[name] = timing(masks, args.repeats)
    for s in results:
        print_table(
            f"{s['workload']}: {s['params_per_update']:,} mask bits, {s['updates']} updates "
            "(b/p: bits/param on the wire; H: conditional-entropy estimate; H0: order-0 entropy)",
            [_no_none(r) for r in s["rounds"]],
            [
                ("round", "round", "{}"),
                ("participants", "devices", "{}"),
                ("density", "density", "{:.3f}"),
                ("up_bits_per_param", "up b/p", "{:.3f}"),
                ("up_entropy_bits_per_param", "up H", "{:.3f}"),
                ("up_order0_bits_per_param", "up H0", "{:.3f}"),
                ("down_bits_per_param", "down b/p", "{:.3f}"),
                ("down_entropy_bits_per_param", "down H", "{:.3f}"),
            ],
        )
    print_table(
        "summary (bits/param, mean over updates; v1: the same masks bit-packed + zlib, body only)",
        [_no_none(r) for r in results],
        [
            ("workload", "workload", "{}"),
            ("up_bits_per_param", "up b/p", "{:.3f}"),
            ("up_entropy_bits_per_param", "up H", "{:.3f}"),
            ("up_v1_bits_per_param", "up v1", "{:.3f}"),
            ("down_bits_per_param", "down b/p", "{:.3f}"),
            ("down_entropy_bits_per_param", "down H", "{:.3f}"),
            ("down_v1_bits_per_param", "down v1", "{:.3f}"),
            ("up_coded_over_estimate", "up coded/H", "{:.3f}"),
            ("down_coded_over_estimate", "down coded/H", "{:.3f}"),
            ("fedavg_f32_over_up", "FedAvg/up", "{:.0f}x"),
        ],
    )
    print_table(
        "encode + decode of a real 100,000-bit mask against its bases (median ms: wall; CPU of this process)",
        [{"masks from": name, **t} for name, t in timings.items() if t],
        [
            ("masks from", "masks from", "{}"),
            ("density", "density", "{:.3f}"),
            ("coded_bits_per_param", "coded b/p", "{:.3f}"),
            ("encode_ms", "encode", "{:.2f}"),
            ("decode_ms", "decode", "{:.2f}"),
            ("encode_decode_ms", "encode+decode", "{:.2f}"),
            ("encode_decode_cpu_ms", "encode+decode CPU", "{:.2f}"),
        ],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "mask_coding.json"
    report = {
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "machine": platform.machine()},
        "workloads": results,
        "timing_100k": timings,
    }
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {out}")
    return 0


def _no_none(row: dict) -> dict:
    return {k: float("nan") if v is None else v for k, v in row.items()}


if __name__ == "__main__":
    raise SystemExit(main())
