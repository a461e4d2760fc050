"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` through the same ingest path as C-STORE.

The multipart/related body is parsed as it streams in; each ``application/dicom`` part is spooled to
a file on the site's volume (never held whole in memory) and ingested. The response lists stored and
failed instances in DICOM JSON.

Limits (``[limits]``): a body larger than ``stow_max_request_bytes`` (by its Content-Length, before a
byte is read, or once a chunked body passes it) or with more than ``stow_max_parts`` parts is refused
with 413 and a message saying which limit; a part larger than the site's ``max_instance_bytes`` fails
on its own (0xA702). Parts are ingested only once the whole body has arrived, so a refused request has
stored nothing. Each refusal is logged and audited.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import IO, Any

from python_multipart.multipart import MultipartParser
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicomgrid.core.audit import MINOR_FAILURE, Participant
from dicomgrid.core.config import LimitsConfig
from dicomgrid.core.events import Source
from dicomgrid.core.logging import get_logger
from dicomgrid.core.uids import is_valid_uid
from dicomgrid.producers.ingest import Expected, IngestResult, Ingestor, Outcome
from dicomgrid.producers.store_audit import StoreAudit

log = get_logger(__name__)

DICOM_JSON = "application/dicom+json"
# After a refusal, what is left of the body is read and dropped up to this much, or for this long, so
# the client (which sends its whole body before it reads the answer) gets the 413 rather than a reset
# connection; a client sending more, or dribbling it, is cut off.
DRAIN_BYTES = 4 * 1024**2
DRAIN_S = 5.0


