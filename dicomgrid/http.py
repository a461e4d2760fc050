"""A site's HTTP service: DICOMweb under ``/dicomweb``, the payload transfer endpoint peers fetch from
(``/internal/payloads``), and the operator's endpoints: ``/health`` (the process's dependencies),
``/health/live``, ``/metrics`` (the whole site's Prometheus metrics) and the ``/status`` page.

Every DICOMweb and payload path wants a bearer token with the scope :func:`required_scope` names
(:class:`TokenGuard`); a missing or bad token is answered 401 (audited as User Authentication), a
token without the scope 403 (audited as a Security Alert). The operator's endpoints stay open to
probes, scrapers and the status page's browser (they carry no patient data).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import h11
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicomgrid.consumers import http_routes
from dicomgrid.consumers.status_page import StatusPage
from dicomgrid.core import metrics
from dicomgrid.core.audit import MINOR_FAILURE, Participant
from dicomgrid.core.config import ConnectionLimits
from dicomgrid.core.health import HealthChecks
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.tokens import InvalidToken, TokenVerifier
from dicomgrid.core.transfer_endpoint import TransferEndpoint
from dicomgrid.producers.site import build_ingestor
from dicomgrid.producers.stow import stow

log = get_logger(__name__)

MISSING_TOKEN = "missing bearer token"
# The operator's endpoints: probes (Kubernetes, the supervisor), Prometheus scrapers and the status
# page's browser reach them without a token; none of them shows patient data.
OPEN_PATHS = frozenset({"/health", "/health/live", "/metrics", "/status", "/status.json"})


def required_scope(method: str, path: str) -> str | None:
    """The token scope a request needs (None: none, for the health probe)."""
    if path in OPEN_PATHS:
        return None
    if path == "/internal/payloads" or path.startswith("/internal/payloads/"):
        return "replicate"
    if path == "/audit" or path.startswith("/audit/"):
        return "audit"
    if method == "POST" and (path == "/dicomweb/studies" or path.startswith("/dicomweb/studies/")):
        return "write"
    return "read"


class TokenGuard:
    """ASGI middleware: a bearer token with the scope :func:`required_scope` names, or 401 / 403.

    A verified token's :class:`~dicomgrid.core.tokens.Principal` is left in the request's state
    (``request.state.principal``), so audit records can name who asked.
    """

    def __init__(self, app: ASGIApp, site: SiteContext, verifier: TokenVerifier | None) -> None:
        self.app = app
        self.site = site
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.verifier is None:
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["method"], scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await self._refuse(scope, receive, send, 401, needed, MISSING_TOKEN, None)
            return
        try:
            principal = self.verifier.verify(token.strip())
        except InvalidToken as exc:
            await self._refuse(scope, receive, send, 401, needed, exc.reason, None)
            return
        if needed not in principal.scopes:
            await self._refuse(scope, receive, send, 403, needed, f"token lacks the {needed} scope", principal.user_id)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, needed: str, reason: str,
                      user: str | None) -> None:
        client = scope.get("client")
        address = f"{client[0]}:{client[1]}" if client else None
        what = f"{scope['method']} {_path_kind(scope['path'])}"
        log.warning("http request refused", status=status, reason=reason, request=what, peer=address, user=user)
        me = self.site.site
        participants = [Participant(user or address or "unknown", True, None, address, "Source"),
                        Participant(me.name, False, me.ae_title, None, "Destination")]
        if status == 401:
            self.site.audit.record("E", "User Authentication", MINOR_FAILURE,
                                   f"bearer token refused for {what}: {reason}", participants)
            # RFC 6750 3.1: no error code when the request had no credentials at all.
            challenge = ('Bearer realm="dicomgrid"' if user is None and reason == MISSING_TOKEN
                         else 'Bearer realm="dicomgrid", error="invalid_token"')
        else:
            self.site.audit.record("E", "Security Alert", MINOR_FAILURE,
                                   f"request for {what} refused: {reason}", participants)
            challenge = f'Bearer realm="dicomgrid", error="insufficient_scope", scope="{needed}"'
        response = JSONResponse({"error": reason}, status_code=status, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


def _path_kind(path: str) -> str:
    """A request path without the UIDs and digests in it (those stay out of logs)."""
    parts = path.split("/")
    return "/".join(p if not p or p.isalpha() or p in ("dicomweb", "internal") else "{id}" for p in parts)[:128]


def protect(app: ASGIApp, context: SiteContext) -> ASGIApp:
    """The app behind the site's token check (when ``security.require_tokens``)."""
    verifier = TokenVerifier(context.config, context.site.name) if context.config.security.require_tokens else None
    return TokenGuard(app, context, verifier)


