"""A site's HTTP service: DICOMweb under ``/dicomweb``, the payload transfer endpoint peers fetch from
(``/internal/payloads``), and a health probe at ``/health``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicomgrid.consumers import http_routes
from dicomgrid.core.site import SiteContext
from dicomgrid.core.transfer import TransferEndpoint
from dicomgrid.producers.site import build_ingestor
from dicomgrid.producers.stow import stow


def create_http_app(context: SiteContext) -> Starlette:
    """STOW-RS through the ingest path, QIDO-RS and WADO-RS from the consumers, payloads to peers."""
    site_config = context.site
    ingestor = build_ingestor(context)
    spool = ingestor.blobs.root / "incoming"
    spool.mkdir(parents=True, exist_ok=True)

    async def store(request: Request) -> Response:
        return await stow(request, ingestor, spool, site_config.max_instance_bytes)

    async def root(request: Request) -> Response:
        return JSONResponse({"site": site_config.name, "ae_title": site_config.ae_title})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "site": site_config.name})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/dicomweb", root, methods=["GET"], name="dicomweb_root"),
            Route("/dicomweb/studies", store, methods=["POST"]),
            Route("/dicomweb/studies/{study}", store, methods=["POST"]),
            *http_routes(context),
            *TransferEndpoint(context).routes(),
        ]
    )

