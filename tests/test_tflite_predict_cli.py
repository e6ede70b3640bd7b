"""``fedmask predict`` end to end: real files in, the real interpreter, table/JSON/files out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmask.cli import main
from fedmask.datasets.federated import DeviceData, save_device
from fedmask.datasets.labels import FASHION_MNIST
from fedmask.device_agent import local_model
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
    assert out[0].split() == ["index", "class", "confidence", "label", "ok"]
    assert [int(line.split()[1]) for line in out[1:6]] == expected[:5].tolist()
    assert all(0.1 <= float(line.split()[2]) <= 1.0 for line in out[1:6])  # of 10 classes, the top one
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
    assert main(["predict", "--input", str(tmp_path / "shape.npy"), "--state-dir", str(tmp_path)]) == 2
    assert f"no --model given and no model kept in {tmp_path}" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_path), "--input", str(tmp_path / "nothing.npy")]) == 2
    assert "nothing.npy does not exist" in capsys.readouterr().err


def test_the_devices_own_model_from_the_state_dir_with_names_and_no_banner(femnist, capfd, tmp_path) -> None:
    """What the agent keeps at finalization (device_agent.local_model) is what predict runs by default;
    the runtime's XNNPACK banner (native code, file descriptor 2) is not printed."""
    folder, model_path, x, labels, expected = femnist
    state = tmp_path / "state"
    names = list(FASHION_MNIST)
    for task, saved_at in (("old-task", 1.0), ("new-task", 2.0)):
        kept = local_model.save(state, "dev-7", task, model_path.read_bytes(), {"label_names": names})
        info = json.loads(kept.path.with_suffix(".json").read_text())
        kept.path.with_suffix(".json").write_text(json.dumps({**info, "saved_at": saved_at}))
    np.savez(folder / "named.npz", x=x, y=labels)
    capfd.readouterr()
    assert (
        main(["predict", "--state-dir", str(state), "--input", str(folder / "named.npz"), "--limit", "3"])
        == 0
    )
    out, err = capfd.readouterr()
    assert "XNNPACK" not in err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["index", "class", "name"]
    for i, line in enumerate(lines[1:4]):
        assert line.split()[1] == str(expected[i])
        assert names[expected[i]].split()[0] in line  # "Ankle boot" prints as two words
    argv = ["predict", "--state-dir", str(state), "--input", str(folder / "named.npz"), "--json"]
    assert main([*argv, "--task", "old-task"]) == 0
    result = json.loads(capfd.readouterr().out)
    assert result["class_names"] == [names[c] for c in expected]
    assert all(0.0 < c <= 1.0 for c in result["confidence"])
    # Nothing kept there: one line saying where it looked.
    assert (
        main(["predict", "--state-dir", str(tmp_path / "empty"), "--input", str(folder / "named.npz")]) == 2
    )
    assert "no --model given" in capfd.readouterr().err
