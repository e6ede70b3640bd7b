"""``fedmask predict`` end to end: real files in, the real interpreter, table/JSON/files out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmask.cli import main
from fedmask.datasets.federated import DeviceData, save_device
from fedmask.models.tflite_export import export_tflite
from fedmask.models.zoo import build_model


@pytest.fixture(scope="module")
def femnist(tmp_path_factory, real_inputs):
    """A femnist_cnn exported to .tflite, 60 real images, and what PyTorch predicts for them."""
    folder = tmp_path_factory.mktemp("predict")
    plain = build_model("femnist_cnn", 3, 10, width=0.25).to_plain()
    model_path = folder / "femnist.tflite"
    x = real_inputs("femnist_cnn", 60)
    export_tflite(plain, torch.from_numpy(x[:1]), model_path)
    with torch.no_grad():
        expected = plain(torch.from_numpy(x)).argmax(1).numpy()
    labels = np.random.default_rng(0).integers(0, 10, len(x))
    labels[:30] = expected[:30]  # at least half right, so accuracy is not a coincidence
    return folder, model_path, x, labels, expected


def _accuracy(expected: np.ndarray, labels: np.ndarray) -> float:
    return float((expected == labels).mean())


def test_npz_with_labels_prints_table_and_accuracy(femnist, capsys) -> None:
    folder, model_path, x, labels, expected = femnist
    np.savez(folder / "xy.npz", x=x, y=labels)
    assert (
        main(["predict", "--model", str(model_path), "--input", str(folder / "xy.npz"), "--limit", "5"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["index", "class", "label", "ok"]
    assert [int(line.split()[1]) for line in out[1:6]] == expected[:5].tolist()
    assert out[6] == "... 55 more (use --limit 0 to show all)"
    correct = int((expected == labels).sum())
    assert out[-1] == f"60 samples, accuracy {_accuracy(expected, labels):.4f} ({correct}/60)"


def test_device_data_file_uses_its_test_split_and_json(femnist, capsys, tmp_path) -> None:
    _, model_path, x, labels, expected = femnist
    device = DeviceData("dev-1", x_train=x[:10], y_train=labels[:10], x_test=x, y_test=labels, num_classes=10)
    path = save_device(device, tmp_path / "dev-1.npz")
    assert main(["predict", "--model", str(model_path), "--input", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 60
    assert result["classes"] == expected.tolist()
    assert result["accuracy"] == pytest.approx(_accuracy(expected, labels))


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv", ".json"])
def test_output_files(femnist, tmp_path, suffix: str) -> None:
    _, model_path, x, _, expected = femnist
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / f"pred{suffix}"
    argv = ["predict", "--model", str(model_path), "--input", str(tmp_path / "x.npy"), "--output", str(out)]
    assert main(argv) == 0
    if suffix == ".npy":
        assert np.load(out).tolist() == expected.tolist()
    elif suffix == ".npz":
        with np.load(out) as saved:
            assert saved["classes"].tolist() == expected.tolist()
            assert saved["outputs"].shape == (60, 10)
            assert "labels" not in saved.files  # the .npy input had none
    elif suffix == ".csv":
        rows = out.read_text().splitlines()
        assert rows[0] == "index,class"
        assert [int(r.split(",")[1]) for r in rows[1:]] == expected.tolist()
    else:
        assert json.loads(out.read_text())["classes"] == expected.tolist()


def test_model_from_the_environment(femnist, capsys, monkeypatch) -> None:
    folder, model_path, x, _, expected = femnist
    np.save(folder / "x.npy", x[:3])
    monkeypatch.setenv("FEDMASK_MODEL", str(model_path))
    assert main(["predict", "--input", str(folder / "x.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == expected[:3].tolist()


def test_bad_inputs_fail_with_the_file_named(femnist, capsys, tmp_path, monkeypatch) -> None:
    _, model_path, x, _, _ = femnist
    monkeypatch.delenv("FEDMASK_MODEL", raising=False)
    cases = {}
    np.savez(tmp_path / "keys.npz", images=x)
    cases["keys.npz"] = "expected key 'x'"
    np.save(tmp_path / "shape.npy", x[:, 0])
    cases["shape.npy"] = r"expected samples of shape (1, 28, 28)"
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["objects.npy"] = "without pickle"
    np.savez(tmp_path / "labels.npz", x=x, y=np.zeros(3))
    cases["labels.npz"] = "'y' must be 60 integer labels"
    for name, message in cases.items():
        assert main(["predict", "--model", str(model_path), "--input", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert name in err and message in err, err
    assert main(["predict", "--input", str(tmp_path / "shape.npy")]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_path), "--input", str(tmp_path / "nothing.npy")]) == 2
    assert "nothing.npy does not exist" in capsys.readouterr().err
