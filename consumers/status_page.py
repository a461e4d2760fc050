"""Each site's status page (``/status``) and the JSON it shows (``/status.json``): the grid at a glance.

The page is static HTML that renders ``/status.json`` and refreshes it; the JSON is collected by
:mod:`dicomgrid.consumers.grid_status` at most every :data:`REFRESH_S` seconds, whoever asks, so an
open page (or many) costs the grid one collection per period. Anyone reaching the port sees the
figures and the audit events without identities; a request with a token holding the ``audit`` scope
also gets the patients and queries the events name (as ``dicomgrid audit query`` would show them).
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
from dicomgrid.core.tokens import InvalidToken, TokenVerifier

REFRESH_S = 5.0
PAGE = Path(__file__).with_name("static") / "status.html"


class StatusPage:
    def __init__(self, context: SiteContext) -> None:
        self.context = context
        self._lock = threading.Lock()
        self._cached: dict[bool, tuple[float, GridStatus]] = {}
        security = context.config.security
        self._verifier = TokenVerifier(context.config, context.site.name) if security.require_tokens else None

    def routes(self) -> list[BaseRoute]:
        return [Route("/status", self.page, methods=["GET"]), Route("/status.json", self.json, methods=["GET"])]

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    async def json(self, request: Request) -> Response:
        status = await run_in_threadpool(self.current, self._may_see_identities(request))
        body = status.as_dict()
        body["site"] = self.context.site.name
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def _may_see_identities(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if self._verifier is None or scheme.lower() != "bearer" or not token.strip():
            return False
        try:
            return "audit" in self._verifier.verify(token.strip()).scopes
        except InvalidToken:
            return False  # an open page: a bad token just shows what everyone sees

    def current(self, with_identities: bool = False) -> GridStatus:
        with self._lock:
            cached = self._cached.get(with_identities)
            if cached is None or time.monotonic() - cached[0] >= REFRESH_S:
                cached = self._cached[with_identities] = (time.monotonic(), self._collect(with_identities))
            return cached[1]

    def _collect(self, with_identities: bool) -> GridStatus:
        from dicomgrid.supervisor import Supervisor

        context = self.context
        try:
            services = service_states(Supervisor(context.config).status())
        except Exception:  # not run by a supervisor on this host (e.g. in Kubernetes)
            services = []
        return collect(context.config, context.ledger, AuditLog(context.db), services,
                       with_identities=with_identities)
