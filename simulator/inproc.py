"""The in-process transport: both halves of a strategy in one process, every message really encoded.

Each update and each round announcement goes through ``protocol.messages`` and the chunker exactly as it
would over MQTT, and the server half only ever sees what the decoder returns, so byte counts and
behaviour match the deployment.

Masks are coded against the bases each side holds (``protocol.mask_bases``), as the deployment codes
them: an update against the device's last accepted upload and the consensus it trained from, an
announcement against the consensus the fetching device holds (the previous round's for a device that
followed every round, an older one or none otherwise: each participant's downlink is counted for what
it holds). Next to the bytes, each round records the conditional-entropy estimate of its masks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedmask.datasets.federated import FederatedDataset
from fedmask.protocol import mask_bases, messages
from fedmask.protocol.chunking import wire_size
from fedmask.protocol.mask_coding import CONTEXT, conditional_entropy_bits
from fedmask.simulator.config import SimulationConfig
from fedmask.simulator.executors import make_executor
from fedmask.simulator.model_stats import summarize, tflite_speedup
from fedmask.simulator.results import DeviceResult, MethodResult, RoundRecord
from fedmask.strategies import ClientUpdate, TaskSpec, get_strategy
from fedmask.strategies.base import Body
from fedmask.strategies.training import derive_seed

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int, dict], None]


def arrays(body: Body | None) -> dict[str, np.ndarray] | None:
    """A decoded message body as the arrays a strategy half consumes."""
    return None if body is None else {name: coded.array for name, coded in body.items()}


def select_devices(device_ids: list[str], per_round: int | None, seed: int, round_no: int) -> list[str]:
    """Seeded choice of this round's participants (all devices when ``per_round`` is None)."""
    if per_round is None or per_round >= len(device_ids):
        return list(device_ids)
    rng = np.random.default_rng(derive_seed(seed, "selection", round_no))
    chosen = rng.choice(len(device_ids), size=per_round, replace=False)
    return [device_ids[i] for i in sorted(chosen)]


def params_per_update(server) -> int:
    """Parameters one update describes, from the shapes the server half expects."""
    expected = server.expected_update() or {}
    return int(sum(int(np.prod(shape)) for shape in expected.values()))


def entropy_bits(body: Body | None) -> float:
    """Conditional-entropy estimate (bits) of a decoded body's masks given the bases they used."""
    if not body:
        return 0.0
    return sum(conditional_entropy_bits(c.array, c.context) for c in body.values() if c.coding == "bits")


def mask_params(body: Body | None) -> int:
    return sum(int(c.array.size) for c in (body or {}).values() if c.coding == "bits")


def weighted_accuracy(evals) -> float:
    total = sum(e.num_samples for e in evals)
    return sum(e.accuracy * e.num_samples for e in evals) / total if total else 0.0


