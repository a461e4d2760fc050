"""WADO-RS and WADO-URI (PS3.18) on a site's HTTP service.

Retrieve (``/dicomweb/studies/{study}[/series/{series}[/instances/{instance}]]``) answers
``multipart/related; type="application/dicom"``: one part per instance, each the stored Part 10 file (the
grid's file meta and the data set exactly as received), streamed as it is read. The grid never transcodes,
so instances go out in their stored transfer syntax: an Accept without a ``transfer-syntax`` parameter
(or with ``*``) gets them as stored, and one naming syntaxes the instances are not stored in gets 406.

``.../metadata`` answers DICOM JSON read from the stored files' headers (``stop_before_pixels``), bulk data
left out. ``/wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=application/dicom``
returns one stored file.

Payloads come from :class:`~dicomgrid.consumers.payloads.Payloads` (local replica, else a peer's copy);
those up to ``IN_MEMORY_MAX_BYTES`` are read once and verified in memory before any of their bytes goes out.
The first one is resolved before the response starts, so a study that cannot be served at all gets a
status code; a payload that turns out unavailable or corrupt later aborts the stream, so a client never
mistakes a partial study for a complete one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from pydicom import dcmread
from pydicom.dataset import Dataset
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicomgrid.consumers.payloads import Payloads
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, Participant, audited_patients, transfer_objects
from dicomgrid.core.blobstore import PayloadReader
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.transfer import PayloadUnavailable
from dicomgrid.core.uids import is_valid_uid

log = get_logger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
ANY_SYNTAX = "*"
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_DATA_MIN_BYTES = 1024
# Size of the pieces a WADO-RS response is written in (see Wado._multipart): larger pieces made the
# event loop's transport move more of its send buffer after every partial send.
WRITE_BYTES = 256 * 1024


def _media_ranges(accept: str | None) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header (``*/*`` when absent), without those given q=0."""
    ranges = []
    for item in (accept or "*/*").split(","):
        fields = [f.strip() for f in item.split(";")]
        params = {}
        for param in fields[1:]:
            name, _, value = param.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        if params.get("q", "1").strip() in ("0", "0.0", "0.00", "0.000"):
            continue
        ranges.append((fields[0].lower(), params))
    return ranges


def accepted_syntaxes(accept: str | None) -> set[str]:
    """Transfer syntaxes an Accept header allows for DICOM instances ({"*"} for any); empty: none fits."""
    syntaxes: set[str] = set()
    for media_type, params in _media_ranges(accept):
        if media_type in ("*/*", "multipart/*"):
            syntaxes.add(ANY_SYNTAX)
        elif media_type == "multipart/related" and params.get("type", DICOM).lower() == DICOM:
            syntaxes.add(params.get("transfer-syntax", ANY_SYNTAX) or ANY_SYNTAX)
    return syntaxes


def accepts_json(accept: str | None) -> bool:
    types = {media_type for media_type, _ in _media_ranges(accept)}
    return bool(types & {"*/*", "application/*", DICOM_JSON, "application/json"})


def _drop_bulk_data(ds: Dataset) -> None:
    """Remove binary values above :data:`BULK_DATA_MIN_BYTES`, in nested sequences too."""
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                _drop_bulk_data(item)
        elif elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > BULK_DATA_MIN_BYTES:
            del ds[elem.tag]


def instance_metadata(reader: PayloadReader, item: StoredInstance) -> dict[str, Any]:
    """DICOM JSON of a stored file's data set, without pixel data or other bulk data.

    Only the header is read: for payloads streamed with an incremental check (large ones), the metadata
    comes from bytes that have not been hashed as a whole. A header pydicom cannot turn into JSON is
    answered with the identifying attributes the index holds.
    """
    try:
        reader.file.seek(0)
        ds = dcmread(reader.file, stop_before_pixels=True)
        _drop_bulk_data(ds)
        return ds.to_json_dict(suppress_invalid_tags=True)
    except Exception as exc:  # hostile or unusual encodings; pydicom raises many types
        log.warning("metadata from the index only", sop_instance_uid=item.sop_instance_uid, error=str(exc))
        ds = Dataset()
        ds.SOPClassUID = item.sop_class_uid
        ds.SOPInstanceUID = item.sop_instance_uid
        ds.StudyInstanceUID = item.study_uid
        ds.SeriesInstanceUID = item.series_uid
        return ds.to_json_dict()


