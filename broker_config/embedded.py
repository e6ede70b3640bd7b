"""A private MQTT broker for tests and `fedmask simulate`: mosquitto on a free loopback port, in a
directory of its own, configured from the project's test template (optionally with a password
file and the project ACL), or an in-process amqtt broker when mosquitto is not installed.

    with EmbeddedBroker() as broker:            # anonymous
        client.connect(broker.host, broker.port)

    broker = EmbeddedBroker(auth=True, users={"aggregator": None, "dev-1": "s3cret"}).start()
    broker.url_for("dev-1")                     # mqtt://dev-1:s3cret@127.0.0.1:<port>
    broker.restart()                            # same port, same persistence: sessions survive
    broker.close()
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import quote

from fedmask.broker_config.amqtt_fallback import AmqttBrokerThread
from fedmask.broker_config.binaries import BrokerUnavailableError, find_mosquitto
from fedmask.broker_config.configs import ACL_FILE, render_test_config
from fedmask.broker_config.credentials import Credentials, generate_password, validate_username
from fedmask.broker_config.passwords import hash_password, write_password_file

logger = logging.getLogger(__name__)

# Protocol levels as paho-mqtt numbers them (paho.mqtt.client.MQTTv311 / MQTTv5).
MQTT_V311 = 4
MQTT_V5 = 5
LOOPBACK = "127.0.0.1"
Backend = Literal["auto", "mosquitto", "amqtt"]


class BrokerStartError(RuntimeError):
    """The broker process did not come up; the message carries the end of its log."""


def free_loopback_port() -> int:
    """A TCP port nothing listens on right now (the caller may still lose a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until_listening(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    """Poll until a TCP connect succeeds; False when `alive()` turns false or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.25):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class _Runner(Protocol):
    port: int

    @property
    def running(self) -> bool: ...
    def start(self, timeout: float) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def kill(self) -> None: ...


class MosquittoProcess:
    """One mosquitto process at a time for a given config file, expected to listen on host:port;
    its output is appended to `log_path`. EmbeddedBroker uses it; tests use it directly to run the
    packaged dev and production configs."""

    def __init__(self, binary: Path, config_path: Path, log_path: Path, host: str, port: int) -> None:
        self.binary, self.config_path, self.log_path = binary, config_path, log_path
        self.host, self.port = host, port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Own process group: a Ctrl-C meant for the parent's run does not kill the broker
                # half-way through a test of broker restarts; the owner stops it explicitly.
                start_new_session=True,
            )
        if not wait_until_listening(self.host, self.port, timeout, lambda: self.running):
            code = self.process.poll()
            self.kill()
            state = f"exited with code {code}" if code is not None else f"not listening after {timeout:.0f}s"
            raise BrokerStartError(
                f"mosquitto ({self.config_path}) {state} on {self.host}:{self.port}; log {self.log_path}:\n"
                + log_tail(self.log_path)
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: mosquitto saves its persistence database, then exits."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "mosquitto pid %d ignored SIGTERM for %.0fs; killing it", self.process.pid, timeout
                )
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash; nothing since the last autosave is written."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _release(runner: _Runner, owned_dir: Path | None) -> None:
    """Finalizer: never leave a broker process or a temp dir behind, even without close()."""
    try:
        runner.kill()
    finally:
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)


class EmbeddedBroker:
    """A private broker on a loopback port. Not started by the constructor: call `start()` or
    use it as a context manager (which also removes its temporary directory on exit)."""

    host = LOOPBACK

    def __init__(
        self,
        *,
        auth: bool = False,
        users: Mapping[str, str | None] | None = None,
        acl_file: str | os.PathLike[str] = ACL_FILE,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        backend: Backend = "auto",
        start_timeout: float = 10.0,
    ) -> None:
        """`users` maps username -> password (None: generate one) and requires `auth=True`.
        `workdir` holds config, password file, log and persistence; by default a fresh temporary
        directory that `close()` removes. `backend="auto"` uses mosquitto when installed and the
        amqtt fallback otherwise (MQTT 3.1.1 only, anonymous only, no persistence)."""
        if users and not auth:
            raise ValueError("users given but auth=False: the broker would accept anyone")
        binary = find_mosquitto() if backend != "amqtt" else None
        if backend == "mosquitto" and binary is None:
            raise BrokerUnavailableError("backend='mosquitto' but mosquitto is not installed")
        if binary is None and auth:
            raise BrokerUnavailableError(
                "auth=True needs mosquitto (password file and ACL); the amqtt fallback is anonymous only"
            )
        self.backend: Literal["mosquitto", "amqtt"] = "mosquitto" if binary else "amqtt"
        self.auth = auth
        self.start_timeout = start_timeout
        self._port_chosen = port is not None
        self.port = port if port is not None else free_loopback_port()
        self._users = {
            validate_username(name, what="broker username"): pw or generate_password()
            for name, pw in (users or {}).items()
        }

        if workdir is None:
            self._owned_dir: Path | None = Path(tempfile.mkdtemp(prefix="fedmask-broker-"))
            self.workdir = self._owned_dir
        else:
            self._owned_dir = None
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.password_file = self.workdir / "passwd" if auth else None
        self.persistence_dir = self.workdir / "data"
        self.acl_file = Path(acl_file)

        if binary is not None:
            self.persistence_dir.mkdir(exist_ok=True)
            if self.password_file is not None:
                write_password_file(self.password_file, {u: hash_password(p) for u, p in self._users.items()})
            self._write_config()
            self._runner: _Runner = MosquittoProcess(
                binary, self.config_path, self.log_path, self.host, self.port
            )
        else:
            if backend == "auto":
                logger.warning("mosquitto not found; using the in-process amqtt broker (MQTT 3.1.1 only)")
            self._runner = AmqttBrokerThread(self.host, self.port)
        self._finalizer = weakref.finalize(self, _release, self._runner, self._owned_dir)

    # --- what callers connect to ---------------------------------------------------------------
    @property
    def protocol_versions(self) -> tuple[int, ...]:
        """MQTT protocol levels this broker accepts, in paho numbering (4 = 3.1.1, 5 = MQTT 5)."""
        return (MQTT_V311, MQTT_V5) if self.backend == "mosquitto" else (MQTT_V311,)

    @property
    def persistent(self) -> bool:
        """Whether persistent sessions and their queued messages survive `restart()`."""
        return self.backend == "mosquitto"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(self._users)

    def credentials(self, username: str) -> Credentials:
        try:
            return Credentials(username, self._users[username])
        except KeyError:
            raise KeyError(
                f"no broker account {username!r}; known: {', '.join(self._users) or 'none'}"
            ) from None

    def url_for(self, username: str) -> str:
        """`mqtt://user:password@host:port` for one of `users`."""
        creds = self.credentials(username)
        userinfo = f"{quote(creds.username, safe='')}:{quote(creds.password, safe='')}"
        return f"mqtt://{userinfo}@{self.host}:{self.port}"

    # --- lifecycle -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._runner.running

    @property
    def pid(self) -> int:
        """The broker's process id (benchmarks read its CPU time from ``/proc``)."""
        process = getattr(self._runner, "process", None)
        if process is None or process.poll() is not None:
            raise RuntimeError(f"no running {self.backend} process")
        return process.pid

    def start(self) -> EmbeddedBroker:
        if self._runner.running:
            raise RuntimeError(f"broker on port {self.port} is already running")
        attempts = 1 if self._port_chosen else 3
        for attempt in range(1, attempts + 1):
            try:
                self._runner.start(self.start_timeout)
                break
            except Exception as exc:
                # A free port picked by us can be taken by someone else before the broker binds it.
                if attempt == attempts or "in use" not in str(exc).lower():
                    raise
                logger.info("port %d was taken before the broker bound it; trying another", self.port)
                self._move_to_port(free_loopback_port())
        self._port_chosen = True  # restarts must come back on the same port
        logger.debug("%s broker running at %s", self.backend, self.url)
        return self

    def stop(self) -> None:
        """Stop cleanly (mosquitto writes its persistence database). `start()` brings it back."""
        self._runner.stop()

    def kill(self) -> None:
        """Stop abruptly, as a crash would (mosquitto loses what arrived since its last autosave)."""
        self._runner.kill()

    def reload(self) -> None:
        """Make mosquitto reread its password file and ACL (SIGHUP), e.g. after `add_device`
        wrote to `password_file`. Returns once the signal is sent; the reload follows shortly."""
        if not isinstance(self._runner, MosquittoProcess) or self._runner.process is None:
            raise RuntimeError("reload needs a running mosquitto broker")
        self._runner.process.send_signal(signal.SIGHUP)

    def restart(self) -> EmbeddedBroker:
        """Stop (if running) and start again on the same port with the same persistence."""
        self._runner.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the temporary directory (if the broker created it)."""
        self._runner.stop()
        self._finalizer()

    def __enter__(self) -> EmbeddedBroker:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.backend}, {self.url}, auth={self.auth}, {state})"

    # --- internals -----------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.config_path.write_text(
            render_test_config(
                port=self.port,
                persistence_dir=self.persistence_dir,
                password_file=self.password_file,
                acl_file=self.acl_file,
                anonymous=not self.auth,
            )
        )

    def _move_to_port(self, port: int) -> None:
        self.port = port
        if isinstance(self._runner, MosquittoProcess):
            self._write_config()
        self._runner.port = port
