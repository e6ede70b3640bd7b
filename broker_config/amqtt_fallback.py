"""In-process amqtt broker, used by `EmbeddedBroker` only when mosquitto is not installed.

amqtt speaks MQTT 3.1.1 only, keeps sessions in memory (nothing survives `stop()`), and is run
anonymous on loopback: it is a stand-in that lets `fedmask simulate` work on a laptop without
mosquitto, not a deployment broker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fedmask.broker_config.binaries import BrokerUnavailableError

logger = logging.getLogger(__name__)


class AmqttBrokerThread:
    """An amqtt broker running its own event loop in a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def running(self) -> bool:
        return self._broker is not None

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only anonymous auth: no $SYS publisher or packet logger, which would add load and noise.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise BrokerUnavailableError(
                "neither mosquitto nor the amqtt fallback is installed; install mosquitto, "
                "or `pip install fedmask[broker]` for the pure-Python fallback"
            ) from exc
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"amqtt-broker-{self.port}", daemon=True)
        thread.start()

        async def _start() -> Any:
            broker = Broker(self._config())  # must be built inside the running loop
            await broker.start()
            return broker

        try:
            self._broker = asyncio.run_coroutine_threadsafe(_start(), loop).result(timeout)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            loop.close()
            raise
        self._loop, self._thread = loop, thread
        logger.info("amqtt fallback broker listening on %s:%d (MQTT 3.1.1 only)", self.host, self.port)

    def stop(self, timeout: float = 10.0) -> None:
        if self._broker is None or self._loop is None or self._thread is None:
            return
        loop, thread, broker = self._loop, self._thread, self._broker
        self._broker = self._loop = self._thread = None

        async def _shutdown() -> None:
            # Stop listening first: amqtt closes its listeners only after ending every session, and a
            # session that did not end (seen once under load) kept the port open past our timeout.
            for server in getattr(broker, "_servers", {}).values():
                if server.instance is not None:
                    server.instance.close()
            await broker.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(_shutdown(), loop).result(timeout)
        except Exception:  # a failing shutdown must not keep the loop thread alive
            logger.exception("amqtt broker shutdown failed")
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            loop.close()

    def kill(self) -> None:
        """No crash to simulate in-process: the same as `stop()`."""
        self.stop()
