"""`fedmask dashboard`: a live, read-only web view of the store for an operator.

A Starlette app served by uvicorn. The page is one static HTML document whose script polls the JSON API
under ``/api/`` every few seconds; plots are PNGs drawn by ``report.plots`` on request. Every request
reads through a read-only engine (``storage.reporting.read_only_engine``): the dashboard cannot change
the store, and it never blocks the aggregator's writes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from fedmask.report import plots
from fedmask.report.model import from_history
from fedmask.storage.engine import read_transaction
from fedmask.storage.errors import StorageError

logger = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 5.0
HISTORY_TTL_S = 2.0  # how long a task's history read serves further requests (never over refresh / 2)


def _json(value: Any, status: int = 200) -> Response:
    from fedmask.storage.render import to_json  # dataclasses and UTC datetimes, as `--json` prints them

    headers = {"Cache-Control": "no-store"}
    return Response(to_json(value), status_code=status, media_type="application/json", headers=headers)


def create_app(engine: Engine, *, refresh_s: float = DEFAULT_REFRESH_S) -> Starlette:
    """The dashboard over ``engine`` (which should be read-only: ``read_only_engine``)."""
    from fedmask.storage import queries, reporting

    def read(action: Any) -> Any:
        with read_transaction(engine) as connection:
            return action(connection)

    # A page refresh asks for a task and then for its plots: they share one read of its history.
    histories: dict[str, tuple[float, Any]] = {}
    histories_lock = threading.Lock()

    def history_of(task_id: str) -> Any:
        with histories_lock:
            read_at, history = histories.get(task_id, (0.0, None))
            if time.monotonic() - read_at > min(refresh_s / 2, HISTORY_TTL_S):
                history = read(lambda c: reporting.task_history(c, task_id))
                histories[task_id] = (time.monotonic(), history)
            return history

    page_html = _page().replace("__REFRESH_MS__", str(int(refresh_s * 1000)))

    async def page(_request: Request) -> HTMLResponse:
        return HTMLResponse(page_html)

    def health(_request: Request) -> Response:
        read(lambda c: reporting.list_tasks(c))
        return _json({"ok": True})

    def tasks(_request: Request) -> Response:
        return _json(read(reporting.list_tasks))

    def devices(request: Request) -> Response:
        return _json(read(lambda c: queries.list_devices(c, request.path_params["fleet"])))

    def task(request: Request) -> Response:
        history = history_of(request.path_params["task_id"])
        report = from_history(history)
        return _json(
            {
                "task": history.task,
                "summary": report.summary(),
                "rounds": report.rounds,
                "devices": report.devices,
                "rejections_by_reason": report.rejections_by_reason,
                "open_round": _open_round(history),
                "plots": plots.applicable([report]),
            }
        )

    def plot(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in plots.PLOTS:
            return _json({"error": f"no plot {name!r}; plots: {', '.join(plots.PLOTS)}"}, 404)
        history = history_of(request.path_params["task_id"])
        png = plots.render(name, [from_history(history)])
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def storage_error(_request: Request, exc: Exception) -> Response:
        return _json({"error": str(exc)}, 404)

    async def database_error(_request: Request, exc: Exception) -> Response:
        logger.warning("dashboard: database error: %s", exc)
        cause = " ".join(str(getattr(exc, "orig", None) or exc).split())
        return _json({"error": f"database unavailable: {cause}"}, 503)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/health", health),
            Route("/api/tasks", tasks),
            Route("/api/fleets/{fleet}/devices", devices),
            Route("/api/tasks/{task_id}", task),
            Route("/api/tasks/{task_id}/plots/{name}.png", plot),
        ],
        exception_handlers={StorageError: storage_error, SQLAlchemyError: database_error},
    )


def _open_round(history: Any) -> dict[str, Any] | None:
    """The task's newest open round: who has reported and which of the fleet's devices have not."""
    open_rounds = [r for r in history.rounds if r.state == "open"]
    if not open_rounds:
        return None
    current = open_rounds[-1]
    reported = history.open_round_reported
    return {
        **dataclasses.asdict(current),
        "reported": reported,
        "waiting": [d for d in history.fleet_devices if d not in set(reported)],
        "seconds_left": (current.deadline - dt.datetime.now(dt.timezone.utc)).total_seconds(),
    }


def serve(engine: Engine, host: str, port: int, *, refresh_s: float = DEFAULT_REFRESH_S) -> None:
    """Serve the dashboard until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, refresh_s=refresh_s), host=host, port=port, log_level="warning")


def _page() -> str:
    """The page: plain HTML and a small script, no build step; it fills itself from /api/ and polls."""
    from importlib.resources import files

    return files("fedmask.report").joinpath("dashboard.html").read_text(encoding="utf-8")
