"""The Dockerfile, read the way `docker build` reads it (no Docker daemon here): its stages and targets,
that every file it COPYs exists in the build context and is not excluded by .dockerignore, that the
context leaves out the virtualenv and run outputs, and that the inference image's entrypoint really runs
without PyTorch. Plus the systemd units in deploy/, checked by `systemd-analyze verify`."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match and match.group(2), f"every stage is named: FROM {rest}"
            current = found.setdefault(match.group(2), [])
        if current is not None:
            current.append((keyword, rest))
    return found


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore (Go filepath.Match plus `**`, last match wins) excludes `path`."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, p) or fnmatch.fnmatch(p, pattern) for p in prefixes):
            result = not negate
    return result


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_stages_targets_entrypoints_and_healthchecks(dockerfile: str) -> None:
    found = stages(dockerfile)
    assert list(found) == ["base", "build", "torch", "aggregator", "agent", "inference"]
    parents = {name: body[0][1].split()[0] for name, body in found.items()}
    assert (parents["aggregator"], parents["agent"], parents["inference"]) == ("torch", "torch", "base")
    for target, entrypoint in (
        ("aggregator", '["fedmask", "aggregator", "run"]'),
        ("agent", '["fedmask", "agent", "run", "--serve"]'),
        ("inference", '["fedmask", "predict"]'),
    ):
        body = dict(found[target])
        assert body["ENTRYPOINT"] == entrypoint
        assert body["USER"] == "fedmask"
        assert body["HEALTHCHECK"].split()[-1] != "NONE" and "CMD" in body["HEALTHCHECK"]
    # Torch: pinned to the local build, from an index the builder names (no host written here).
    torch_stage = found["torch"]
    assert ("ARG", 'TORCH_INDEX_URL=""') in torch_stage
    (install,) = [rest for keyword, rest in torch_stage if keyword == "RUN"]
    assert "torch==2.13.0" in install and '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in install
    assert not re.search(r"https?://", dockerfile)
    # The inference image never installs the training extra (torch comes only from the torch stage).
    inference_runs = " ".join(rest for keyword, rest in found["inference"] if keyword == "RUN")
    assert "[runtime]" in inference_runs and "train" not in inference_runs and "torch" not in inference_runs


def test_every_copied_file_exists_and_is_in_the_build_context(dockerfile: str, ignore_patterns) -> None:
    copies = [
        rest for keyword, rest in instructions(dockerfile) if keyword == "COPY" and "--from" not in rest
    ]
    sources = [src for rest in copies for src in rest.split()[:-1]]
    assert "pyproject.toml" in sources and "device_agent/" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
        assert not ignored(source.rstrip("/"), ignore_patterns), f"COPY {source}: excluded by .dockerignore"
    # Every package the wheel ships is copied.
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in re.findall(r'"fedmask\.(\w+)"', pyproject.split("[tool.setuptools.package-data]")[0]):
        assert f"{package}/" in sources, f"package {package} is not copied into the build stage"


def test_dockerignore_keeps_the_context_small(ignore_patterns) -> None:
    for path in (".venv", ".venv/lib/python3.11/site-packages/torch", "runs", "runs/bench.json", ".git",
                 "device_agent/__pycache__/agent.cpython-311.pyc", "fedmask.db", "parts/f2.npz"):  # fmt: skip
        assert ignored(path, ignore_patterns), path
    for path in ("pyproject.toml", "README.md", "device_agent/agent.py", "broker_config/production.conf"):
        assert not ignored(path, ignore_patterns), path


def test_the_inference_entrypoint_runs_without_torch(tmp_path: Path) -> None:
    """What the inference image has: `fedmask predict` with numpy and the TFLite runtime, no torch."""
    from test_protocol_messages import tiny_tflite

    model = tmp_path / "add.tflite"
    model.write_bytes(tiny_tflite())
    np.save(tmp_path / "x.npy", np.ones((3, 4), np.float32))
    argv = ["predict", "--model", str(model), "--input", str(tmp_path / "x.npy")]
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from fedmask.cli import main\n"
        f"raise SystemExit(main({argv!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 samples" in done.stdout and "XNNPACK" not in done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["fedmask-agent.service", "fedmask-aggregator.service"])
def test_systemd_units_verify(unit: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(ROOT / "deploy" / unit)], capture_output=True, text=True, timeout=60
    )
    # The one thing this machine lacks is the installed venv the unit runs.
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "/opt/fedmask/venv/bin/fedmask" not in line
    ]
    assert not problems, problems
    text = (ROOT / "deploy" / unit).read_text()
    assert "Restart=on-failure" in text and "KillSignal=SIGTERM" in text
    if unit == "fedmask-agent.service":
        assert "agent run --serve" in text


def test_the_units_config_files_load_through_the_real_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmask.cli import build_parser
    from fedmask.config import resolve

    for key in [k for k in os.environ if k.startswith("FEDMASK_")]:
        monkeypatch.delenv(key)

    def parse(*argv: str):
        args = build_parser().parse_args(list(argv))
        return resolve(args, command=args.command)

    agent = parse("agent", "run", "--config", str(ROOT / "deploy" / "agent.yaml"))
    assert (agent.serve, agent.device_id, agent.state_dir) == (True, "f2", "/var/lib/fedmask")
    assert agent.broker.endswith(":8883") and agent.credentials_file == "/etc/fedmask/credentials"
    once = parse("agent", "run", "--config", str(ROOT / "deploy" / "agent.yaml"), "--once")
    assert once.serve is False  # the flag beats the file
    aggregator = parse("aggregator", "run", "--config", str(ROOT / "deploy" / "aggregator.yaml"))
    assert aggregator.broker.endswith(":8884") and aggregator.task == "/etc/fedmask/task.yaml"