def create_http_app(context: SiteContext) -> ASGIApp:
    """STOW-RS through the ingest path, QIDO-RS and WADO-RS from the consumers, payloads to peers."""
    site_config = context.site
    ingestor = build_ingestor(context)
    spool = ingestor.blobs.root / "incoming"
    spool.mkdir(parents=True, exist_ok=True)

    async def store(request: Request) -> Response:
        return await stow(request, ingestor, spool, site_config.max_instance_bytes, context.config.limits)

    async def root(request: Request) -> Response:
        return JSONResponse({"site": site_config.name, "ae_title": site_config.ae_title})

    checks = HealthChecks(context)

    async def health(request: Request) -> Response:
        results = await run_in_threadpool(checks.run)
        ok = all(c.ok for c in results)
        body = {"status": "ok" if ok else "unavailable", "site": site_config.name,
                "checks": {c.name: c.as_dict() for c in results}}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok", "site": site_config.name})

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type=content_type)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/health/live", live, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *StatusPage(context).routes(),
            Route("/dicomweb", root, methods=["GET"], name="dicomweb_root"),
            Route("/dicomweb/studies", store, methods=["POST"]),
            Route("/dicomweb/studies/{study}", store, methods=["POST"]),
            *http_routes(context),
            *TransferEndpoint(context).routes(),
        ],
        lifespan=_lifespan(context),
    )
    app.add_middleware(RequestTimer, site=site_config.name)
    return protect(app, context)


def operation_of(method: str, path: str) -> str | None:
    """The DICOMweb operation a request is (for its latency histogram), None for the others."""
    trial = path.startswith("/trials/")
    if trial:
        path = "/dicomweb" + path.split("/dicomweb", 1)[1] if "/dicomweb" in path else ""
    if path.startswith("/internal/payloads"):
        return "payload-transfer"
    if not path.startswith("/dicomweb/"):
        return None
    if method == "POST":
        operation = "STOW-RS"
    elif path.rstrip("/").rsplit("/", 1)[-1] in ("studies", "series", "instances"):
        operation = "QIDO-RS"
    else:
        operation = "WADO-RS"
    return f"trial {operation}" if trial else operation


class RequestTimer:
    """ASGI middleware: each DICOMweb request's time, to its last response byte (a WADO-RS stream is
    timed until it ends), in :data:`dicomgrid.core.metrics.REQUEST_SECONDS`."""

    def __init__(self, app: Any, site: str) -> None:
        self.app = app
        self.site = site

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        operation = operation_of(scope.get("method", ""), scope.get("path", "")) if scope["type"] == "http" else None
        if operation is None:
            await self.app(scope, receive, send)
            return
        with metrics.timed(self.site, operation):
            await self.app(scope, receive, send)


def _lifespan(context: SiteContext):  # noqa: ANN202 - Starlette's lifespan protocol
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # noqa: ANN202
        context.application_activity("http", started=True)
        try:
            yield
        finally:
            context.application_activity("http", started=False)
            context.audit.flush()

    return lifespan


class _Pending:
    """The HTTP connections of one process that are waiting for a request head, oldest first.

    Touched only from the event loop, so it needs no lock.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.connections: dict["GuardedH11Protocol", float] = {}  # insertion order = age

    def add(self, connection: "GuardedH11Protocol") -> None:
        peer = connection.peer
        same_peer = [c for c in self.connections if c.peer == peer]
        if len(same_peer) >= self.limits.max_pending_per_peer:
            same_peer[0].drop("pending connection closed for a newer one", per_peer_cap=True)
        elif len(self.connections) >= self.limits.max_pending:
            next(iter(self.connections)).drop("pending connection closed for a newer one")
        self.connections[connection] = time.monotonic()

    def discard(self, connection: "GuardedH11Protocol") -> None:
        self.connections.pop(connection, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with limits for connections that have not sent a request (head) yet.

    uvicorn closes an idle kept-alive connection after ``timeout_keep_alive``, but any byte received
    cancels that timer, and a connection that never sends a request has no timer at all: it stays open
    until the peer leaves. Here a connection is *pending* from accept, and again after each response,
    until a whole request head has arrived; it is closed ``connections.request_timeout_s`` after it
    became pending (dribbled bytes do not extend that), and the per-peer and total caps on pending
    connections close the oldest one for a new one. A request in progress (e.g. a long STOW-RS upload
    or WADO-RS download) is not pending.
    """

    pending: _Pending  # set per process by guarded_protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> str:
        return self.client[0] if self.client else "unknown"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._become_pending()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None and self.conn.their_state is not h11.IDLE:
            self._stop_pending()  # the request head is in: from now on the application's business

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._become_pending()  # kept alive: waiting for the next request

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_pending()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle and self.transport.get_extra_info("sslcontext") is not None:
            # A TLS connection closes only once the peer answers the close_notify, which an idle
            # kept-alive client does not read: the service would wait for it to stop (30 s).
            self.transport.abort()

    def drop(self, why: str, per_peer_cap: bool = False) -> None:
        log.info("pending http connection closed", reason=why, peer=self.peer, per_peer_cap=per_peer_cap)
        self._stop_pending()
        self.transport.close()

    def _become_pending(self) -> None:
        self._stop_pending()
        self.pending.add(self)
        self._deadline = self.loop.call_later(
            self.pending.limits.request_timeout_s, self.drop, "no request within the request timeout"
        )

    def _stop_pending(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.pending.discard(self)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (``http=``), with this process's pending-connection limits."""
    return type("SiteH11Protocol", (GuardedH11Protocol,), {"pending": _Pending(limits)})
