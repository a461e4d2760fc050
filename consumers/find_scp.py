"""The C-FIND SCP of a site: Patient Root and Study Root query, answered from the index.

The handler is a generator: pynetdicom sends each pending response (0xFF00, or 0xFF01 when the
identifier held keys the index does not support, which are answered empty) as it is produced, so
results stream page by page from Cassandra. A C-CANCEL is honoured (0xFE00) as soon as it is seen,
between two matches or between two rows of a scan that finds few.
A refused identifier gets a failure status with an ErrorComment (see dicomgrid.consumers.query); a
query that reads more index rows than ``[limits] query_scan_budget_rows`` ends with 0xA700 (out of
resources), its ErrorComment saying it was too broad.
Every query, whatever its outcome, leaves a log line and an audit record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, evt

from dicomgrid.consumers.query import (
    INDEX_UNAVAILABLE,
    MODEL_LEVELS,
    UNABLE_TO_PROCESS,
    Query,
    QueryCancelled,
    QueryEngine,
    QueryError,
    ScanBudgetExceeded,
    SiteAnswers,
)
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core import metrics
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.dimse import Context, peer_of

log = get_logger(__name__)

PENDING, PENDING_WARNING, CANCEL = 0xFF00, 0xFF01, 0xFE00


def failure(status: int, comment: str, tag: int | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # ErrorComment is LO: at most 64 characters, no backslash.
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    if tag is not None:
        ds.OffendingElement = [tag]
    return ds


# Matches waiting to be sent on one association. pynetdicom queues every pending response for its
# network thread, so without a bound a handler races ahead of the peer: a huge result set would sit in
# memory, and a C-CANCEL would arrive only after every match had been queued.
MAX_QUEUED_RESPONSES = 8


def _await_send_window(event: evt.Event, cancelled: Callable[[], bool]) -> None:
    """Hold the next match until the peer has taken most of the queued ones (or the query is over)."""
    queue = event.assoc.dul.to_provider_queue
    while queue.qsize() > MAX_QUEUED_RESPONSES and event.assoc.is_established and not cancelled():
        time.sleep(0.0005)


class _Cancellation:
    """C-CANCEL seen for this C-FIND? pynetdicom reports a cancel only once, so the answer is latched."""

    def __init__(self, event: evt.Event) -> None:
        self.event = event
        self.seen = False

    def __call__(self) -> bool:
        self.seen = self.seen or self.event.is_cancelled
        return self.seen


@dataclass
class _Outcome:
    """How one C-FIND ended; ``aborted`` until the handler says otherwise (the peer went away)."""

    result: str = "aborted"
    matches: int = 0
    comment: str = ""
    identifier: Dataset | None = None
    query: Query | None = None
    started: float = field(default_factory=time.monotonic)


class FindService:
    """C-FIND under the Patient Root and Study Root information models."""

    def __init__(self, site: SiteContext) -> None:
        self.site = site
        self.answers = SiteAnswers(
            site.site.ae_title, f"http://{site.site.http_host}:{site.site.http_port}/dicomweb"
        )

    def contexts(self) -> list[Context]:
        return [Context(model, tuple(DEFAULT_TRANSFER_SYNTAXES)) for model in MODEL_LEVELS]

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_C_FIND, metrics.timed_handler(self.site.site.name, "C-FIND", self.on_find))]

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        outcome = _Outcome()
        try:
            yield from self._answer(event, outcome)
        finally:
            self._report(event, outcome)

    def _answer(self, event: evt.Event, outcome: _Outcome) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        try:
            outcome.identifier = self._identifier(event)
            query = outcome.query = Query.from_identifier(outcome.identifier, event.request.AffectedSOPClassUID)
        except QueryError as exc:
            outcome.result, outcome.comment = "refused", f"0x{exc.status:04X} {exc.comment}"
            yield failure(exc.status, exc.comment, exc.tag), None
            return
        pending = PENDING_WARNING if query.unsupported else PENDING
        cancelled = _Cancellation(event)
        try:
            answers = self._answers(event)
            for record in self._engine(event, cancelled).find(query):
                if cancelled():
                    raise QueryCancelled
                yield pending, query.response(record, answers)
                outcome.matches += 1
                _await_send_window(event, cancelled)
        except QueryCancelled:
            outcome.result = "cancelled"
            yield CANCEL, None
            return
        except ScanBudgetExceeded as exc:
            # The matches sent so far stand; the final status says the rest was not looked for.
            outcome.result, outcome.comment = "refused", f"0x{exc.status:04X} {exc.comment}"
            yield failure(exc.status, exc.comment), None
            return
        except Exception as exc:  # driver errors (unavailable, timeouts) surface while paging
            log.exception("C-FIND failed while reading the index")
            outcome.result, outcome.comment = "failed", f"index read failed: {type(exc).__name__}"
            yield failure(INDEX_UNAVAILABLE, "unable to read the index; retry later"), None
            return
        outcome.result = "success"

    # What a subclass serving another called AE title (a trial) answers from, and as whom.
    def _engine(self, event: evt.Event, cancelled: Callable[[], bool]) -> Any:
        return QueryEngine(self.site.index, cancelled, scan_budget=self.site.config.limits.query_scan_budget_rows)

    def _answers(self, event: evt.Event) -> SiteAnswers:
        return self.answers

    def _destination(self, event: evt.Event) -> Participant:
        return Participant(self.site.site.name, False, self.site.site.ae_title, None, "Destination")

    @staticmethod
    def _identifier(event: evt.Event) -> Dataset:
        try:
            return event.identifier
        except Exception as exc:  # undecodable bytes: pydicom raises many types
            raise QueryError(UNABLE_TO_PROCESS, f"identifier cannot be decoded: {type(exc).__name__}") from exc

    def _report(self, event: evt.Event, outcome: _Outcome) -> None:
        calling_ae, peer = peer_of(event)
        elapsed_ms = round((time.monotonic() - outcome.started) * 1000, 1)
        if outcome.query is not None:
            query, shape, patient = outcome.query.describe(), outcome.query.shape(), outcome.query.patient()
        else:
            query = {"identifier": _summary(outcome.identifier)} if outcome.identifier is not None else {}
            shape, patient = {}, []
        # The log gets the query's shape; its key values (names, IDs) go to the audit trail only.
        fields = dict(calling_ae=calling_ae, peer=peer, result=outcome.result, matches=outcome.matches,
                      elapsed_ms=elapsed_ms, comment=outcome.comment, **shape)
        if outcome.result in ("success", "cancelled"):
            log.info("c-find", **fields)
            audit_outcome = SUCCESS
        else:
            log.warning("c-find", **fields)
            audit_outcome = SERIOUS_FAILURE if outcome.result == "failed" else MINOR_FAILURE
        model = str(event.request.AffectedSOPClassUID)
        self.site.audit.record(
            "E",
            "Query",
            audit_outcome,
            f"C-FIND {outcome.result}: {outcome.matches} matches" + (f"; {outcome.comment}" if outcome.comment else ""),
            [
                Participant(calling_ae or "unknown", True, calling_ae, peer, "Source"),
                self._destination(event),
            ],
            [AuditObject("query", model, {"protocol": "DIMSE", "matches": outcome.matches, **query}), *patient],
        )


def _summary(identifier: Dataset, limit: int = 64) -> dict[str, str]:
    """What a refused identifier asked for, shortened, for the audit trail."""
    out = {}
    for elem in list(identifier.keys())[:limit]:
        try:
            data = identifier[elem]
            out[data.keyword or str(data.tag)] = str(data.value)[:256]
        except Exception:  # the very values that made the query fail may not decode
            out[str(elem)] = "<undecodable>"
    return out


def find_services(site: SiteContext) -> list[FindService]:
    return [FindService(site)]
