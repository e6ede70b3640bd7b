#!/usr/bin/env python3
"""Protocol benchmark: what the envelope (validation + canonical SHA-256) and chunking cost.

For FedMask-style updates (a bit mask over N parameters, dense at 50% or sparse at 5% kept) and a
FedAvg-style float32 update, measures in one run:

- encode: ``messages.encode`` against the baseline ``msgpack.packb`` of the same coded map (no
  validation, no checksum): the ratio is the envelope's cost;
- decode: ``messages.decode`` against ``msgpack.unpackb`` + ``tensor_codec.decode_body`` (no checks);
- chunk: ``split`` + ``Reassembler.accept`` of every frame at 128 KiB;
- wire bytes per parameter, and the peak traced memory of a decode relative to the payload.

Medians of ``--repeats`` runs.

    python benchmarks/protocol_codec.py            # 0.1M, 1M and 10M parameters
    python benchmarks/protocol_codec.py --quick    # 0.1M and 1M

Prints a table and writes <out>/protocol_codec.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np

from fedmask.protocol import messages as m
from fedmask.protocol.chunking import DEFAULT_MAX_PAYLOAD, Reassembler, split, wire_size
from fedmask.protocol.tensor_codec import Coded, decode_body, encode_body


def median_s(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def make_update(kind: str, n_params: int) -> m.Update:
    rng = np.random.default_rng(0)
    if kind == "fedavg_f32":
        body = {"weights": Coded(rng.standard_normal(n_params).astype(np.float32), "f32")}
    else:
        keep = 0.5 if kind == "mask_dense" else 0.05
        body = {"mask": Coded(rng.random(n_params) < keep, "bits")}
    return m.Update(
        fleet="bench", task_id="t", device="dev-1", round=3, base_round=3, num_samples=500,
        metrics={"loss": 0.5}, body=body,
    )  # fmt: skip


def measure(kind: str, n_params: int, repeats: int) -> dict:
    update = make_update(kind, n_params)
    wire_map = {"v": 1, "type": "update", **update.to_wire()}
    payload = m.encode(update)
    frames = split(payload, DEFAULT_MAX_PAYLOAD)

    def reassemble() -> bytes | None:
        reassembler, out = Reassembler(), None
        for frame in frames:
            out = reassembler.accept("up/dev-1", frame)
        return out

    assert reassemble() == payload
    row = {
        "workload": kind,
        "params": n_params,
        "payload_bytes": len(payload),
        "wire_bytes": wire_size(payload, DEFAULT_MAX_PAYLOAD),
        "frames": len(frames),
        "encode_body_s": median_s(lambda: encode_body(update.body), repeats),
        "pack_baseline_s": median_s(lambda: msgpack.packb(wire_map, use_bin_type=True), repeats),
        "encode_s": median_s(lambda: m.encode(update), repeats),
        "decode_baseline_s": median_s(lambda: decode_body(msgpack.unpackb(payload)["body"]), repeats),
        "decode_s": median_s(lambda: m.decode(payload, m.Update), repeats),
        "chunk_s": median_s(lambda: (split(payload, DEFAULT_MAX_PAYLOAD), reassemble()), repeats),
        "decode_peak_bytes": peak_bytes(lambda: m.decode(payload, m.Update)),
    }
    row["bits_per_param"] = 8 * row["wire_bytes"] / n_params
    # the envelope's cost on top of coding the body: (encode - body coding) vs plain packing
    row["encode_ratio"] = row["encode_s"] / (row["encode_body_s"] + row["pack_baseline_s"])
    row["decode_ratio"] = row["decode_s"] / row["decode_baseline_s"]
    row["decode_peak_per_payload"] = row["decode_peak_bytes"] / len(payload)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.1M and 1M parameters only")
    parser.add_argument("--repeats", type=int, default=7, help="runs per measurement (median)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="output directory")
    args = parser.parse_args()
    sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    rows = [
        measure(kind, n, args.repeats) for n in sizes for kind in ("mask_dense", "mask_sparse", "fedavg_f32")
    ]
    header = (
        f"{'workload':<12} {'params':>10} {'wire KB':>9} {'bits/p':>7} {'frames':>6} {'enc ms':>8} "
        f"{'x base':>7} {'dec ms':>8} {'x base':>7} {'chunk ms':>9} {'dec peak':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [
            f"{r['workload']:<12}",
            f"{r['params']:>10,}",
            f"{r['wire_bytes'] / 1024:>9.1f}",
            f"{r['bits_per_param']:>7.3f}",
            f"{r['frames']:>6}",
            f"{r['encode_s'] * 1e3:>8.2f}",
            f"{r['encode_ratio']:>7.2f}",
            f"{r['decode_s'] * 1e3:>8.2f}",
            f"{r['decode_ratio']:>7.2f}",
            f"{r['chunk_s'] * 1e3:>9.2f}",
            f"{r['decode_peak_per_payload']:>8.1f}x",
        ]
        print(" ".join(cells))
    print(
        "x base: encode vs (body coding + plain msgpack.packb), decode vs (msgpack.unpackb + decode_body); "
        "dec peak: traced peak memory of decode / payload size"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "protocol_codec.json"
    out.write_text(
        json.dumps({"max_payload": DEFAULT_MAX_PAYLOAD, "repeats": args.repeats, "rows": rows}, indent=2)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
