"""QIDO-RS (PS3.18 10.6): search for studies, series and instances over HTTP, from the index.

Resources: ``/dicomweb/studies``, ``/dicomweb/series``, ``/dicomweb/instances``,
``/dicomweb/studies/{study}/series``, ``/dicomweb/studies/{study}/instances`` and
``/dicomweb/studies/{study}/series/{series}/instances``. Matching is the C-FIND matching of
dicomgrid.consumers.query; parameters name attributes by keyword or by tag (``PatientID=X``,
``00100020=X``), lists of UIDs are separated by ``,`` or ``\\``.

Choices this service makes where PS3.18 leaves room:

* No match: **200 with an empty array**, always (not 204), so every success has the same shape; this is
  where DICOM is heading (CP-2473) and what C-FIND does (success with no pending responses).
* At most ``[limits] qido_max_results`` per response (a larger ``limit`` is clamped to it, with a
  ``Warning: 299`` header, PS3.18 8.3.4.4); when more matched, a ``Warning: 299`` header says so and
  ``offset`` fetches the next page, up to ``qido_max_offset`` (deeper: 400, narrow the query).
* A search that would read more than ``query_scan_budget_rows`` index rows (a wildcard across the whole
  index) is stopped: 413, the search was too broad (PS3.18 10.6.3), with what to do in the body.
* ``fuzzymatching=true`` is accepted and ignored (literal matching, with a ``Warning: 299`` header);
  attributes that are valid DICOM but not indexed are ignored for matching, with a warning too.
* 400 (text/plain reason) for anything malformed: unknown attribute names, repeated attributes,
  sequence paths, attributes below the resource's level, bad dates/UIDs/numbers, ``limit``/``offset``
  that are not non-negative integers, an ``offset`` beyond the cap. 406 if the client accepts no JSON,
  503 if the index fails.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dicomgrid.consumers.query import (
    ATTRIBUTES,
    SITE_KEYS,
    Level,
    Query,
    QueryEngine,
    QueryError,
    ScanBudgetExceeded,
    SiteAnswers,
    attributes_at,
)
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core.config import LimitsConfig
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.uids import is_valid_uid

log = get_logger(__name__)

MAX_RESULTS = LimitsConfig().qido_max_results  # the shipped default; a site's own is in [limits]
MEDIA_TYPE = "application/dicom+json"

# Default return attributes (PS3.18 Tables 10.6.3-3 to -5), as far as the index holds them.
DEFAULTS = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
                  "ReferringPhysicianName", "RetrieveURL", "PatientName", "PatientID", "PatientBirthDate",
                  "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("StudyInstanceUID", "Modality", "SeriesDescription", "RetrieveURL", "SeriesInstanceUID",
                   "SeriesNumber", "NumberOfSeriesRelatedInstances"),
    Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
                  "RetrieveURL", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"),
}
_TAG = re.compile(r"[0-9A-Fa-f]{8}")


class BadRequest(ValueError):
    pass


@dataclass
class Search:
    """A QIDO-RS request, parsed."""

    query: Query
    limit: int = MAX_RESULTS
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


def _keyword(name: str) -> str:
    """The keyword a parameter names (keyword or 8-digit tag); '' for a valid tag without one."""
    if "." in name:
        raise BadRequest(f"{name}: matching inside sequences is not supported")
    if _TAG.fullmatch(name):
        return keyword_for_tag(int(name, 16))
    if tag_for_keyword(name) is None:
        raise BadRequest(f"{name[:64]!r} is not a DICOM attribute keyword or tag")
    return name


def _non_negative(name: str, value: str) -> int:
    # Any length: a number beyond the caps is answered by the caps (clamped limit, refused offset).
    if not re.fullmatch(r"[0-9]{1,18}", value):
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(value)


def parse_search(
    level: Level, params: Sequence[tuple[str, str]], path: dict[str, str], *, flat: bool,
    limits: LimitsConfig | None = None,
) -> Search:
    """Turn query parameters (and UIDs from the path) into a :class:`Search`.

    ``flat``: a search across studies (``/series``, ``/instances``) also returns the attributes of the
    levels above by default. ``limits``: the site's caps on ``limit`` and ``offset`` (default: shipped).
    """
    limits = limits or LimitsConfig()
    max_results = limits.qido_max_results
    search_levels = [lv for lv in (Level.STUDY, Level.SERIES, Level.IMAGE) if lv <= level]
    returned = [kw for lv in (search_levels if flat else [level]) for kw in DEFAULTS[lv]]
    allowed = {a.keyword for a in attributes_at(level)} | set(SITE_KEYS)
    keys: dict[str, list[str]] = {}
    limit, offset = max_results, 0
    warnings: list[str] = []
    seen: set[str] = set()
    ignored: list[str] = []
    for name, value in params:
        if name in ("limit", "offset", "fuzzymatching") and name in seen:
            raise BadRequest(f"{name} given more than once")
        seen.add(name)
        if name == "limit":
            limit = _non_negative(name, value)
            if limit > max_results:
                # PS3.18 8.3.4.4: up to the server's maximum, and a warning that says so.
                limit = max_results
                warnings.append(f"The limit exceeds the maximum of {max_results} results supported by the "
                                "server. Additional results can be requested with offset.")
        elif name == "offset":
            offset = _non_negative(name, value)
            if offset > limits.qido_max_offset:
                raise BadRequest(f"offset is limited to {limits.qido_max_offset}: narrow the query "
                                 "(e.g. by StudyDate) instead of paging that deep")
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise BadRequest("fuzzymatching must be true or false")
            if value == "true":
                warnings.append("The fuzzymatching parameter is not supported. "
                                "Only literal matching has been performed.")
        elif name == "includefield":
            for item in filter(None, (part.strip() for part in value.split(","))):
                if item == "all":
                    returned += sorted(allowed)
                    continue
                keyword = _keyword(item)
                if keyword in allowed:
                    returned.append(keyword)
                else:
                    ignored.append(item)
        else:
            keyword = _keyword(name)
            if keyword in keys or keyword in path:
                raise BadRequest(f"{name} given more than once")
            if keyword in ATTRIBUTES and ATTRIBUTES[keyword].level > level:
                raise BadRequest(f"{name} cannot be matched at the {level.name.lower()} level")
            if keyword not in allowed:
                ignored.append(name)
                continue
            separators = r"[,\\]" if keyword in ATTRIBUTES and ATTRIBUTES[keyword].vr == "UI" else r"\\"
            keys[keyword] = re.split(separators, value)
    for keyword, uid in path.items():
        if not is_valid_uid(uid):
            raise BadRequest(f"{uid[:70]!r} is not a valid UID")
        keys[keyword] = [uid]
    if ignored:
        warnings.append(f"Not supported for matching or return, ignored: {', '.join(ignored)[:512]}")
    for keyword in returned:
        keys.setdefault(keyword, [])
    return Search(Query.build(level, keys), limit, offset, warnings)


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    ranges = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(ranges & {MEDIA_TYPE, "application/json", "application/*", "*/*"})


class QidoService:
    def __init__(self, site: SiteContext) -> None:
        self.site = site
        self.limits = site.config.limits

    def routes(self) -> list[Route]:
        def route(path: str, name: str, level: Level, *, flat: bool) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self.search(request, level, flat=flat)

            return Route(path, endpoint, methods=["GET"], name=name)

        return [
            route("/dicomweb/studies", "search_studies", Level.STUDY, flat=True),
            route("/dicomweb/series", "search_series", Level.SERIES, flat=True),
            route("/dicomweb/instances", "search_instances", Level.IMAGE, flat=True),
            route("/dicomweb/studies/{study}/series", "search_study_series", Level.SERIES, flat=False),
            route("/dicomweb/studies/{study}/instances", "search_study_instances", Level.IMAGE, flat=False),
            route("/dicomweb/studies/{study}/series/{series}/instances", "search_series_instances", Level.IMAGE,
                  flat=False),
        ]

    async def search(self, request: Request, level: Level, *, flat: bool) -> Response:
        started = time.monotonic()
        if not _accepts_json(request.headers.get("accept")):
            return PlainTextResponse(f"only {MEDIA_TYPE} is served", status_code=406)
        path = {
            keyword: request.path_params[param]
            for param, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"))
            if param in request.path_params
        }
        try:
            search = parse_search(level, request.query_params.multi_items(), path, flat=flat, limits=self.limits)
        except (BadRequest, QueryError) as exc:
            self._report(request, None, "refused", 0, str(exc), started)
            return PlainTextResponse(str(exc), status_code=400)
        answers = SiteAnswers(self.site.site.ae_title, str(request.base_url).rstrip("/") + "/dicomweb")
        try:
            results, more = await run_in_threadpool(self._collect, search, answers)
        except ScanBudgetExceeded as exc:
            self._report(request, search.query, "refused", 0, str(exc), started)
            return PlainTextResponse(
                f"the search was too broad: it would read more than {exc.budget} index rows. Add matching keys "
                "that the index can use (PatientID, AccessionNumber, StudyDate, StudyInstanceUID, "
                "ModalitiesInStudy) or a less general wildcard.", status_code=413)
        except Exception as exc:  # driver errors: unavailable, timeouts
            log.exception("QIDO-RS failed while reading the index")
            self._report(request, search.query, "failed", 0, f"index read failed: {type(exc).__name__}", started)
            return PlainTextResponse("unable to read the index; retry later", status_code=503)
        warnings = list(search.warnings)
        if more:
            warnings.append("The number of results exceeded the maximum supported by the server. "
                            "Additional results can be requested.")
        headers = {"Warning": ", ".join(f'299 dicomgrid: "{w}"' for w in warnings)} if warnings else None
        self._report(request, search.query, "success", len(results), "", started)
        body = json.dumps(results, ensure_ascii=False, separators=(",", ":")).encode()
        return Response(body, status_code=200, media_type=MEDIA_TYPE, headers=headers)

    def _collect(self, search: Search, answers: SiteAnswers) -> tuple[list[dict[str, Any]], bool]:
        """One page of matches as DICOM JSON, and whether more matched beyond it."""
        # An engine per request: its scan budget counts this request's rows only.
        engine = QueryEngine(self.site.index, scan_budget=self.limits.query_scan_budget_rows)
        window = islice(engine.find(search.query), search.offset, search.offset + search.limit + 1)
        records = list(window)
        page = [search.query.response(record, answers).to_json_dict() for record in records[: search.limit]]
        return page, len(records) > search.limit

    def _report(
        self, request: Request, query: Query | None, result: str, matches: int, comment: str, started: float
    ) -> None:
        client = f"{request.client.host}:{request.client.port}" if request.client else "unknown"
        described = query.describe() if query else {}
        # The log gets the query's shape (the path may hold UIDs, the query string names and IDs: neither
        # is logged); its key values go to the audit trail only.
        fields = dict(search=path_level(request), client=client, result=result, matches=matches, comment=comment,
                      elapsed_ms=round((time.monotonic() - started) * 1000, 1), **(query.shape() if query else {}))
        if result == "success":
            log.info("qido-rs", **fields)
            outcome = SUCCESS
        else:
            log.warning("qido-rs", **fields)
            outcome = SERIOUS_FAILURE if result == "failed" else MINOR_FAILURE
        self.site.audit.record(
            "E",
            "Query",
            outcome,
            f"QIDO-RS {result}: {matches} matches" + (f"; {comment}" if comment else ""),
            [
                Participant(client, True, None, client, "Source"),
                Participant(self.site.site.name, False, self.site.site.ae_title, None, "Destination"),
            ],
            [
                AuditObject(
                    "query",
                    f"QIDO-RS {request.url.path}",
                    {"protocol": "QIDO-RS", "sop_class_uid": STUDY_ROOT_FIND, "path": request.url.path,
                     "matches": matches, "query_string": request.url.query[:1024], **described},
                ),
                *(query.patient() if query else []),
            ],
        )


# QIDO-RS is audited as the study-root query it is (PS3.18 maps it onto the Q/R information model).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def path_level(request: Request) -> str:
    """What a QIDO-RS request searches (studies, series, instances), without the UIDs of its path."""
    return request.url.path.rstrip("/").rsplit("/", 1)[-1]


def qido_routes(site: SiteContext) -> list[Route]:
    return QidoService(site).routes()
