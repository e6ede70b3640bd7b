"""protocol.messages: every message round-trips byte-exactly, and every fault the codec layer can see is
refused with its own Rejection (one test per reason; chunk-level reasons are in test_protocol_chunking)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from fedmask.protocol import messages as m
from fedmask.protocol.errors import ProtocolError, Rejection
from fedmask.protocol.tensor_codec import Coded

FLEET = "fleet-a"


@functools.cache
def tiny_tflite() -> bytes:
    """A real TFLite flatbuffer (y = x + [0, 1, 2, 3]), written with the project's builder."""
    import tflite

    from fedmask.models.tflite_builder import GraphBuilder  # imports torch: only where needed

    graph = GraphBuilder()
    x = graph.tensor("x", (1, 4))
    c = graph.constant("c", np.arange(4, dtype=np.float32).reshape(1, 4))
    y = graph.tensor("y", (1, 4))
    graph.operator(tflite.BuiltinOperator.ADD, [x, c], [y])
    return graph.finish([x], [y])


def safetensors_file(arrays: dict[str, np.ndarray]) -> bytes:
    """A real safetensors file: u64 header length, JSON header, raw little-endian data."""
    header, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def make_task(**changes) -> m.Task:
    fields = dict(
        fleet=FLEET,
        task_id="task-1",
        strategy="fedmask",
        arch="cnn_small",
        num_classes=10,
        seed=(1 << 64) - 1,
        weights_digest=hashlib.sha256(b"weights").hexdigest(),
        mask_config={"granularity": "weight", "masked_layers": ["conv1", "fc"], "lambda": [0.0, 1e-4]},
        hyper={"lr": 0.1, "local_epochs": 2, "batch_size": 32, "finetune_epochs": 1, "finetune_lr": 0.01},
        schedule=m.Schedule(rounds=20, quorum=8, deadline_s=120.0, staleness_bound=3, max_payload=131072),
        created_at=1_700_000_000.5,
        arch_kwargs={"width": 16},
    )
    return m.Task(**{**fields, **changes})


def make_body() -> dict[str, Coded]:
    rng = np.random.default_rng(7)
    return {
        "mask": Coded(rng.random(5000) > 0.7, "bits"),
        "fc.bias": Coded(rng.standard_normal(10).astype(np.float32), "f32"),
        "delta": Coded(
            np.where(rng.random(300) > 0.9, rng.standard_normal(300), 0).astype(np.float32), "topk"
        ),
        "half": Coded(np.float16([0.5, -2.0, 1024.0]).astype(np.float32), "f16"),
        "counts": Coded(np.array([[1, -2], [3, 1 << 40]], np.int64), "i64"),
    }


def make_update(**changes) -> m.Update:
    fields = dict(
        fleet=FLEET,
        task_id="task-1",
        device="dev-1",
        round=5,
        base_round=3,
        num_samples=812,
        metrics={"loss": 0.25, "density": np.float32(0.5), "steps": 40},
        body=make_body(),
    )
    return m.Update(**{**fields, **changes})


def make_result(**changes) -> m.Result:
    fields = dict(
        fleet=FLEET,
        task_id="task-1",
        device="dev-2",
        metrics={
            "accuracy": 0.875,
            "latency_ms": 1.25,
            "size_bytes": 384,
            "peak_rss_bytes": 50_000_000,
            "num_test": 40,
            "density": 0.5,
        },
        mask=b"\x01\x02\x03",
        weights=safetensors_file({"fc.weight": np.ones((2, 3), np.float32)}),
        tflite=tiny_tflite(),
    )
    return m.Result(**{**fields, **changes})


