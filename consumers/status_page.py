"""Each site's status page (``/status``) and the JSON it shows (``/status.json``): the grid at a glance.

The page is static HTML that renders ``/status.json`` and refreshes it; the JSON is collected by
:mod:`dicomgrid.consumers.grid_status` at most every :data:`REFRESH_S` seconds, whoever asks, so an
open page (or many) costs the grid one collection per period.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dicomgrid.consumers.grid_status import GridStatus, collect, service_states
from dicomgrid.core.audit_log import AuditLog
from dicomgrid.core.site import SiteContext

REFRESH_S = 5.0
PAGE = Path(__file__).with_name("static") / "status.html"


class StatusPage:
    def __init__(self, context: SiteContext) -> None:
        self.context = context
        self._lock = threading.Lock()
        self._cached: tuple[float, GridStatus] | None = None

    def routes(self) -> list[BaseRoute]:
        return [Route("/status", self.page, methods=["GET"]), Route("/status.json", self.json, methods=["GET"])]

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def json(self, request: Request) -> Response:
        status = await run_in_threadpool(self.current)
        body = status.as_dict()
        body["site"] = self.context.site.name
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def current(self) -> GridStatus:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] >= REFRESH_S:
                self._cached = (time.monotonic(), self._collect())
            return self._cached[1]

    def _collect(self) -> GridStatus:
        from dicomgrid.supervisor import Supervisor

        context = self.context
        try:
            services = service_states(Supervisor(context.config).status())
        except Exception:  # not run by a supervisor on this host (e.g. in Kubernetes)
            services = []
        return collect(context.config, context.ledger, AuditLog(context.db), services)
