"""A trial over DICOMweb: QIDO-RS and WADO-RS under ``/trials/{name}/dicomweb``.

The same resources as the site's ``/dicomweb`` (studies, series, instances, their searches, ``/metadata``),
answering only for the trial's members, de-identified, with pseudonymous UIDs in paths and answers.
Withheld instances (pixels that may show identity) are left out: QIDO-RS instance searches and WADO-RS
responses then carry a ``Warning: 299`` header saying how many and why, and a WADO-RS request that names
only withheld instances gets 404 with that reason. Every response is audited as a query or an export to
the trial; an unknown trial is a plain 404.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from itertools import islice
from typing import Any

from pydicom import dcmread
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicomgrid.consumers.payloads import Payloads
from dicomgrid.consumers.qido import MAX_RESULTS, MEDIA_TYPE, BadRequest, _accepts_json, parse_search
from dicomgrid.consumers.query import Level, QueryError, SiteAnswers
from dicomgrid.consumers.wado import ANY_SYNTAX, DICOM, DICOM_JSON, _drop_bulk_data, accepted_syntaxes, accepts_json
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.transfer import PayloadUnavailable
from dicomgrid.core.uids import is_valid_uid
from dicomgrid.trials.access import Release, TrialAccess
from dicomgrid.trials.dimse import release_objects, trial_participant
from dicomgrid.trials.store import Trial, TrialDirectory, TrialStore

log = get_logger(__name__)

BASE = "/trials/{trial}/dicomweb"


def _warning(*texts: str) -> dict[str, str] | None:
    texts = tuple(t for t in texts if t)
    return {"Warning": ", ".join(f'299 dicomgrid: "{t}"' for t in texts)} if texts else None


def _withheld_text(count: int, reasons: set[str]) -> str:
    if not count:
        return ""
    return f"{count} instance(s) withheld, their pixel data may show identity: {'; '.join(sorted(reasons))}"


class TrialWeb:
    def __init__(self, site: SiteContext) -> None:
        self.site = site
        self.store = TrialStore(site.db, site.config)
        self.directory = TrialDirectory(self.store)
        self.payloads = Payloads(site)

    def routes(self) -> list[BaseRoute]:
        def search(path: str, level: Level, flat: bool) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self.search(request, level, flat)

            return Route(BASE + path, endpoint, methods=["GET"])

        routes: list[BaseRoute] = [
            search("/studies", Level.STUDY, True),
            search("/series", Level.SERIES, True),
            search("/instances", Level.IMAGE, True),
            search("/studies/{study}/series", Level.SERIES, False),
            search("/studies/{study}/instances", Level.IMAGE, False),
            search("/studies/{study}/series/{series}/instances", Level.IMAGE, False),
        ]
        for path in ("/studies/{study}", "/studies/{study}/series/{series}",
                     "/studies/{study}/series/{series}/instances/{instance}"):
            routes.append(Route(BASE + path, self.retrieve, methods=["GET"]))
            routes.append(Route(BASE + path + "/metadata", self.metadata, methods=["GET"]))
        return routes

    async def _trial(self, request: Request) -> Trial | None:
        return await run_in_threadpool(self.directory.by_name, request.path_params["trial"])

    def _base(self, request: Request, trial: Trial) -> str:
        return str(request.base_url).rstrip("/") + f"/trials/{trial.name}/dicomweb"

    # -- QIDO-RS --------------------------------------------------------------------------------------

    async def search(self, request: Request, level: Level, flat: bool) -> Response:
        started = time.monotonic()
        trial = await self._trial(request)
        if trial is None:
            return PlainTextResponse("no such trial", status_code=404)
        if not _accepts_json(request.headers.get("accept")):
            return PlainTextResponse(f"only {MEDIA_TYPE} is served", status_code=406)
        path = {keyword: request.path_params[param]
                for param, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"))
                if param in request.path_params}
        try:
            search = parse_search(level, request.query_params.multi_items(), path, flat=flat,
                                  limits=self.site.config.limits)
        except (BadRequest, QueryError) as exc:
            self._audit_query(request, trial, "refused", 0, str(exc), started)
            return PlainTextResponse(str(exc), status_code=400)
        access = TrialAccess(self.site, self.store, trial, self.payloads)
        answers = SiteAnswers(trial.ae_title, self._base(request, trial))

        def collect() -> tuple[list[dict[str, Any]], bool]:
            records = list(islice(access.find(search.query), search.offset, search.offset + search.limit + 1))
            page = [search.query.response(r, answers).to_json_dict() for r in records[: search.limit]]
            return page, len(records) > search.limit

        try:
            results, more = await run_in_threadpool(collect)
        except Exception as exc:
            log.exception("trial QIDO-RS failed while reading the index", trial=trial.name)
            self._audit_query(request, trial, "failed", 0, f"index read failed: {type(exc).__name__}", started)
            return PlainTextResponse("unable to read the index; retry later", status_code=503)
        warnings = list(search.warnings)
        if more:
            warnings.append(f"More than {search.limit} results; request the next page with offset.")
        if access.withheld_skipped:
            warnings.append(f"{access.withheld_skipped} instance(s) withheld and not listed: their pixel data may "
                            "show identity")
        self._audit_query(request, trial, "success", len(results), "", started)
        return Response(json.dumps(results, separators=(",", ":")).encode(), media_type=MEDIA_TYPE,
                        headers=_warning(*warnings))

    def _audit_query(self, request: Request, trial: Trial, result: str, matches: int, comment: str,
                     started: float) -> None:
        client = f"{request.client.host}:{request.client.port}" if request.client else "unknown"
        fields = dict(trial=trial.name, path=request.url.path, client=client, result=result, matches=matches,
                      elapsed_ms=round((time.monotonic() - started) * 1000, 1))
        (log.info if result == "success" else log.warning)("trial qido-rs", **fields)
        outcome = SUCCESS if result == "success" else SERIOUS_FAILURE if result == "failed" else MINOR_FAILURE
        self.site.audit.record(
            "E", "Query", outcome, f"QIDO-RS {result}: {matches} matches" + (f"; {comment}" if comment else ""),
            [Participant(client, True, None, client, "Source"), trial_participant(trial)],
            [AuditObject("query", f"QIDO-RS {request.url.path}",
                         {"protocol": "QIDO-RS", "trial": trial.name, "matches": matches,
                          "query_string": request.url.query[:1024]})],
        )

    # -- WADO-RS --------------------------------------------------------------------------------------

    async def _release(self, request: Request, trial: Trial) -> tuple[TrialAccess, Release] | Response:
        study, series, instance = (request.path_params.get(k) for k in ("study", "series", "instance"))
        if not all(is_valid_uid(u) for u in (study, series, instance) if u is not None):
            return JSONResponse({"error": "a UID in the path is not a valid DICOM UID"}, status_code=400)
        level = "IMAGE" if instance else "SERIES" if series else "STUDY"
        access = TrialAccess(self.site, self.store, trial, self.payloads)
        try:
            release = await run_in_threadpool(access.resolve, level, None, (study,), (series,) if series else (),
                                              (instance,) if instance else ())
        except PayloadUnavailable:
            return JSONResponse({"error": "an instance is not available at any site right now"}, status_code=503)
        except Exception:
            log.exception("trial WADO-RS look-up failed", trial=trial.name)
            return JSONResponse({"error": "the index is not available right now"}, status_code=503)
        if not release.released:
            withheld = _withheld_text(len(release.withheld), {r for _, r in release.withheld})
            return JSONResponse({"error": withheld or "no such instances"}, status_code=404, headers=_warning(withheld))
        return access, release

    async def retrieve(self, request: Request) -> Response:
        trial = await self._trial(request)
        if trial is None:
            return JSONResponse({"error": "no such trial"}, status_code=404)
        syntaxes = accepted_syntaxes(request.headers.get("accept"))
        if not syntaxes:
            return JSONResponse({"error": 'retrieve answers multipart/related; type="application/dicom"'},
                                status_code=406)
        found = await self._release(request, trial)
        if isinstance(found, Response):
            return found
        access, release = found
        stored = {item.transfer_syntax_uid for item in release.released}
        if ANY_SYNTAX not in syntaxes and not stored <= syntaxes:
            return JSONResponse({"error": f"instances are stored in {sorted(stored)}; the grid does not transcode"},
                                status_code=406)
        boundary = uuid.uuid4().hex
        withheld = _withheld_text(len(release.withheld), {r for _, r in release.withheld})
        return StreamingResponse(self._multipart(request, access, release, boundary),
                                 media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
                                 headers=_warning(withheld))

    def _multipart(self, request: Request, access: TrialAccess, release: Release, boundary: str) -> Iterator[bytes]:
        sent: list[Any] = []
        outcome: tuple[int, str] | None = None
        try:
            for item in release.released:
                with self.payloads.open(item, verify_first=True) as reader:
                    reader.file.seek(0)
                    data = access.deidentifier.deidentify_bytes(reader.file)
                yield (f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={item.transfer_syntax_uid}\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n").encode() + data + b"\r\n"
                sent.append(item)
            yield f"--{boundary}--\r\n".encode()
            outcome = SUCCESS, f"{len(sent)} de-identified instance(s) sent"
        except Exception as exc:
            log.error("trial wado-rs stream aborted", trial=access.trial.name, sent=len(sent), error=type(exc).__name__)
            outcome = SERIOUS_FAILURE, f"aborted after {len(sent)} of {len(release.released)} instance(s)"
            raise
        finally:
            how = outcome or (MINOR_FAILURE, f"client left after {len(sent)} of {len(release.released)} instance(s)")
            self._audit_export(request, access, release, sent, "WADO-RS", *how)

    async def metadata(self, request: Request) -> Response:
        trial = await self._trial(request)
        if trial is None:
            return JSONResponse({"error": "no such trial"}, status_code=404)
        if not accepts_json(request.headers.get("accept")):
            return JSONResponse({"error": "metadata answers application/dicom+json"}, status_code=406)
        found = await self._release(request, trial)
        if isinstance(found, Response):
            return found
        access, release = found

        def headers() -> list[dict[str, Any]]:
            out = []
            for item in release.released:
                with self.payloads.open(item) as reader:
                    reader.file.seek(0)
                    ds = dcmread(reader.file, stop_before_pixels=True)
                access.deidentifier.deidentify(ds)
                _drop_bulk_data(ds)
                out.append(ds.to_json_dict(suppress_invalid_tags=True))
            return out

        try:
            body = await run_in_threadpool(headers)
        except PayloadUnavailable:
            self._audit_export(request, access, release, [], "WADO-RS metadata", SERIOUS_FAILURE, "not served")
            return JSONResponse({"error": "an instance is not available at any site right now"}, status_code=503)
        self._audit_export(request, access, release, release.released, "WADO-RS metadata", SUCCESS,
                           f"de-identified metadata of {len(body)} instance(s) sent")
        withheld = _withheld_text(len(release.withheld), {r for _, r in release.withheld})
        return JSONResponse(body, media_type=DICOM_JSON, headers=_warning(withheld))

    def _audit_export(self, request: Request, access: TrialAccess, release: Release, sent: list[Any],
                      protocol: str, outcome: int, description: str) -> None:
        address = f"{request.client.host}:{request.client.port}" if request.client else None
        me = self.site.site
        withheld = f"; {len(release.withheld)} withheld" if release.withheld else ""
        self.site.audit.record(
            "R", "Export", outcome, f"{protocol} {request.url.path}: {description}{withheld}",
            [Participant(address or "unknown", True, None, address, "Requestor"), trial_participant(access.trial),
             Participant(me.name, False, me.ae_title, None, "Source")],
            release_objects(access, release, sent),
        )


def trial_routes(site: SiteContext) -> list[BaseRoute]:
    return TrialWeb(site).routes()