class InProcessRun:
    """Runs one strategy on one federated dataset."""

    def __init__(self, config: SimulationConfig, data: FederatedDataset, spec: TaskSpec) -> None:
        self.config = config
        self.data = data
        self.spec = spec
        self.task_id = f"{config.fleet}-{spec.strategy}-{spec.seed}"
        self.finals: dict = {}  # device id -> FinalModel, after run()
        self.context_coding = CONTEXT in config.mask_codings
        self.server_bases = mask_bases.ServerBases()
        self.device_bases: dict[str, mask_bases.DeviceBases] = {}
        # Called with (device, round, decoded update body) for every update: benchmarks read real masks.
        self.on_update: Callable[[str, int, Body], None] | None = None

    def _downlink(self, device_id: str, round_no: int, body: Body | None, shared: dict) -> tuple[int, float]:
        """Deliver round ``round_no``'s announcement to one device as it would travel to it.

        Returns (wire bytes, entropy estimate of its masks); ``shared`` caches the payload coded against
        the previous round, which every device that followed the rounds receives.
        """
        books = self.device_bases[device_id]
        held = books.consensus
        previous = self.server_bases.announced_body(round_no - 1)
        follows = bool(held) and previous is not None and all(b.round == round_no - 1 for b in held.values())
        if not self.context_coding:
            coded = mask_bases.plain(body)
        elif follows:
            coded = shared.setdefault("body", self.server_bases.downlink(round_no, body))
        else:
            coded = self.server_bases.downlink_for(body, held)
        announcement = messages.RoundAnnouncement(
            fleet=self.config.fleet, task_id=self.task_id, round=round_no, deadline=0.0, body=coded
        )
        payload = messages.encode(announcement)
        decoded = messages.decode(payload, messages.RoundAnnouncement, bases=books.announcement_bases())
        books.received(round_no, decoded.body)
        return wire_size(payload, self.config.max_payload), entropy_bits(decoded.body)

    def _uplink(self, device_id: str, round_no: int, fit) -> tuple[int, messages.Update]:
        """One device's update as it would travel: (wire bytes, what the server decodes).

        Each device codes against its own books and the server's books of that device, so updates can
        be coded in any order.
        """
        books = self.device_bases[device_id]
        payload = messages.encode(
            messages.Update(
                fleet=self.config.fleet,
                task_id=self.task_id,
                device=device_id,
                round=round_no,
                base_round=round_no,
                num_samples=fit.num_samples,
                metrics=fit.metrics,
                body=books.uplink(fit.body, round_no),
            )
        )
        received = messages.decode(payload, messages.Update, bases=self.server_bases.uplink_bases(device_id))
        self.server_bases.accept(device_id, round_no, received.body)
        books.confirm(round_no)  # the receipt
        return wire_size(payload, self.config.max_payload), received

    def _announce(self, round_no: int, body: Body | None) -> tuple[bytes, dict | None]:
        announcement = messages.RoundAnnouncement(
            fleet=self.config.fleet, task_id=self.task_id, round=round_no, deadline=0.0, body=body
        )
        payload = messages.encode(announcement)
        decoded = messages.decode(payload, messages.RoundAnnouncement)
        return payload, arrays(decoded.body)

    def run(self, progress: Progress | None = None) -> MethodResult:
        executor = make_executor(self.config, self.spec, self.data.devices)
        try:
            return self._run(executor, progress)
        finally:
            executor.close()  # also on Ctrl-C: no worker outlives the run

    def _run(self, executor, progress: Progress | None) -> MethodResult:
        cfg, spec = self.config, self.spec
        strategy = get_strategy(spec.strategy)
        started = time.perf_counter()
        server = strategy.server(spec)
        device_ids = [d.device_id for d in self.data.devices]
        codings = cfg.mask_codings
        self.device_bases = {d: mask_bases.DeviceBases(codings) for d in device_ids}
        result = MethodResult(strategy=spec.strategy, params_per_update=params_per_update(server))
        body = server.initial_body()
        # A strategy without federated rounds (the FT-only ablation) sends nothing at all.
        rounds = cfg.rounds if strategy.federated else 0
        per_round = cfg.devices_per_round if strategy.samples_devices else None  # None: every device
        for round_no in range(1, rounds + 1):
            t0 = time.perf_counter()
            _, global_body = self._announce(round_no, body)
            participants = select_devices(device_ids, per_round, spec.seed, round_no)
            timings = dict.fromkeys(("train", "encode", "aggregate"), 0.0)
            updates, uplink, losses, densities = [], 0, [], []
            downlink, down_entropy, down_params, shared = 0, 0.0, 0, {}
            t = time.perf_counter()
            # The devices train (on workers, if any) while this process codes the downlinks and then
            # each update as it arrives; the server sees them in participant order all the same.
            fits = executor.submit("fit", participants, round_no, global_body)
            timings["train"] += time.perf_counter() - t
            t = time.perf_counter()
            for device_id in participants:
                size, entropy = self._downlink(device_id, round_no, body, shared)
                downlink += size
                down_entropy += entropy
                down_params += mask_params(body)
            self.server_bases.announce(round_no, body)
            timings["encode"] += time.perf_counter() - t
            arrived: dict[str, tuple] = {}
            t = time.perf_counter()
            for device_id, fit in fits:  # in the order the devices finish
                timings["train"] += time.perf_counter() - t  # waiting for devices: parallel training
                t = time.perf_counter()
                size, received = self._uplink(device_id, round_no, fit)
                # Its entropy estimate too, while the others train (summed below in participant order).
                arrived[device_id] = (fit, size, received, entropy_bits(received.body))
                timings["encode"] += time.perf_counter() - t
                t = time.perf_counter()
            timings["train_device_s"] = executor.device_s  # summed over devices: the training work
            up_entropy, up_params = 0.0, 0
            for device_id in participants:  # in participant order, whichever device finished first
                fit, size, received, entropy = arrived[device_id]
                uplink += size
                if self.on_update is not None:
                    self.on_update(device_id, round_no, received.body)
                up_entropy += entropy
                up_params += mask_params(received.body)
                updates.append(
                    ClientUpdate(
                        device_id=received.device,
                        body=arrays(received.body),
                        num_samples=received.num_samples,
                    )
                )
                losses.append(fit.metrics.get("loss"))
                if "density" in fit.metrics:
                    densities.append(fit.metrics["density"])
            t = time.perf_counter()
            body = server.aggregate(updates, round_no)
            timings["aggregate"] = time.perf_counter() - t
            record = RoundRecord(
                round=round_no,
                participants=participants,
                uplink_bytes=uplink,
                downlink_bytes=downlink,
                train_loss=float(np.mean([x for x in losses if x is not None])) if losses else None,
                density=float(np.mean(densities)) if densities else None,
                timings=timings,
            )
            if cfg.eval_every and (round_no % cfg.eval_every == 0 or round_no == rounds):
                # Personalized accuracy as each device would end now (before the next merge).
                _, latest = self._announce(round_no + 1, body)
                evals = executor.run("evaluate", device_ids, round_no, latest)
                record.accuracy_mean = weighted_accuracy([evals[d] for d in device_ids])
            record.set_mask_bits(
                result.params_per_update,
                up_params=up_params,
                up_entropy=up_entropy,
                down_params=down_params,
                down_entropy=down_entropy,
            )
            record.wall_s = time.perf_counter() - t0
            result.rounds.append(record)
            if progress:
                progress(
                    spec.strategy,
                    round_no,
                    rounds,
                    {"acc": record.accuracy_mean, "loss": record.train_loss},
                )
        _, final_body = self._announce(rounds + 1, body)
        by_id = {d.device_id: d for d in self.data.devices}
        stats = {}
        finals = executor.run("finalize", device_ids, rounds + 1, final_body)
        for device_id in device_ids:
            final, stats[device_id] = finals[device_id]
            self.finals[device_id] = final
            result.devices.append(
                DeviceResult(
                    device_id=device_id,
                    accuracy=final.evaluation.accuracy,
                    num_test=final.evaluation.num_samples,
                    metrics={
                        **final.metrics,
                        "density": stats[device_id]["density"],
                        "compacted_params_ratio": stats[device_id]["compacted_params_ratio"],
                        "dead_classes": len(stats[device_id]["dead_classes"]),
                    },
                )
            )
        result.wall_s = time.perf_counter() - started
        self._save_masks()
        self._measure_tflite(stats, by_id, seed=spec.seed)
        result.extra.update(summarize(stats))
        return result

    def _save_masks(self) -> None:
        """Every device's final mask, for the inference benchmark (``final-masks-<strategy>.npz``)."""
        masks = {d: f.mask for d, f in self.finals.items() if f.mask is not None}
        if masks:
            out = Path(self.config.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out / f"final-masks-{self.spec.strategy}.npz", **masks)

    def _measure_tflite(self, stats: dict, by_id: dict, seed: int) -> None:
        """TFLite latency, dense vs compacted, on a seeded sample of devices whose model compacts at all."""
        limit = self.config.tflite_devices
        candidates = sorted(d for d, s in stats.items() if s["compacted_params_ratio"] > 1.0)
        if not limit or not candidates:
            return
        rng = np.random.default_rng(derive_seed(seed, "tflite-sample"))
        chosen = sorted(rng.choice(candidates, size=min(limit, len(candidates)), replace=False))
        for device_id in chosen:
            stats[device_id]["tflite"] = tflite_speedup(self.finals[device_id].model, by_id[device_id])