# Factories, not instances: the Result needs a TFLite file, built only when its test runs.
EVERY_MESSAGE: dict[str, Callable[[], m.Message]] = {
    "task": make_task,
    "round-first": lambda: m.RoundAnnouncement(
        fleet=FLEET, task_id="task-1", round=1, deadline=1e9, body=None
    ),
    "round": lambda: m.RoundAnnouncement(
        fleet=FLEET, task_id="task-1", round=6, deadline=1e9, body=make_body()
    ),
    "update": make_update,
    "update-empty-body": lambda: m.Update(
        fleet=FLEET, task_id="task-1", device="dev-3", round=0, base_round=0, num_samples=0, body={}
    ),
    "result": make_result,
    "directive-finalize": lambda: m.Directive(fleet=FLEET, kind="finalize", task_id="task-1", round=20),
    "directive-receipt": lambda: m.Directive(
        fleet=FLEET, kind="receipt", task_id="task-1", round=5, detail="ok"
    ),
    "directive-rejected": lambda: m.Directive(
        fleet=FLEET, kind="rejected", task_id="task-1", round=5, detail="6 rounds late", reason="stale_round"
    ),
    "presence-online": lambda: m.Presence(
        fleet=FLEET, device="dev-1", status="online", at=1.5, capabilities={"arch": "aarch64", "ram_mb": 4096}
    ),
    "presence-offline": lambda: m.Presence(fleet=FLEET, device="dev-1", status="offline", at=0.0),
}


def test_every_message_type_is_covered() -> None:
    assert {name.split("-")[0] for name in EVERY_MESSAGE} == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("make", EVERY_MESSAGE.values(), ids=EVERY_MESSAGE.keys())
def test_every_message_round_trips_byte_exactly(make: Callable[[], m.Message]) -> None:
    message = make()
    payload = m.encode(message)
    decoded = m.decode(payload, type(message), fleet=FLEET)
    assert type(decoded) is type(message)
    assert decoded == message
    assert m.encode(decoded) == payload


def test_wire_map_carries_version_type_fleet_and_a_checksum_of_the_canonical_rest() -> None:
    payload = m.encode(make_update())
    wire = msgpack.unpackb(payload)
    assert (wire["v"], wire["type"], wire["fleet"]) == (m.PROTOCOL_VERSION, "update", FLEET)
    rest = {k: v for k, v in wire.items() if k != "sha256"}

    # Independent statement of the canonical form: keys sorted at every level, packed by msgpack.
    def sort(value):
        if isinstance(value, dict):
            return {k: sort(value[k]) for k in sorted(value)}
        return [sort(v) for v in value] if isinstance(value, list) else value

    assert wire["sha256"] == hashlib.sha256(msgpack.packb(sort(rest), use_bin_type=True)).digest()
    # and the payload is exactly those canonical bytes plus the checksum entry
    canonical = msgpack.packb(sort(rest), use_bin_type=True)
    assert payload[1:].startswith(canonical[1:])


def test_decoded_update_has_numpy_arrays_with_wire_dtypes() -> None:
    update = m.decode(m.encode(make_update()), m.Update)
    assert update.body["mask"].array.dtype == np.bool_
    assert update.body["delta"].array.dtype == np.float32
    assert update.body["counts"].array[1, 1] == 1 << 40
    assert update.metrics == {"loss": 0.25, "density": 0.5, "steps": 40.0}
    assert all(type(v) is float for v in update.metrics.values())


def test_result_round_trip_delivers_a_model_the_tflite_runtime_runs() -> None:
    result = m.decode(m.encode(make_result()), m.Result)
    interpreter = Interpreter(model_content=result.tflite)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.ones((1, 4), np.float32))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert np.array_equal(out, [[1, 2, 3, 4]])


def test_construction_validates_like_decoding() -> None:
    with pytest.raises(ProtocolError) as err:
        make_update(base_round=6)
    assert err.value.reason is Rejection.BAD_VALUE and "update.base_round" in err.value.detail


def test_expected_accepts_a_tuple_and_the_overload_returns_the_class() -> None:
    payload = m.encode(EVERY_MESSAGE["presence-offline"]())
    assert isinstance(m.decode(payload, (m.Update, m.Presence)), m.Presence)


def test_staleness_alpha_in_hyper_is_validated() -> None:
    hyper = {**make_task().hyper, "staleness_alpha": -1}
    with pytest.raises(ProtocolError) as err:
        make_task(hyper=hyper)
    assert err.value.reason is Rejection.BAD_VALUE and "staleness_alpha" in err.value.detail


# --- one test per rejection reason --------------------------------------------------------------------


def raw_of(message: m.Message) -> dict:
    """The wire map of ``message`` without its checksum, to tamper with and re-seal."""
    raw = msgpack.unpackb(m.encode(message))
    del raw["sha256"]
    return raw


def sealed(change: Callable[[dict], None], message: m.Message | None = None) -> bytes:
    raw = raw_of(message or make_update())
    change(raw)
    return m.seal(raw)


