"""Storage Commitment Push Model SCP (1.2.840.10008.1.20.1, PS3.4 Annex J) on the site's AE.

A requestor (a PACS, a modality, Orthanc) sends N-ACTION "Request Storage Commitment" naming the
instances it wants the grid to take responsibility for. The site keeps the transaction in Cassandra
(:mod:`dicomgrid.core.commitments`) and answers the N-ACTION at once; the result follows as an
N-EVENT-REPORT on a new association to the requestor, at the address the grid lists for its AE title
in ``[remote_aes]``.

An instance is committed when the index knows it under the SOP class the requestor names and the
replica ledger shows a SHA-256-verified copy of its current payload at ``min_copies`` of the grid's
sites. A transaction is reported once every instance is decided: committed; failed at once with
0x0119 (stored under another SOP class); failed with 0x0112 (not known to the index within
``unknown_grace_s``); or, for instances still short of copies when ``timeout_s`` has passed, failed
with 0x0110.

N-ACTION statuses: 0x0000 accepted; 0x0123 not action type 1; 0x0112 not the well-known SOP
instance; 0x0115 a malformed request (missing or invalid Transaction UID or references); 0x0213 more
than ``max_instances`` references; 0x0110 the requestor is not in ``[remote_aes]`` (no report could
reach it, so the request is refused rather than left to fail unseen), the Transaction UID is in use
for another request, or the transaction store is unavailable.
"""

from __future__ import annotations

import datetime as dt
import queue
import ssl
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential_jitter,
)

from dicomgrid.core.audit import (
    AUDIT_MAX_INSTANCES,
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditObject,
    AuditTrail,
    Participant,
)
from dicomgrid.core.commitments import (
    PENDING,
    REPORTED,
    REPORTING,
    UNDELIVERABLE,
    CommitmentResult,
    Failure,
    InstanceStates,
    Reference,
    StoredState,
    Transaction,
    TransactionStore,
    new_owner_id,
    utcnow,
)
from dicomgrid.core.config import DicomPeer, StorageCommitmentConfig
from dicomgrid.core.dimse import Context, peer_of, set_nodelay
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.tls import remote_ae_tls
from dicomgrid.core.uids import is_valid_uid

log = get_logger(__name__)

AUDIT_EVENT = "Storage Commitment"
REQUEST_COMMITMENT = 1  # Action Type ID, PS3.4 J.3.2.1.1
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type ID, PS3.4 J.3.3.1.1

# N-ACTION statuses (PS3.7 10.1.4.1.10) and Failure Reasons (PS3.4 J.3.3.1.1, Table J.3-2).
SUCCESS_STATUS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213
NOT_AUTHORIZED = 0x0124

REASON_TEXT = {
    PROCESSING_FAILURE: "not at the required number of verified copies in time",
    NO_SUCH_OBJECT_INSTANCE: "no such object instance",
    CLASS_INSTANCE_CONFLICT: "stored under another SOP class",
}


# -- the request ---------------------------------------------------------------------------------