class Refused(Exception):
    """A request beyond one of the limits: answered ``status`` with ``message``, nothing stored."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    file: IO[bytes] | None = None
    size: int = 0
    too_large: bool = False


class _PartCollector:
    """python-multipart callbacks that spool each part to its own temporary file."""

    def __init__(self, spool_dir: Path, max_part_bytes: int, max_parts: int | None = None) -> None:
        self.spool_dir = spool_dir
        self.max_part_bytes = max_part_bytes
        self.max_parts = max_parts
        self.parts: list[_Part] = []
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_part_data": self._data,
        }

    def _begin(self) -> None:
        if self.max_parts is not None and len(self.parts) >= self.max_parts:
            raise Refused(413, f"more than {self.max_parts} parts in one STOW-RS request: send the instances "
                               "in several requests")
        self.parts.append(_Part(file=tempfile.TemporaryFile(dir=self.spool_dir)))

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        if part.size > self.max_part_bytes:
            part.too_large = True
            return
        assert part.file is not None
        part.file.write(data[start:end])

    def close(self) -> None:
        for part in self.parts:
            if part.file is not None:
                part.file.close()


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): v for k, v in msg.get_params()[1:]} if msg.get_params() else {}
    return msg.get_content_type().lower(), params


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def _referenced(result: IngestResult, base_url: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if result.sop_class_uid and is_valid_uid(result.sop_class_uid):
        item["00081150"] = _element("UI", result.sop_class_uid)
    if result.sop_instance_uid and is_valid_uid(result.sop_instance_uid):
        item["00081155"] = _element("UI", result.sop_instance_uid)
    if result.ok and result.study_uid:
        item["00081190"] = _element("UR", f"{base_url}/studies/{result.study_uid}")
    return item


def stow_response(results: list[IngestResult], base_url: str, study_uid: str | None) -> Response:
    """PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored."""
    stored = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    body: dict[str, Any] = {}
    if study_uid:
        body["00081190"] = _element("UR", f"{base_url}/studies/{study_uid}")
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_referenced(r, base_url) for r in stored]}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [{**_referenced(r, base_url), "00081197": _element("US", r.outcome.status)} for r in failed],
        }
    status = 200 if not failed else (202 if stored else 409)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


async def stow(request: Request, ingestor: Ingestor, spool_dir: Path, max_part_bytes: int,
               limits: LimitsConfig | None = None) -> Response:
    """Handle one STOW-RS request."""
    limits = limits or LimitsConfig()
    study_uid = request.path_params.get("study")
    if study_uid is not None and not is_valid_uid(study_uid):
        return _error(400, "study UID in the path is not a valid UID")
    media_type, params = _media_type(request.headers.get("content-type", ""))
    if media_type != "multipart/related":
        return _error(415, "STOW-RS expects multipart/related; type=\"application/dicom\"")
    if params.get("type", "application/dicom").lower() != "application/dicom":
        return _error(415, f"unsupported multipart type {params.get('type')!r}: only application/dicom is accepted")
    boundary = params.get("boundary")
    if not boundary:
        return _error(400, "multipart/related without a boundary")

    peer = f"{request.client.host}:{request.client.port}" if request.client else None
    source = Source("STOW-RS", None, ingestor.site, peer)
    max_body = limits.stow_max_request_bytes
    too_big = f"request body larger than {max_body} bytes: send the instances in several requests"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        # Before a byte is read: a client that sent Expect: 100-continue does not send the body at all.
        return _refuse(ingestor, source, Refused(413, too_big), drain=None)
    collector = _PartCollector(spool_dir, max_part_bytes, limits.stow_max_parts)
    parser = MultipartParser(boundary.encode("latin-1"), collector.callbacks())
    received = 0
    try:
        stream = request.stream()
        try:
            async for chunk in stream:
                received += len(chunk)
                if received > max_body:
                    raise Refused(413, too_big)
                parser.write(chunk)
            parser.finalize()
        except Refused as exc:
            collector.close()  # nothing was ingested yet: the spooled parts go
            return _refuse(ingestor, source, exc, drain=stream)
        if not collector.parts:
            return _error(400, "multipart body has no parts")
        results = []
        # What the request stores is audited in one record (producers.store_audit).
        batch = StoreAudit(ingestor.audit, ingestor.site, source)
        try:
            for part in collector.parts:
                results.append(await run_in_threadpool(_ingest_part, ingestor, part, source, study_uid, batch))
        finally:
            batch.flush()
    except Exception as exc:  # malformed multipart framing, client gone mid-body
        log.warning("stow-rs request rejected", error=str(exc), peer=peer)
        return _error(400, f"malformed multipart body: {exc}")
    finally:
        collector.close()
    base_url = str(request.url_for("dicomweb_root")).rstrip("/")
    return stow_response(results, base_url, study_uid)


class _Drained(Response):
    """A refusal sent once the rest of the body has been read and dropped (up to DRAIN_BYTES / DRAIN_S)."""

    def __init__(self, status: int, message: str, drain: Any) -> None:
        super().__init__(json.dumps({"error": message}), status_code=status, media_type="application/json",
                         headers={"Connection": "close"})
        self.drain = drain

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.drain is not None:
            dropped = 0
            try:
                async with asyncio.timeout(DRAIN_S):
                    async for chunk in self.drain:
                        dropped += len(chunk)
                        if dropped > DRAIN_BYTES:
                            break
            except TimeoutError:
                pass
            except Exception:  # the client gave up: nothing left to answer
                return
        await super().__call__(scope, receive, send)


def _refuse(ingestor: Ingestor, source: Source, refusal: Refused, drain: Any) -> Response:
    """Log, audit and answer a request beyond a limit; the connection is closed after the answer."""
    log.warning("stow-rs request refused", status=refusal.status, reason=refusal.message, peer=source.peer_address)
    ingestor.audit.record(
        "C", "DICOM Instances Transferred", MINOR_FAILURE, f"STOW-RS refused with {refusal.status}: {refusal.message}",
        [
            Participant(source.peer_address or "unknown", True, None, source.peer_address, "Source"),
            Participant(ingestor.site, False, source.called_ae, None, "Destination"),
        ],
    )
    return _Drained(refusal.status, refusal.message, drain)


def _ingest_part(ingestor: Ingestor, part: _Part, source: Source, study_uid: str | None,
                 batch: StoreAudit) -> IngestResult:
    media_type, _ = _media_type(part.headers.get("content-type", "application/dicom"))
    if media_type != "application/dicom":
        return ingestor.report(
            IngestResult(Outcome.MALFORMED, f"part of type {media_type!r} is not application/dicom"), source
        )
    if part.too_large:
        return ingestor.report(IngestResult(Outcome.TOO_LARGE, f"part exceeds {ingestor.max_instance_bytes} bytes"), source)
    assert part.file is not None
    part.file.flush()
    return ingestor.ingest(part.file, source, Expected(study_uid=study_uid), batch)