class Wado:
    """The WADO handlers of one site."""

    def __init__(self, site: SiteContext, payloads: Payloads) -> None:
        self.site = site
        self.payloads = payloads

    def routes(self) -> list[BaseRoute]:
        base = "/dicomweb/studies/{study}"
        levels = (base, f"{base}/series/{{series}}", f"{base}/series/{{series}}/instances/{{instance}}")
        routes: list[BaseRoute] = []
        for path in levels:
            routes.append(Route(path, self.retrieve, methods=["GET"]))
            routes.append(Route(f"{path}/metadata", self.metadata, methods=["GET"]))
        routes.append(Route("/wado", self.wado_uri, methods=["GET"]))
        return routes

    # -- WADO-RS --------------------------------------------------------------------------------

    async def retrieve(self, request: Request) -> Response:
        uids = _path_uids(request)
        if uids is None:
            return _error(400, "a UID in the path is not a valid DICOM UID")
        syntaxes = accepted_syntaxes(request.headers.get("accept"))
        if not syntaxes:
            return _error(406, 'retrieve answers multipart/related; type="application/dicom"')
        found = await self._find(*uids)
        if isinstance(found, Response):
            return found
        if ANY_SYNTAX not in syntaxes:
            stored = {item.transfer_syntax_uid for item in found}
            if not stored <= syntaxes:
                return _error(406, f"instances are stored in {sorted(stored)}; the grid does not transcode")
        try:
            first = await run_in_threadpool(self._payload, found[0])
        except PayloadUnavailable as exc:
            self._audit(request, "WADO-RS", found, SERIOUS_FAILURE, f"not served: {exc}")
            return _error(503, "an instance is not available at any site right now")
        boundary = uuid.uuid4().hex
        sent = _Completion()
        return StreamingResponse(
            self._multipart(request, found, first, boundary, sent),
            media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
            background=BackgroundTask(self._audit_completed, request, found, sent),
        )

    async def _audit_completed(self, request: Request, instances: list[StoredInstance], sent: "_Completion") -> None:
        # After the response's last byte: the audit record (and the index read for its patients) is
        # no longer part of the time the client waits for the study.
        if sent.description is not None:
            await run_in_threadpool(self._audit, request, "WADO-RS", instances, SUCCESS, sent.description)

    def _payload(self, item: StoredInstance) -> bytes | PayloadReader:
        """A verified payload in memory (one read), or open for streaming when it is large."""
        data = self.payloads.verified_bytes(item)
        return data if data is not None else self.payloads.open(item)

    async def _multipart(self, request: Request, instances: list[StoredInstance], first: bytes | PayloadReader,
                         boundary: str, completion: "_Completion") -> AsyncIterator[bytes]:
        # The pieces are read and verified in the thread pool, one piece ahead: the next one is being
        # prepared while the event loop writes the current one.
        pieces = self._pieces(request, instances, first, boundary, completion)
        ahead: asyncio.Future[bytes | None] | None = None
        try:
            ahead = asyncio.ensure_future(run_in_threadpool(next, pieces, None))
            while (piece := await ahead) is not None:
                ahead = asyncio.ensure_future(run_in_threadpool(next, pieces, None))
                yield piece
        finally:
            # Also when the client left (the task is cancelled): the generator cannot be closed while a
            # thread is running it, and closing it records what was sent.
            with anyio.CancelScope(shield=True):
                if ahead is not None and not ahead.done():
                    await asyncio.wait([ahead])
                await run_in_threadpool(pieces.close)

    def _pieces(self, request: Request, instances: list[StoredInstance], first: bytes | PayloadReader,
                boundary: str, completion: "_Completion") -> Iterator[bytes]:
        # Small instances are gathered into pieces of about WRITE_BYTES, joined once.
        sent, outcome = 0, None
        pending: list[bytes] = []
        pending_bytes = 0
        current: bytes | PayloadReader | None = first
        try:
            for index, item in enumerate(instances):
                payload = current if index == 0 else self._payload(item)
                current = payload
                size = len(payload) if isinstance(payload, bytes) else payload.size
                pending.append(f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={item.transfer_syntax_uid}\r\n"
                               f"Content-Length: {size}\r\n\r\n".encode())
                chunks = (payload,) if isinstance(payload, bytes) else payload
                for chunk in chunks:
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= WRITE_BYTES:
                        yield b"".join(pending)
                        pending.clear()
                        pending_bytes = 0
                current = None
                pending.append(b"\r\n")
                sent += 1
            pending.append(f"--{boundary}--\r\n".encode())
            yield b"".join(pending)
            outcome = SUCCESS, f"{sent} instance(s) sent"
            # Asked for more, so the last piece went out: audited by the response's background task,
            # which runs once the end of the body has been written.
            completion.description = outcome[1]
        except Exception as exc:
            # The status line is gone: aborting the stream is the only way left to tell the client.
            log.error("wado-rs stream aborted", sent=sent, total=len(instances), error=str(exc))
            outcome = SERIOUS_FAILURE, f"aborted after {sent} of {len(instances)} instance(s): {exc}"
            raise
        finally:
            if isinstance(current, PayloadReader):
                current.close()
            if isinstance(first, PayloadReader):
                first.close()
            if completion.description is None:
                self._audit(request, "WADO-RS", instances,
                            *(outcome or (MINOR_FAILURE, f"client left after {sent} of {len(instances)} instance(s)")))

    async def metadata(self, request: Request) -> Response:
        uids = _path_uids(request)
        if uids is None:
            return _error(400, "a UID in the path is not a valid DICOM UID")
        if not accepts_json(request.headers.get("accept")):
            return _error(406, "metadata answers application/dicom+json")
        found = await self._find(*uids)
        if isinstance(found, Response):
            return found
        try:
            body = await run_in_threadpool(self._metadata, found)
        except PayloadUnavailable as exc:
            self._audit(request, "WADO-RS metadata", found, SERIOUS_FAILURE, f"not served: {exc}")
            return _error(503, "an instance is not available at any site right now")
        self._audit(request, "WADO-RS metadata", found, SUCCESS, f"metadata of {len(found)} instance(s) sent")
        return JSONResponse(body, media_type=DICOM_JSON)

    def _metadata(self, instances: list[StoredInstance]) -> list[dict[str, Any]]:
        out = []
        for item in instances:
            with self.payloads.open(item) as reader:
                out.append(instance_metadata(reader, item))
        return out

    async def _find(self, study: str, series: str | None, instance: str | None) -> list[StoredInstance] | Response:
        """The indexed instances of a study, series or instance; 404 when there are none."""
        try:
            found = await run_in_threadpool(
                self.site.index.find_instances, study, series, [instance] if instance else []
            )
        except Exception as exc:  # index unreachable
            log.error("wado index lookup failed", error=str(exc))
            return _error(503, "the index is not available right now")
        return found or _error(404, "no such instances")

    # -- WADO-URI -------------------------------------------------------------------------------

    async def wado_uri(self, request: Request) -> Response:
        query = request.query_params
        if query.get("requestType") != "WADO":
            return _error(400, "requestType=WADO is required")
        uids = [query.get(name, "") for name in ("studyUID", "seriesUID", "objectUID")]
        if not all(is_valid_uid(uid) for uid in uids):
            return _error(400, "studyUID, seriesUID and objectUID must be valid DICOM UIDs")
        content_types = {t.split(";")[0].strip().lower() for t in query.get("contentType", DICOM).split(",")}
        if not content_types & {DICOM, "*/*"}:
            return _error(406, "only contentType=application/dicom is served (no rendering)")
        found = await self._find(*uids)
        if isinstance(found, Response):
            return found
        (item,) = found
        wanted_syntax = query.get("transferSyntax")
        if wanted_syntax and wanted_syntax not in (item.transfer_syntax_uid, ANY_SYNTAX):
            return _error(406, f"instance is stored in {item.transfer_syntax_uid}; the grid does not transcode")
        try:
            reader = await run_in_threadpool(self.payloads.open, item)
        except PayloadUnavailable as exc:
            self._audit(request, "WADO-URI", found, SERIOUS_FAILURE, f"not served: {exc}")
            return _error(503, "the instance is not available at any site right now")
        return StreamingResponse(self._single(request, found, reader), media_type=DICOM,
                                 headers={"Content-Length": str(reader.size)})

    def _single(self, request: Request, found: list[StoredInstance], reader: PayloadReader) -> Iterator[bytes]:
        """One stored file; audited as sent only once every byte has gone and matched its digest."""
        outcome = MINOR_FAILURE, "client left before the instance was sent"
        try:
            yield from reader
            outcome = SUCCESS, "1 instance sent"
        except Exception as exc:
            log.error("wado-uri stream aborted", error=str(exc))
            outcome = SERIOUS_FAILURE, f"aborted: {exc}"
            raise
        finally:
            self._audit(request, "WADO-URI", found, *outcome)

    # -- audit ----------------------------------------------------------------------------------

    def _audit(self, request: Request, protocol: str, instances: list[StoredInstance], outcome: int,
               description: str) -> None:
        address = f"{request.client.host}:{request.client.port}" if request.client else None
        me = self.site.site
        self.site.audit.record(
            "R",
            "DICOM Instances Transferred",
            outcome,
            f"{protocol} {request.url.path}: {description}",
            [Participant(address or "unknown", True, None, address, "Destination"),
             Participant(me.name, False, me.ae_title, None, "Source")],
            transfer_objects(instances, audited_patients(self.site, instances)),
        )


class _Completion:
    """What a WADO-RS stream that sent everything reports to its response's background task."""

    description: str | None = None


def _path_uids(request: Request) -> tuple[str, str | None, str | None] | None:
    """(study, series, instance) UIDs of a WADO-RS path, None if any of them is malformed."""
    study, series, instance = (request.path_params.get(k) for k in ("study", "series", "instance"))
    given = [uid for uid in (study, series, instance) if uid is not None]
    return (study, series, instance) if all(is_valid_uid(uid) for uid in given) else None


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def wado_routes(site: SiteContext) -> list[BaseRoute]:
    return Wado(site, Payloads(site)).routes()