class Refused(Exception):
    """An N-ACTION the site answers with a failure status (and an Error Comment)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    items: tuple[Reference, ...]


def parse_request(
    action_type: int | None,
    requested_instance_uid: str | None,
    action_information: Callable[[], Dataset | None],
    max_instances: int,
) -> CommitmentRequest:
    """Check an N-ACTION Request Storage Commitment (PS3.4 J.3.2.1); raises :class:`Refused`.

    ``action_information`` decodes the request's data set (pydicom decodes lazily, so a malformed
    one fails on first access and is refused like a missing one). Repeated references are kept once.
    """
    if action_type != REQUEST_COMMITMENT:
        raise Refused(NO_SUCH_ACTION, f"action type {action_type} is not Request Storage Commitment (1)")
    if str(requested_instance_uid or "").strip() != StorageCommitmentPushModelInstance:
        raise Refused(NO_SUCH_OBJECT_INSTANCE, "requested SOP instance is not 1.2.840.10008.1.20.1.1")
    try:
        ds = action_information()
        if ds is None:
            raise Refused(INVALID_ARGUMENT_VALUE, "no action information")
        transaction_uid = str(ds.get("TransactionUID", "") or "").strip()
        if not is_valid_uid(transaction_uid):
            raise Refused(INVALID_ARGUMENT_VALUE, "missing or invalid Transaction UID")
        sequence = ds.get("ReferencedSOPSequence") or []
        if len(sequence) == 0:
            raise Refused(INVALID_ARGUMENT_VALUE, "empty or missing Referenced SOP Sequence")
        if len(sequence) > max_instances:
            raise Refused(RESOURCE_LIMITATION, f"more than {max_instances} referenced instances")
        items: dict[Reference, None] = {}
        for number, item in enumerate(sequence, 1):
            sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
            sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
                raise Refused(INVALID_ARGUMENT_VALUE, f"referenced item {number}: missing or invalid UIDs")
            items[Reference(sop_class, sop_instance)] = None
    except Refused:
        raise
    except Exception as exc:
        raise Refused(INVALID_ARGUMENT_VALUE, f"action information cannot be decoded: {type(exc).__name__}") from exc
    return CommitmentRequest(transaction_uid, tuple(items))


# -- deciding ------------------------------------------------------------------------------------

COMMITTED = "committed"
Verdict = str | int | None  # COMMITTED, a Failure Reason, or None: not decided yet


def judge(
    ref: Reference,
    state: StoredState | None,
    *,
    now: dt.datetime,
    requested_at: dt.datetime,
    deadline: dt.datetime,
    unknown_grace: dt.timedelta,
    min_copies: int,
    sites: Collection[str],
) -> Verdict:
    """Whether one referenced instance is committed, has failed (with which reason), or is still open."""
    expired = now >= deadline
    if state is None:
        # The index may not know an instance acknowledged a moment ago (see unknown_grace_s).
        if now < requested_at + unknown_grace and not expired:
            return None
        return NO_SUCH_OBJECT_INSTANCE
    if state.sop_class_uid is not None and state.sop_class_uid != ref.sop_class_uid:
        return CLASS_INSTANCE_CONFLICT
    # Only the grid's own sites count: a ledger row of a site since removed from the config is no copy.
    if state.sop_class_uid is not None and len(state.verified_sites & set(sites)) >= min_copies:
        return COMMITTED
    return PROCESSING_FAILURE if expired else None


def result_of(items: Sequence[Reference], verdicts: Mapping[Reference, Verdict]) -> CommitmentResult:
    """The report's content once every item has a verdict, in the order they were requested."""
    committed = tuple(r for r in items if verdicts[r] == COMMITTED)
    failed = tuple(Failure(r, int(verdicts[r])) for r in items if verdicts[r] != COMMITTED)  # type: ignore[arg-type]
    return CommitmentResult(committed, failed)


