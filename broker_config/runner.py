"""`fedmask broker run`: turn a config choice into one mosquitto command line, and run it in the
foreground until it exits."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedmask.broker_config.binaries import find_mosquitto, require_mosquitto
from fedmask.broker_config.configs import (
    ACL_FILE,
    ConfigFileError,
    listener_ports,
    named_config,
    option_values,
    relocate,
    remap_listeners,
    render_test_config,
    set_options,
)

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1883


@dataclass(frozen=True)
class MosquittoLaunch:
    """What `run_foreground` starts: `config_text` at `config_path` (written first when
    `generated`), after creating `directories`."""

    binary: Path | None
    config_path: Path
    config_text: str
    generated: bool
    directories: tuple[Path, ...] = field(default=())

    @property
    def command(self) -> list[str]:
        return [str(self.binary or "mosquitto"), "-c", str(self.config_path)]


@dataclass(frozen=True)
class Overrides:
    """What a one-machine trial of a packaged config changes (`fedmask broker run` flags); the rest of
    the file runs as shipped. Unset fields leave the config alone."""

    ports: dict[int, int] = field(default_factory=dict)  # listener port -> port to listen on instead
    bind: str | None = None  # address every listener binds to (e.g. 127.0.0.1)
    config_dir: Path | None = None  # stands for /etc/mosquitto in every file path of the config
    data_dir: Path | None = None  # persistence and pid file
    log_dest: str | None = None  # "stderr", or a file
    user: str | None = None  # who mosquitto runs as when started by root

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in ("ports", "bind", "config_dir", "data_dir", "log_dest", "user"))


def prepare_launch(
    config: str,
    *,
    port: int | None = None,
    passwd: str | None = None,
    data_dir: str | None = None,
    overrides: Overrides | None = None,
) -> MosquittoLaunch:
    """`config` is dev, test, production or a file. `port` moves the first listener; `overrides`
    move any listener, their address and the config's paths. `data_dir` receives generated configs
    (default runs/mosquitto) and, for `test`, the persistence database."""
    if port is not None and not 0 < port < 65536:
        raise ConfigFileError(f"--port must be 1..65535, got {port}")
    overrides = overrides or Overrides()
    for new in overrides.ports.values():
        if not 0 < new < 65536:
            raise ConfigFileError(f"--port-map: ports must be 1..65535, got {new}")
    data = Path(data_dir or "runs/mosquitto").absolute()
    binary = find_mosquitto()
    if config == "test":
        if not passwd:
            raise ConfigFileError(
                "--config test needs --passwd FILE (create it with `fedmask broker add-device`)"
            )
        if not Path(passwd).is_file():
            raise ConfigFileError(f"--passwd {passwd}: no such password file")
        text = render_test_config(
            port=port or DEFAULT_PORT,
            persistence_dir=data,
            password_file=Path(passwd).absolute(),
            acl_file=ACL_FILE,
        )
        return MosquittoLaunch(
            binary, data / "mosquitto-test.conf", text, generated=True, directories=(data,)
        )

    source = named_config(config)
    text = source.read_text()
    directories = tuple(
        Path(value) for value in option_values(text, "persistence_location") if not Path(value).is_absolute()
    )
    if port is None and not overrides:
        return MosquittoLaunch(binary, source, text, generated=False, directories=directories)
    ports = listener_ports(text)
    moves = dict(overrides.ports)
    if port is not None:
        if not ports:
            raise ConfigFileError(f"{source}: no `listener` line whose port --port could replace")
        moves.setdefault(ports[0], port)
    if overrides.bind:  # every listener, moved or not, binds to the address
        moves = {p: p for p in ports} | moves
    if moves:
        text = remap_listeners(text, moves, host=overrides.bind)
    text = _apply_paths(text, overrides, data if data_dir else None)
    directories = tuple(
        Path(value) for value in option_values(text, "persistence_location") if not Path(value).is_absolute()
    )
    if data_dir:
        directories = (*directories, data)
    name = (
        f"{source.stem}-port{port}.conf"
        if port is not None and not overrides
        else f"{source.stem}-local.conf"
    )
    return MosquittoLaunch(binary, data / name, text, generated=True, directories=(*directories, data))


def _apply_paths(text: str, overrides: Overrides, data: Path | None) -> str:
    """The config's system paths moved under ``--config-dir`` and ``--data-dir``."""
    if overrides.config_dir is not None:
        text = relocate(text, "/etc/mosquitto", overrides.config_dir.absolute())
    changes: dict[str, str | None] = {}
    if data is not None:
        changes["persistence_location"] = f"{data}/"
        if option_values(text, "pid_file"):
            changes["pid_file"] = str(data / "mosquitto.pid")
    if overrides.log_dest is not None:
        dest = overrides.log_dest
        changes["log_dest"] = (
            dest if dest in ("stderr", "stdout", "syslog") else f"file {Path(dest).absolute()}"
        )
    if overrides.user is not None:
        changes["user"] = overrides.user
    return set_options(text, changes) if changes else text


def run_foreground(launch: MosquittoLaunch) -> int:
    """Run mosquitto until it exits (Ctrl-C reaches it too: it saves persistence and stops)."""
    binary = launch.binary or require_mosquitto()
    for directory in launch.directories:
        directory.mkdir(parents=True, exist_ok=True)
    if launch.generated:
        launch.config_path.parent.mkdir(parents=True, exist_ok=True)
        launch.config_path.write_text(launch.config_text)
    if os.geteuid() == 0 and not option_values(launch.config_text, "user"):
        logger.warning(
            "running as root: mosquitto switches to user `mosquitto`, which must be able to read the "
            "config's files and write its persistence directory"
        )
    command = [str(binary), "-c", str(launch.config_path)]
    logger.info("starting %s", " ".join(command))
    process = subprocess.Popen(command)
    with _forward_signals(process, FORWARDED_SIGNALS):
        try:
            return process.wait()
        except KeyboardInterrupt:
            # Mosquitto got the SIGINT too (forwarded, or from the terminal's process group);
            # give it time to write its database.
            try:
                return process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                return process.wait()


# SIGTERM (service managers) and SIGHUP (reload the password file and ACL) sent to `fedmask` must
# reach mosquitto; SIGINT is forwarded too, for a `kill -INT` aimed at this process alone.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def _forward_signals(process: subprocess.Popen[bytes], signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread
        return

    def forward(signum: int, _frame: object) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