def expect(reason: Rejection, payload: bytes, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as err:
        m.decode(payload, *args, **kwargs)
    assert err.value.reason is reason, err.value
    return err.value


def test_rejects_malformed_msgpack() -> None:
    expect(Rejection.MALFORMED_MSGPACK, m.encode(make_update())[:-7])
    expect(Rejection.MALFORMED_MSGPACK, b"\xc1")  # a byte msgpack never uses
    expect(Rejection.MALFORMED_MSGPACK, m.encode(make_update()) + b"\x00")  # trailing data
    expect(Rejection.MALFORMED_MSGPACK, msgpack.packb({"v": msgpack.ExtType(1, b"x")}))


def test_rejects_a_payload_that_is_not_a_map() -> None:
    expect(Rejection.NOT_A_MAP, msgpack.packb([1, "update"]))


def test_rejects_an_unsupported_version() -> None:
    error = expect(Rejection.UNSUPPORTED_VERSION, sealed(lambda raw: raw.update(v=2)))
    assert "version 2" in error.detail


def test_rejects_an_unknown_type() -> None:
    expect(Rejection.UNKNOWN_TYPE, sealed(lambda raw: raw.update(type="gradient")))


def test_rejects_a_type_the_topic_does_not_carry() -> None:
    expect(Rejection.UNEXPECTED_TYPE, m.encode(make_task()), m.Update)


def test_rejects_a_missing_field() -> None:
    error = expect(Rejection.MISSING_FIELD, sealed(lambda raw: raw.pop("num_samples")))
    assert "num_samples" in error.detail
    expect(Rejection.MISSING_FIELD, msgpack.packb({"v": 1, "type": "update"}))  # no checksum
    schedule_without_quorum = sealed(lambda raw: raw["schedule"].pop("quorum"), make_task())
    assert "quorum" in expect(Rejection.MISSING_FIELD, schedule_without_quorum).detail


def test_rejects_a_wrong_field_type() -> None:
    error = expect(Rejection.WRONG_FIELD_TYPE, sealed(lambda raw: raw.update(round="5")))
    assert "update.round" in error.detail
    expect(Rejection.WRONG_FIELD_TYPE, sealed(lambda raw: raw.update(body=[1, 2])))
    expect(Rejection.WRONG_FIELD_TYPE, sealed(lambda raw: raw.update(round=True)))


def test_rejects_a_bad_checksum() -> None:
    payload = bytearray(m.encode(make_update()))
    at = payload.index(b"dev-1")
    payload[at + 4] = ord("2")  # a different device, same length: still valid msgpack
    expect(Rejection.BAD_CHECKSUM, bytes(payload))


def test_rejects_oversize_payloads_and_shapes() -> None:
    payload = m.encode(make_update())
    expect(Rejection.OVERSIZE, payload, max_size=len(payload) - 1)
    assert m.decode(payload, max_size=len(payload)) == make_update()
    error = expect(Rejection.OVERSIZE, payload, max_elements=1000)  # the mask alone has 5000 bits
    assert "mask" in error.detail


def test_rejects_a_wrong_mask_length() -> None:
    def shorten(raw: dict) -> None:
        raw["body"]["mask"].update(z=False, d=bytes(10))  # 5000 bits need 625 bytes

    expect(Rejection.WRONG_MASK_LENGTH, sealed(shorten))


def test_rejects_bad_arrays() -> None:
    def nan_weights(raw: dict) -> None:
        raw["body"]["fc.bias"]["d"] = np.full(10, np.nan, "<f4").tobytes()

    assert "NaN" in expect(Rejection.BAD_ARRAY, sealed(nan_weights)).detail
    expect(Rejection.UNKNOWN_CODING, sealed(lambda raw: raw["body"]["mask"].update(c="f64")))


def test_rejects_a_nan_metric() -> None:
    error = expect(Rejection.NAN_METRIC, sealed(lambda raw: raw["metrics"].update(loss=math.nan)))
    assert "update.metrics.loss" in error.detail
    expect(Rejection.NAN_METRIC, sealed(lambda raw: raw["metrics"].update(loss=math.inf)))


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_samples", -1), ("base_round", 6), ("round", -1)],
)
def test_rejects_bad_values(field: str, value: int) -> None:
    error = expect(Rejection.BAD_VALUE, sealed(lambda raw: raw.update({field: value})))
    assert f"update.{field}" in error.detail