def build_report(transaction_uid: str, result: CommitmentResult, retrieve_ae: str) -> tuple[int, Dataset]:
    """Event Type ID and Event Information of the N-EVENT-REPORT (PS3.4 J.3.3.1.1, Table J.3-2)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if result.committed:
        # Where the committed instances can be retrieved from: this site.
        ds.RetrieveAETitle = retrieve_ae
        ds.ReferencedSOPSequence = [_item(r) for r in result.committed]
    if result.failed:
        failed = []
        for f in result.failed:
            item = _item(f.reference)
            item.FailureReason = f.reason
            failed.append(item)
        ds.FailedSOPSequence = failed
    return result.event_type, ds


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


# -- reporting -----------------------------------------------------------------------------------


class ReportNotDelivered(Exception):
    """One attempt to deliver an N-EVENT-REPORT failed (retried)."""


class ReportSender:
    """Sends an N-EVENT-REPORT on a new association from the site's AE to the requestor."""

    def __init__(self, calling_ae: str, timeout_s: float,
                 tls: Callable[[str], tuple[ssl.SSLContext, str] | None] = lambda title: None) -> None:
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        # pynetdicom's tls_args for a requestor AE title (None: plain DICOM).
        self.tls = tls

    def send(self, peer: DicomPeer, called_ae: str, event_type: int, info: Dataset) -> None:
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # The association is opened by the Storage Commitment SCP, so it asks for the SCP role of the SOP
        # class (PS3.4 J.3.3.1.2); without the role selection item strict peers refuse the context.
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        assoc = ae.associate(
            peer.host, peer.port, ae_title=called_ae, ext_neg=[role], evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            tls_args=self.tls(called_ae),
        )
        if assoc.is_rejected:
            raise ReportNotDelivered(f"association rejected by {called_ae}")
        if not assoc.is_established:
            raise ReportNotDelivered(f"no association with {called_ae} at {peer.host}:{peer.port}")
        try:
            if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
                raise ReportNotDelivered(f"{called_ae} did not accept the Storage Commitment context")
            status, _ = assoc.send_n_event_report(
                info, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
            )
        finally:
            if assoc.is_established:
                assoc.release()
        code = status.get("Status") if status is not None else None
        if code is None:
            raise ReportNotDelivered(f"no N-EVENT-REPORT response from {called_ae} (timed out or aborted)")
        if code_to_category(int(code)) not in (STATUS_SUCCESS, STATUS_WARNING):
            raise ReportNotDelivered(f"{called_ae} answered the N-EVENT-REPORT with status 0x{int(code):04X}")


class _Abandoned(Exception):
    """The transaction is no longer this process's to report (lost lease or shutting down)."""


@dataclass
class _Work:
    """An open transaction this process owns, and the verdicts reached so far."""

    tx: Transaction
    verdicts: dict[Reference, Verdict] = field(default_factory=dict)
    delivering: bool = False
    lost: bool = False
    # How delivery ended (state, attempts, note), until the transaction's row says so too.
    outcome: tuple[str, int, str | None] | None = None


