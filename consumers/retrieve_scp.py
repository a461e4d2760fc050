"""C-GET and C-MOVE SCP (Patient Root and Study Root retrieve models) on the site's AE.

pynetdicom runs the protocol: pending responses with sub-operation counts, C-CANCEL, the final status and
its Failed SOP Instance UID List, and, for C-MOVE, the association to the destination. The handlers here
decide what matches and which payload each sub-operation sends.

Instances go out exactly as stored: the data set bytes of the stored file, in its stored transfer syntax,
never decoded and re-encoded. pynetdicom's retrieve loop only accepts a ``Dataset`` per sub-operation and
hands it to the association's ``send_c_store``, so the handlers yield a :class:`_SubOperation` placeholder
and each association used for sub-operations gets a ``send_c_store`` that sends the placeholder's verified
payload instead (:func:`_send_stored_payloads`): read once into memory, hashed, and written to the socket
with pre-encoded command sets (:class:`~dicomgrid.core.sub_operations.DirectLink`); payloads too large
for memory, or an association the link cannot drive, are streamed from the verified file by pynetdicom
(``STORE_SEND_CHUNKED_DATASET``).

Failure statuses for bad identifiers: C-GET answers 0xA900 (identifier does not match SOP class) or
0xA701 (index unavailable) with an Error Comment (pynetdicom's loop wants a sub-operation count first, so
the response also reports one failed sub-operation). pynetdicom opens the C-MOVE destination association as
soon as the handler yields a non-zero count, so a C-MOVE that cannot be matched fails before that: the
handler raises and pynetdicom answers 0xC514 (unable to process), leaving the destination untouched.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomgrid.consumers.payloads import Payloads
from dicomgrid.core import metrics
from dicomgrid.core.dicomfile import data_set_offset
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, Participant, audited_patients, transfer_objects
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.tls import remote_ae_tls
from dicomgrid.core.transfer import PayloadUnavailable
from dicomgrid.core.uids import is_valid_uid
from dicomgrid.core.dimse import Context, peer_of, set_nodelay, storage_sop_classes
from dicomgrid.core.sub_operations import DirectLink

log = get_logger(__name__)

PATIENT_ROOT = (PatientRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelMove)
LEVELS = {
    PatientRootQueryRetrieveInformationModelGet: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    PatientRootQueryRetrieveInformationModelMove: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    StudyRootQueryRetrieveInformationModelGet: ("STUDY", "SERIES", "IMAGE"),
    StudyRootQueryRetrieveInformationModelMove: ("STUDY", "SERIES", "IMAGE"),
}
MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1..255
# Verified payloads read ahead of their sub-operation (each at most IN_MEMORY_MAX_BYTES).
READ_AHEAD = 4
MAX_UIDS_PER_KEY = 4096
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_UID_DEPTH = {"PATIENT": 0, "STUDY": 1, "SERIES": 2, "IMAGE": 3}

PENDING, CANCEL = 0xFF00, 0xFE00
IDENTIFIER_MISMATCH, CANNOT_MATCH = 0xA900, 0xA701
_WARNINGS = {0xB000, 0xB006, 0xB007}


class InvalidIdentifier(ValueError):
    """The request identifier cannot be matched as it stands (bad level, keys or UIDs)."""


@dataclass(frozen=True)
class RetrieveRequest:
    """What a C-GET/C-MOVE identifier asks for, checked against its retrieve model."""

    level: str
    patient_id: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v).strip() for v in items]


def _uid_list(ds: Dataset, keyword: str, *, single: bool) -> tuple[str, ...]:
    uids = _values(ds, keyword)
    if not uids:
        raise InvalidIdentifier(f"{keyword} is required at this level")
    if single and len(uids) > 1:
        raise InvalidIdentifier(f"{keyword} must be a single UID above the retrieve level")
    if len(uids) > MAX_UIDS_PER_KEY:
        raise InvalidIdentifier(f"{keyword} lists more than {MAX_UIDS_PER_KEY} UIDs")
    bad = next((u for u in uids if not is_valid_uid(u)), None)
    if bad is not None:
        raise InvalidIdentifier(f"{keyword} {bad[:40]!r} is not a valid UID")
    return tuple(dict.fromkeys(uids))


def parse_identifier(ds: Dataset, model: str) -> RetrieveRequest:
    """Check a retrieve identifier (PS3.4 C.4.2.2.1): unique keys from the top down to the retrieve level.

    The unique key of the retrieve level may list several UIDs; the ones above it are single values. In
    the Patient Root model a PatientID is required at the PATIENT level and, when given below it, narrows
    the match to that patient's studies.
    """
    levels = LEVELS[model]
    try:
        level = str(ds.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in levels:
            raise InvalidIdentifier(f"QueryRetrieveLevel {level[:16]!r} is not one of {', '.join(levels)}")
        patient_ids = _values(ds, "PatientID") if model in PATIENT_ROOT else []
        if level == "PATIENT" and len(patient_ids) != 1:
            raise InvalidIdentifier("PatientID (one value) is required at the PATIENT level")
        if len(patient_ids) > 1:
            raise InvalidIdentifier("PatientID must be a single value")
        depth = _UID_DEPTH[level]
        keys = [_uid_list(ds, name, single=i < depth - 1) for i, name in enumerate(_UID_KEYS[:depth])]
    except InvalidIdentifier:
        raise
    except Exception as exc:  # pydicom decodes lazily; a malformed identifier fails on first access
        raise InvalidIdentifier(f"identifier cannot be decoded: {type(exc).__name__}") from exc
    keys += [()] * (3 - depth)
    return RetrieveRequest(level, patient_ids[0] if patient_ids else None, *keys)


def match(site: SiteContext, request: RetrieveRequest) -> list[StoredInstance]:
    """The instances a checked request names, in study / series / instance order."""
    if request.level == "PATIENT":
        studies = site.index.study_uids_of_patient(request.patient_id)
    else:
        studies = list(request.study_uids)
        if request.patient_id:
            studies = [s for s in studies if (row := site.index.study(s)) and row.patient_id == request.patient_id]
    if request.level in ("PATIENT", "STUDY"):
        return [item for study in studies for item in site.index.find_instances(study)]
    if not studies:
        return []
    (study,) = studies
    if request.level == "SERIES":
        return [item for series in request.series_uids for item in site.index.find_instances(study, series)]
    (series,) = request.series_uids
    return site.index.find_instances(study, series, request.sop_instance_uids)


def storage_contexts(instances: list[StoredInstance]) -> list[PresentationContext]:
    """One context per (SOP class, stored transfer syntax), the most used first, at most 128.

    Instances of any further pair cannot be sent on the association and count as failed sub-operations.
    """
    pairs = Counter((item.sop_class_uid, item.transfer_syntax_uid) for item in instances)
    if len(pairs) > MAX_CONTEXTS:
        log.warning("more (SOP class, transfer syntax) pairs than one association can carry",
                    pairs=len(pairs), sent=MAX_CONTEXTS)
    return [build_context(sop_class, ts) for (sop_class, ts), _ in pairs.most_common(MAX_CONTEXTS)]


class _ReadAhead:
    """The verified payloads of the coming sub-operations, read by a worker thread while the current
    one waits for its response (reading and hashing release the interpreter).

    At most :data:`READ_AHEAD` payloads wait in memory. Results come back in the order of the
    instances, failures included (:meth:`Payloads.verified_bytes` raises where the sub-operation would).
    """

    def __init__(self, payloads: Payloads, instances: list[StoredInstance]) -> None:
        self._payloads = payloads
        self._ready: queue.Queue[tuple[StoredInstance, bytes | None, Exception | None]] = queue.Queue(READ_AHEAD)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(instances,), name="retrieve-read-ahead", daemon=True)
        self._thread.start()

    def _run(self, instances: list[StoredInstance]) -> None:
        for item in instances:
            if self._stopped.is_set():
                return
            try:
                result = (item, self._payloads.verified_bytes(item), None)
            except Exception as exc:  # handed to the sub-operation, which fails as it would have itself
                result = (item, None, exc)
            while not self._stopped.is_set():
                try:
                    self._ready.put(result, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def take(self, item: StoredInstance) -> bytes | None:
        """The verified bytes of ``item`` (None: too large for memory); raises what reading it raised."""
        while self._thread.is_alive() or not self._ready.empty():
            try:
                got, data, error = self._ready.get(timeout=0.1)
            except queue.Empty:
                continue
            if got is not item:
                continue  # a sub-operation pynetdicom did not send (the association ended)
            if error is not None:
                raise error
            return data
        return self._payloads.verified_bytes(item)

    def close(self) -> None:
        self._stopped.set()


_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018


class _SubOperation(Dataset):
    """The placeholder yielded for one C-STORE sub-operation (see the module docstring).

    It carries the SOP Class and Instance UIDs (pynetdicom lists failed instances by them) and, as plain
    attributes, the stored instance, the C-MOVE requestor's AE title and the sub-operation's outcome.
    """

    def __init__(self, instance: StoredInstance, move_originator: str | None,
                 read_ahead: "_ReadAhead | None" = None) -> None:
        super().__init__()
        # Checked when they were stored: their elements are made without validating them again, which
        # cost most of making the placeholder.
        self[_SOP_CLASS_UID] = DataElement(_SOP_CLASS_UID, "UI", instance.sop_class_uid, validation_mode=config.IGNORE)
        self[_SOP_INSTANCE_UID] = DataElement(_SOP_INSTANCE_UID, "UI", instance.sop_instance_uid,
                                              validation_mode=config.IGNORE)
        self._instance = instance
        self._move_originator = move_originator
        self._read_ahead = read_ahead
        self._outcome = "failed"

    @property
    def outcome(self) -> str:
        return self._outcome

    def send(self, send_c_store: Callable[..., Dataset], payloads: Payloads, msg_id: int = 1, priority: int = 2,
             originator_aet: str | None = None, originator_id: int | None = None) -> Dataset:
        item = self._instance
        link: DirectLink | None = getattr(send_c_store, "link", None)
        if self._move_originator:
            # PS3.7 9.3.1.1: the AE that invoked the C-MOVE (pynetdicom would name the site's own AE).
            originator_aet = self._move_originator
        try:
            if self._read_ahead is not None:
                data = self._read_ahead.take(item)
            else:
                data = payloads.verified_bytes(item) if link is not None else None
            if link is None:
                data = None
            path = payloads.local_path(item) if data is None else None
        except PayloadUnavailable as exc:
            log.error("sub-operation has no payload to send", sop_instance_uid=item.sop_instance_uid, error=str(exc))
            raise
        status = None
        if data is not None and link is not None:
            status = link.send_c_store(
                memoryview(data)[data_set_offset(data):], item.sop_class_uid, item.sop_instance_uid,
                item.transfer_syntax_uid, msg_id, priority=priority, move_originator_aet=originator_aet,
                move_originator_id=originator_id,
            )
        if status is None:
            status = send_c_store(path or payloads.blobs.path(item.sha256), msg_id=msg_id, priority=priority,
                                  originator_aet=originator_aet, originator_id=originator_id)
        code = status.get("Status")
        self._outcome = "completed" if code == 0 else "warning" if code in _WARNINGS else "failed"
        return status


# pynetdicom's DUL thread sleeps this long whenever it finds nothing to do (its default is 1 ms). Every
# C-STORE sub-operation is a round trip through that thread twice, so while sub-operations run the
# sleep is cut short; an idle association keeps the default and its low CPU use.
SUB_OPERATION_LOOP_DELAY_S = 0.0001


@contextmanager
def _responsive(assoc: Association) -> Iterator[None]:
    dul = assoc.dul
    idle_delay = getattr(dul, "_run_loop_delay", None)
    if idle_delay is None:  # not this pynetdicom: leave it alone
        yield
        return
    dul._run_loop_delay = min(idle_delay, SUB_OPERATION_LOOP_DELAY_S)
    try:
        yield
    finally:
        dul._run_loop_delay = idle_delay


class _StoreSender:
    """An association's own ``send_c_store`` (sub-operations that send a file of their own call it), and
    the direct link the plain stored-payload sub-operations use instead when there is one."""

    def __init__(self, send_c_store: Callable[..., Dataset], link: DirectLink | None) -> None:
        self._send_c_store = send_c_store
        self.link = link

    def __call__(self, *args: Any, **kwargs: Any) -> Dataset:
        return self._send_c_store(*args, **kwargs)


def _send_stored_payloads(assoc: Association, payloads: Payloads) -> bool:
    """Make ``assoc.send_c_store`` send a :class:`_SubOperation`'s payload as stored (once per association);
    True when it sends over a :class:`DirectLink`."""
    if getattr(assoc, "_sends_stored_payloads", False):
        return getattr(assoc, "_direct_link", None) is not None
    assoc._sends_stored_payloads = True  # type: ignore[attr-defined]
    send_c_store = assoc.send_c_store
    link = DirectLink.of(assoc)
    sender = _StoreSender(send_c_store, link)

    def send(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, _SubOperation):
            return dataset.send(sender, payloads, *args, **kwargs)
        return send_c_store(dataset, *args, **kwargs)

    assoc.send_c_store = send  # type: ignore[method-assign]
    return link is not None


@dataclass
class _Transfer:
    """One retrieve request: its sub-operation tally and its audit records (begin, then exactly one end)."""

    service: "RetrieveService"
    operation: str
    participants: list[Participant]
    instances: list[StoredInstance]
    move_originator: str | None = None
    tally: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished: bool = False

    def begin(self) -> None:
        self.objects = transfer_objects(self.instances, audited_patients(self.service.site, self.instances))
        self.service.site.audit.record(
            "E", "Begin Transferring DICOM Instances", SUCCESS,
            f"{self.operation}: {len(self.instances)} instance(s) to send",
            self.participants, self.objects,
        )

    def finish(self, how: str) -> None:
        if self.finished:
            return
        self.finished = True
        done, failed = self.tally["completed"] + self.tally["warning"], self.tally["failed"]
        outcome = SUCCESS if how == "completed" and not failed else (
            SERIOUS_FAILURE if how == "completed" and not done else MINOR_FAILURE
        )
        seconds = time.monotonic() - self.started
        summary = (f"{self.operation} {how}: {self.tally['completed']} completed, {self.tally['warning']} warning, "
                   f"{failed} failed, {len(self.instances) - sum(self.tally.values())} not attempted")
        log.info("retrieve finished", operation=self.operation, how=how, seconds=round(seconds, 3), **self.tally)
        self.service.site.audit.record(
            "R", "DICOM Instances Transferred", outcome, summary, self.participants,
            getattr(self, "objects", None) or transfer_objects(self.instances)
        )


class RetrieveService:
    """C-GET and C-MOVE for one site; storage contexts accept SCP/SCU role selection for C-GET."""

    def __init__(self, site: SiteContext, payloads: Payloads | None = None) -> None:
        self.site = site
        self.payloads = payloads or Payloads(site)

    def contexts(self) -> list[Context]:
        # A C-GET requestor takes the SCP role for the storage classes it wants to receive; without
        # accepting that role selection the site could not send it anything on the same association.
        # The storage service declares the same contexts: pynetdicom merges contexts by abstract syntax
        # and keeps the roles given last, so both declare the roles and the order they are added in
        # does not matter.
        retrieve = [Context(uid) for uid in LEVELS]
        storage = [Context(uid, scu_role=True, scp_role=True) for uid in storage_sop_classes()]
        return [*retrieve, *storage]

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_C_GET, metrics.timed_handler(self.site.site.name, "C-GET", self.on_get)),
            (evt.EVT_C_MOVE, metrics.timed_handler(self.site.site.name, "C-MOVE", self.on_move)),
        ]

    # -- C-GET ----------------------------------------------------------------------------------

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        calling_ae, address = peer_of(event)
        requestor = Participant(calling_ae or "unknown", True, calling_ae, address, "Destination")
        try:
            instances = self._match(event)
        except InvalidIdentifier as exc:
            self._refused("C-GET", str(exc), [requestor])
            # pynetdicom wants the number of sub-operations before any status.
            yield 1
            yield _status(IDENTIFIER_MISMATCH, str(exc))
            return
        except Exception as exc:  # index unreachable
            self._refused("C-GET", f"index unavailable: {exc}", [requestor])
            yield 1
            yield _status(CANNOT_MATCH, "index unavailable")
            return
        _send_stored_payloads(event.assoc, self.payloads)
        yield len(instances)
        yield from self._sub_operations(event, self._transfer("C-GET", [requestor, self._source()], instances))

    # -- C-MOVE ---------------------------------------------------------------------------------

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        calling_ae, address = peer_of(event)
        requestor = Participant(calling_ae or "unknown", True, calling_ae, address, "Requestor")
        title = (event.move_destination or "").strip()
        peer = self.site.config.remote_aes.get(title)
        if peer is None:
            self._refused("C-MOVE", f"unknown move destination {title[:16]!r}", [requestor])
            yield None, None  # pynetdicom answers 0xA801 (move destination unknown)
            return
        if peer.move_requestors is not None and (calling_ae or "") not in peer.move_requestors:
            # As for an unknown destination: to this requestor, the destination does not exist.
            self._refused("C-MOVE", f"calling AE may not move instances to {title!r}", [requestor])
            log.warning("c-move refused: destination not allowed for the calling AE", calling_ae=calling_ae,
                        destination=title)
            yield None, None
            return
        destination = Participant(title, False, title, f"{peer.host}:{peer.port}", "Destination")
        try:
            instances = self._match(event)
        except Exception as exc:
            self._refused("C-MOVE", str(exc), [requestor, destination])
            log.warning("c-move refused", reason=str(exc), calling_ae=calling_ae)
            raise
        options: dict[str, Any] = {
            "contexts": storage_contexts(instances),
            "evt_handlers": [(evt.EVT_CONN_OPEN, self._on_destination_open)],
        }
        tls = remote_ae_tls(self.site.config, self.site.site.name, title)
        if tls is not None:
            options["tls_args"] = tls
        yield peer.host, peer.port, options
        yield len(instances)
        participants = [requestor, destination, self._source()]
        yield from self._sub_operations(event, self._transfer(f"C-MOVE to {title}", participants, instances, calling_ae))

    def _on_destination_open(self, event: evt.Event) -> None:
        set_nodelay(event)
        if not _send_stored_payloads(event.assoc, self.payloads):
            # This association exists only for the sub-operations, and they go through the DUL thread.
            event.assoc.dul._run_loop_delay = SUB_OPERATION_LOOP_DELAY_S

    # -- shared ---------------------------------------------------------------------------------

    def _transfer(self, operation: str, participants: list[Participant], instances: list[StoredInstance],
                  move_originator: str | None = None) -> _Transfer:
        return _Transfer(self, operation, participants, instances, move_originator)

    def _match(self, event: evt.Event) -> list[StoredInstance]:
        model = event.context.abstract_syntax
        try:
            identifier = event.identifier
        except Exception as exc:
            raise InvalidIdentifier(f"identifier cannot be decoded: {type(exc).__name__}") from exc
        return match(self.site, parse_identifier(identifier, model))

    def _sub_operations(self, event: evt.Event, transfer: _Transfer) -> Iterator[Any]:
        transfer.begin()
        # C-GET sends on the requestor's own association; C-MOVE's destination is set in its open handler.
        # Sub-operations sent over a direct link do not go through the DUL thread: its polling would
        # only compete with them for the interpreter.
        direct = getattr(event.assoc, "_direct_link", None) is not None
        responsive = _responsive(event.assoc) if transfer.operation == "C-GET" and not direct else nullcontext()
        try:
            with responsive:
                yield from self._each_sub_operation(event, transfer)
        finally:
            transfer.finish("aborted")

    def _each_sub_operation(self, event: evt.Event, transfer: _Transfer) -> Iterator[Any]:
        # C-MOVE's destination association (and its link) opens after this starts: read ahead for it too.
        direct = getattr(event.assoc, "_direct_link", None) is not None
        read_ahead = _ReadAhead(self.payloads, transfer.instances) if direct or transfer.operation != "C-GET" else None
        try:
            for item in transfer.instances:
                if event.is_cancelled:
                    transfer.finish("cancelled")
                    yield CANCEL, None
                    return
                sub = _SubOperation(item, transfer.move_originator, read_ahead)
                yield PENDING, sub
                transfer.tally[sub.outcome] += 1
            transfer.finish("completed")
        finally:
            if read_ahead is not None:
                read_ahead.close()

    def _refused(self, operation: str, reason: str, participants: list[Participant]) -> None:
        self.site.audit.record(
            "R", "DICOM Instances Transferred", MINOR_FAILURE, f"{operation} refused: {reason}",
            [*participants, self._source()],
        )

    def _source(self) -> Participant:
        me = self.site.site
        return Participant(me.name, False, me.ae_title, None, "Source")


def _status(code: int, comment: str) -> tuple[Dataset, None]:
    status = Dataset()
    status.Status = code
    # Error Comment is LO: at most 64 characters, no backslash.
    status.ErrorComment = comment.replace("\\", "/")[:64]
    return status, None


def retrieve_services(site: SiteContext) -> list[RetrieveService]:
    return [RetrieveService(site)]