def test_rejects_bad_values_in_other_messages() -> None:
    expect(Rejection.BAD_VALUE, sealed(lambda raw: raw.update(tflite=b"not a model"), make_result()))
    expect(Rejection.BAD_VALUE, sealed(lambda raw: raw.update(weights=b"\xff" * 16), make_result()))
    expect(Rejection.BAD_VALUE, sealed(lambda raw: raw["metrics"].update(accuracy=1.5), make_result()))
    # What the registry stores of a result: its test-set size (whole) and the mask's density (a share).
    for bad in ({"density": 1.5}, {"density": -0.1}, {"num_test": 2.5}, {"num_test": -1}):
        error = expect(
            Rejection.BAD_VALUE, sealed(lambda raw, bad=bad: raw["metrics"].update(bad), make_result())
        )
        assert f"metrics.{next(iter(bad))}" in error.detail
    for name in ("num_test", "density"):
        error = expect(
            Rejection.MISSING_FIELD, sealed(lambda raw, name=name: raw["metrics"].pop(name), make_result())
        )
        assert name in error.detail
    expect(Rejection.BAD_VALUE, sealed(lambda raw: raw["hyper"].update(lr=0), make_task()))
    expect(Rejection.BAD_VALUE, sealed(lambda raw: raw["schedule"].update(max_payload=100), make_task()))
    directive = m.Directive(fleet=FLEET, kind="receipt", task_id="task-1", round=1)
    expect(Rejection.BAD_VALUE, sealed(lambda raw: raw.update(kind="explode"), directive))
    expect(Rejection.BAD_VALUE, sealed(lambda raw: raw.update(reason="stale_round"), directive))
    expect(Rejection.MISSING_FIELD, sealed(lambda raw: raw.update(kind="rejected"), directive))


@pytest.mark.parametrize("device", ["dev/1", "dev+", "#", "$SYS", "", "a" * 65, "dev 1", "dév"])
def test_rejects_bad_ids(device: str) -> None:
    expect(Rejection.BAD_ID, sealed(lambda raw: raw.update(device=device)))


def test_rejects_a_message_for_another_fleet() -> None:
    error = expect(Rejection.WRONG_FLEET, m.encode(make_update()), fleet="fleet-b")
    assert "fleet-a" in error.detail


def test_a_chunk_frame_is_not_mistaken_for_a_message() -> None:
    frame = msgpack.packb({"v": 1, "type": "chunk", "id": "x", "index": 0, "count": 2, "data": b"x"})
    assert "Reassembler" in expect(Rejection.UNEXPECTED_TYPE, frame).detail


def test_rejection_enum_lists_the_aggregator_reasons_too() -> None:
    reserved = {"unknown_device", "device_mismatch", "wrong_task", "stale_round", "future_round"}
    reserved |= {"replayed_update", "round_closed", "wrong_body"}
    assert reserved <= {r.value for r in Rejection}
    assert str(Rejection.STALE_ROUND) == "stale_round"


def test_the_fast_canonical_form_is_the_reference_one() -> None:
    """``checksum`` reuses maps already in key order; it must pack exactly what ``_canonical`` packs,
    and refuse exactly what it refuses, with the same detail."""
    from fedmask.protocol.messages import _canonical, _canonical_fast, _pack

    def nested(depth: int, leaf: object) -> object:
        value = leaf
        for i in range(depth):
            value = {"k": value} if i % 2 else [value]
        return value

    cases = [
        {"b": 1, "a": {"d": [3, {"z": 1, "y": (2, {"q": b"x", "p": 1.5})}], "c": None}},
        {"a": 1, "b": {"c": [1, 2], "d": {"e": "f"}}},  # already sorted: reused, same bytes
        {"a": (1, [2, (3,)]), "b": []},
        *({"x": nested(depth, leaf)} for depth in (14, 15, 16) for leaf in (1, [], {})),
        {"a": {1: "non-string key"}},
    ]
    for case in cases:
        try:
            expected = _pack(_canonical(dict(case)))
        except ProtocolError as exc:
            with pytest.raises(ProtocolError) as raised:
                _canonical_fast(dict(case))
            assert (raised.value.reason, raised.value.detail) == (exc.reason, exc.detail)
        else:
            assert _pack(_canonical_fast(dict(case))) == expected