class Committer:
    """Works on the open transactions of one site in one receiver process.

    :meth:`step` is one round: look for open transactions without a live owner (every
    ``scan_interval_s``), renew this process's leases, re-check the undecided instances, and hand
    decided transactions to the delivery workers. The receiver runs it on a thread (:meth:`start`).
    """

    def __init__(
        self,
        *,
        site: str,
        ae_title: str,
        store: TransactionStore,
        states: InstanceStates,
        sender: ReportSender,
        audit: AuditTrail,
        settings: StorageCommitmentConfig,
        min_copies: int,
        sites: Collection[str],
        remote_aes: Mapping[str, DicomPeer],
        clock: Callable[[], dt.datetime] = utcnow,
        submit: Callable[[Callable[[], None]], None] | None = None,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.site = site
        self.ae_title = ae_title
        self.store = store
        self.states = states
        self.sender = sender
        self.audit = audit
        self.settings = settings
        self.min_copies = min_copies
        self.sites = frozenset(sites)
        self.remote_aes = remote_aes
        self.clock = clock
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._work: dict[str, _Work] = {}
        self._next_scan: dt.datetime | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._submit = submit or self._jobs.put
        # Backoff waits end early at shutdown.
        self._sleep = sleep or self._stopping.wait
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    # A requestor that does not answer holds a worker through all its attempts and backoff, so there are
    # enough of them that a few such requestors do not hold up everyone else's reports.
    DELIVERY_WORKERS = 16

    def start(self, delivery_workers: int = DELIVERY_WORKERS) -> None:
        self._threads = [threading.Thread(target=self._run, name=f"commitment-{self.site}", daemon=True)]
        self._threads += [
            threading.Thread(target=self._deliveries, name=f"commitment-report-{self.site}-{n}", daemon=True)
            for n in range(delivery_workers)
        ]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop, and give up this process's leases so that another receiver (or the restarted one) takes
        the open transactions over at once."""
        self._stopping.set()
        self._wake.set()
        for _ in self._threads[1:]:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)
        now = self.clock()
        with self._lock:
            owned = list(self._work)
            self._work.clear()
        for uid in owned:
            try:
                self.store.release(uid, now)
            except Exception as exc:  # the lease then runs out by itself
                log.warning("storage commitment lease not released", transaction_uid=uid, error=str(exc))

    def _run(self) -> None:
        while not self._stopping.is_set():
            pause = self.settings.poll_interval_s
            try:
                self.step()
            except Exception as exc:  # Cassandra unreachable: try again, less often
                log.warning("storage commitment round failed; retrying", error=f"{type(exc).__name__}: {exc}")
                pause = self.settings.scan_interval_s
            self._wake.wait(pause)
            self._wake.clear()

    def _deliveries(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    # -- one round -------------------------------------------------------------------------------

    def adopt(self, tx: Transaction) -> None:
        """Take on a transaction this process owns (just accepted, or claimed)."""
        with self._lock:
            self._work[tx.uid] = _Work(tx)
        self._wake.set()

    def owned(self) -> list[str]:
        with self._lock:
            return list(self._work)

    def step(self) -> None:
        now = self.clock()
        if self._next_scan is None or now >= self._next_scan:
            self._next_scan = now + dt.timedelta(seconds=self.settings.scan_interval_s)
            self._scan(now)
        with self._lock:
            work = list(self._work.values())
        for item in work:
            if self._stopping.is_set():
                return
            try:
                self._tend(item, now)
            except Exception as exc:  # this transaction waits for the next round; the others go on
                log.warning("storage commitment check failed; retrying", transaction_uid=item.tx.uid,
                            error=f"{type(exc).__name__}: {exc}")

    def _scan(self, now: dt.datetime) -> None:
        """Claim open transactions whose owner's lease has run out (it died, or shut down)."""
        owned = set(self.owned())
        for entry in self.store.open_entries():
            if entry.transaction_uid in owned:
                continue
            tx = self.store.load(entry.transaction_uid)
            if tx is None:
                # Listed by an N-ACTION that never wrote its transaction (the receiver died in between);
                # a lease's time is long enough for one that is still being written.
                if entry.created_at is None or entry.created_at + self.store.lease < now:
                    self.store.forget(entry.transaction_uid)
                continue
            if tx.finished:
                self.store.forget(tx.uid)
                continue
            if tx.owner == self.store.owner:
                self.adopt(tx)
                continue
            if tx.lease_until is not None and tx.lease_until > now:
                continue
            claimed = self.store.claim(tx, now)
            if claimed is not None:
                log.info("storage commitment taken over", transaction_uid=tx.uid, state=tx.state,
                         previous_owner=tx.owner)
                self.adopt(claimed)

    def _tend(self, item: _Work, now: dt.datetime) -> None:
        tx = item.tx
        lease = self.store.lease
        if tx.lease_until is None or tx.lease_until - now < lease * 2 / 3:
            renewed = self.store.renew(tx.uid, now)
            if renewed is None:
                self._drop(item, "lease lost to another receiver")
                return
            item.tx = tx = replace(tx, lease_until=renewed)
        if item.outcome is not None:
            self._record(item)
        elif tx.state == PENDING:
            self._evaluate(item, now)
        elif tx.state == REPORTING and not item.delivering:
            item.delivering = True
            self._submit(lambda: self._deliver(item))

    def _evaluate(self, item: _Work, now: dt.datetime) -> None:
        tx = item.tx
        undecided = [r for r in tx.items if r not in item.verdicts]
        try:
            states = self.states.lookup(r.sop_instance_uid for r in undecided)
        except Exception as exc:
            log.warning("storage commitment check postponed: index unavailable", transaction_uid=tx.uid,
                        error=str(exc))
            return
        grace = dt.timedelta(seconds=self.settings.unknown_grace_s)
        for ref in undecided:
            verdict = judge(ref, states.get(ref.sop_instance_uid), now=now, requested_at=tx.requested_at,
                            deadline=tx.deadline, unknown_grace=grace, min_copies=self.min_copies, sites=self.sites)
            if verdict is not None:
                item.verdicts[ref] = verdict
        if len(item.verdicts) < len(tx.items):
            return
        result = result_of(tx.items, item.verdicts)
        if not self.store.begin_report(tx.uid, result):
            self._drop(item, "decided by another receiver")
            return
        log.info(
            "storage commitment decided", transaction_uid=tx.uid, committed=len(result.committed),
            failed=len(result.failed), reasons=_reason_counts(result),
            seconds=round((now - tx.requested_at).total_seconds(), 3),
        )
        item.tx = replace(tx, state=REPORTING, result=result)
        item.delivering = True
        self._submit(lambda: self._deliver(item))

    def _drop(self, item: _Work, why: str) -> None:
        item.lost = True
        with self._lock:
            if self._work.get(item.tx.uid) is item:
                del self._work[item.tx.uid]
        log.info("storage commitment no longer ours", transaction_uid=item.tx.uid, reason=why)

    # -- delivery --------------------------------------------------------------------------------

    def _deliver(self, item: _Work) -> None:
        tx = item.tx
        assert tx.result is not None
        peer = self.remote_aes.get(tx.requestor_ae)
        if peer is None:
            # Accepted while the requestor was listed, and the config has changed since.
            self._finish(item, UNDELIVERABLE, 0, f"requestor AE {tx.requestor_ae} is not in remote_aes")
            return
        event_type, info = build_report(tx.uid, tx.result, self.ae_title)
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            if item.lost or self._stopping.is_set():
                raise _Abandoned
            attempts += 1
            self.sender.send(peer, tx.requestor_ae, event_type, info)

        def before_sleep(state: RetryCallState) -> None:
            log.warning(
                "storage commitment report not delivered; retrying", transaction_uid=tx.uid,
                attempt=state.attempt_number, error=str(state.outcome.exception()) if state.outcome else None,
                next_in_s=round(state.upcoming_sleep, 2),
            )

        s = self.settings
        retrying = Retrying(
            stop=stop_after_attempt(s.report_attempts) | stop_when_event_set(self._stopping),
            wait=wait_exponential_jitter(initial=s.report_backoff_initial_s, max=s.report_backoff_max_s,
                                         jitter=s.report_backoff_initial_s),
            retry=retry_if_exception_type(ReportNotDelivered),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(attempt)
        except _Abandoned:
            return
        except ReportNotDelivered as exc:
            if self._stopping.is_set() or item.lost:
                return  # another receiver carries on once the lease is released or runs out
            self._finish(item, UNDELIVERABLE, attempts, str(exc))
            return
        except Exception as exc:
            log.exception("storage commitment report failed unexpectedly", transaction_uid=tx.uid)
            self._finish(item, UNDELIVERABLE, attempts, f"{type(exc).__name__}: {exc}")
            return
        self._finish(item, REPORTED, attempts, None)

    def _record(self, item: _Work) -> None:
        """Write how delivery ended to the transaction's row. Until that succeeds the transaction stays
        with this process, which keeps its lease, so no other receiver delivers the report again."""
        assert item.outcome is not None
        state, attempts, note = item.outcome
        try:
            recorded = self.store.finish(item.tx.uid, state, attempts, self.clock(), note)
        except Exception as exc:
            log.warning("storage commitment outcome not recorded yet; retrying", transaction_uid=item.tx.uid,
                        error=f"{type(exc).__name__}: {exc}")
            return
        if not recorded:
            log.warning("storage commitment outcome not recorded: no longer ours", transaction_uid=item.tx.uid)
        with self._lock:
            if self._work.get(item.tx.uid) is item:
                del self._work[item.tx.uid]

    def _finish(self, item: _Work, state: str, attempts: int, note: str | None) -> None:
        tx = item.tx
        assert tx.result is not None
        now = self.clock()
        item.outcome = (state, attempts, note)
        self._record(item)
        seconds = round((now - tx.requested_at).total_seconds(), 3)
        result = tx.result
        requestor = Participant(tx.requestor_ae, True, tx.requestor_ae, tx.requestor_address, "Requestor")
        peer = self.remote_aes.get(tx.requestor_ae)
        destination = Participant(tx.requestor_ae, False, tx.requestor_ae,
                                  f"{peer.host}:{peer.port}" if peer else None, "Destination")
        objects = report_objects(result)
        if state == REPORTED:
            outcome = SUCCESS if not result.failed else (SERIOUS_FAILURE if not result.committed else MINOR_FAILURE)
            log.info("storage commitment reported", transaction_uid=tx.uid, event_type=result.event_type,
                     committed=len(result.committed), failed=len(result.failed), attempts=attempts,
                     seconds=seconds)
            self.audit.record(
                "E", AUDIT_EVENT, outcome,
                f"N-EVENT-REPORT delivered, transaction {tx.uid}: event type {result.event_type}, "
                f"{len(result.committed)} committed, {len(result.failed)} failed{_reasons_text(result)}",
                [requestor, destination, self.participant()], objects,
            )
        else:
            log.error("storage commitment report not delivered; giving up", transaction_uid=tx.uid,
                      attempts=attempts, error=note, seconds=seconds)
            self.audit.record(
                "E", AUDIT_EVENT, SERIOUS_FAILURE,
                f"N-EVENT-REPORT not delivered after {attempts} attempt(s), transaction {tx.uid}: {note}",
                [requestor, destination, self.participant()], objects,
            )

    def participant(self) -> Participant:
        return Participant(self.site, False, self.ae_title, None, "Application")


def _reason_counts(result: CommitmentResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in result.failed:
        key = f"0x{f.reason:04X}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _reasons_text(result: CommitmentResult) -> str:
    counts = _reason_counts(result)
    if not counts:
        return ""
    return " (" + ", ".join(
        f"{n} x {code} {REASON_TEXT.get(int(code, 16), '')}".rstrip() for code, n in counts.items()
    ) + ")"


def report_objects(result: CommitmentResult) -> list[AuditObject]:
    """Audit objects of a report: each instance with its SOP class and outcome (at most
    :data:`AUDIT_MAX_INSTANCES`)."""
    objects = [
        AuditObject("instance", r.sop_instance_uid, {"sop_class_uid": r.sop_class_uid, "committed": True})
        for r in result.committed
    ]
    objects += [
        AuditObject("instance", f.reference.sop_instance_uid,
                    {"sop_class_uid": f.reference.sop_class_uid, "committed": False,
                     "failure_reason": f"0x{f.reason:04X}"})
        for f in result.failed
    ]
    return objects[:AUDIT_MAX_INSTANCES]


def request_objects(items: Sequence[Reference]) -> list[AuditObject]:
    return [
        AuditObject("instance", r.sop_instance_uid, {"sop_class_uid": r.sop_class_uid})
        for r in items[:AUDIT_MAX_INSTANCES]
    ]


# -- the DIMSE service ---------------------------------------------------------------------------


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    # Error Comment is LO: at most 64 characters, no backslash.
    status.ErrorComment = comment.replace("\\", "/")[:64]
    return status


class StorageCommitmentService:
    """N-ACTION (Request Storage Commitment) on the site's AE; reports come from its :class:`Committer`."""

    def __init__(self, site: SiteContext, *, owner: str | None = None, sender: ReportSender | None = None) -> None:
        self.site = site
        self.settings = site.config.storage_commitment
        self.store = TransactionStore(
            site.db, site.config.name, site.site.name, owner or new_owner_id(), self.settings.lease_s
        )
        self.committer = Committer(
            site=site.site.name,
            ae_title=site.site.ae_title,
            store=self.store,
            states=InstanceStates(site.db),
            sender=sender or ReportSender(
                site.site.ae_title, self.settings.report_timeout_s,
                lambda title: remote_ae_tls(site.config, site.site.name, title),
            ),
            audit=site.audit,
            settings=self.settings,
            min_copies=site.config.min_copies,
            sites=[s.name for s in site.config.sites],
            remote_aes=site.config.remote_aes,
        )

    def contexts(self) -> list[Context]:
        return [Context(StorageCommitmentPushModel, DEFAULT_TRANSFER_SYNTAXES)]

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_N_ACTION, self.on_n_action)]

    def start(self) -> None:
        """Start working on transactions, including the open ones this site already has."""
        self.committer.start()

    def close(self) -> None:
        self.committer.close()

    def on_n_action(self, event: evt.Event) -> tuple[Dataset | int, None]:
        calling_ae, address = peer_of(event)
        requestor = Participant(calling_ae or "unknown", True, calling_ae, address, "Requestor")
        request = event.request
        items: Sequence[Reference] = ()
        try:
            if str(request.RequestedSOPClassUID or "") != StorageCommitmentPushModel:
                raise Refused(0x0118, "not the Storage Commitment Push Model SOP class")
            parsed = parse_request(
                event.action_type, request.RequestedSOPInstanceUID, lambda: event.action_information,
                self.settings.max_instances,
            )
            items = parsed.items
            if not calling_ae or calling_ae not in self.site.config.remote_aes:
                raise Refused(PROCESSING_FAILURE, "calling AE not in remote_aes: no address for the report")
            if not self.site.config.remote_aes[calling_ae].commitment:
                raise Refused(NOT_AUTHORIZED, "calling AE may not request storage commitment")
            tx = self.store.new_transaction(
                parsed.transaction_uid, calling_ae, address, parsed.items, utcnow(), self.settings.timeout_s
            )
            try:
                existing = self.store.open(tx)
            except Exception as exc:
                log.error("storage commitment transaction not kept", error=str(exc))
                raise Refused(PROCESSING_FAILURE, "transaction store unavailable") from exc
            if existing is not None:
                self._repeated(tx, existing)
        except Refused as exc:
            log.warning("storage commitment refused", calling_ae=calling_ae, status=f"0x{exc.status:04X}",
                        reason=exc.comment)
            self.site.audit.record(
                "E", AUDIT_EVENT, MINOR_FAILURE,
                f"N-ACTION refused with 0x{exc.status:04X}: {exc.comment}",
                [requestor, self.committer.participant()], request_objects(items),
            )
            return _status(exc.status, exc.comment), None
        if existing is None:
            self.committer.adopt(tx)
        log.info("storage commitment requested", transaction_uid=tx.uid, calling_ae=calling_ae,
                 instances=len(tx.items), repeated=existing is not None)
        self.site.audit.record(
            "E", AUDIT_EVENT, SUCCESS,
            f"N-ACTION accepted{' again' if existing is not None else ''}, transaction {tx.uid}: "
            f"{len(tx.items)} instance(s) to commit",
            [requestor, self.committer.participant()], request_objects(tx.items),
        )
        return SUCCESS_STATUS, None

    def _repeated(self, tx: Transaction, existing: Transaction) -> None:
        """A second N-ACTION with a Transaction UID already kept: the same request again (the requestor did
        not see the first response) is accepted and reported once; anything else is refused."""
        if not existing.same_request(tx):
            raise Refused(PROCESSING_FAILURE, "Transaction UID already in use for another request")
        if existing.finished:
            raise Refused(PROCESSING_FAILURE, "transaction already reported")
        self.store.reopen(existing)


def storage_commitment_services(site: SiteContext) -> list[StorageCommitmentService]:
    return [StorageCommitmentService(site)]
