"""A site's DICOM application entity: one AE title and port, several services.

Services plug in by offering presentation contexts and event handlers (see :class:`DimseService`):
storage (``producers``) and query/retrieve (``consumers``) share the association, as a PACS expects.
"""

from __future__ import annotations

import copy
import enum
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt, register_uid
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, N_EVENT_REPORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicomgrid.core import ul
from dicomgrid.core.audit import MINOR_FAILURE, AuditTrail, Participant
from dicomgrid.core.config import ConnectionLimits, GridConfig, LimitsConfig
from dicomgrid.core.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgrid.core.logging import get_logger
from dicomgrid.core.spool import ReceiveSpool
from dicomgrid.core.tls import certificate_identities, certificate_speaks_for, dicom_server_context

log = get_logger(__name__)

# Each received PDU is held in memory whole; this bounds it while keeping per-PDU overhead low.
MAX_PDU_BYTES = 256 * 1024
# pynetdicom's own association limit counts every acceptor thread, negotiated or not, so an attacker's
# idle sockets would exhaust it; the site's server applies ``connections.max_associations`` to
# negotiated associations instead and leaves pynetdicom's limit out of reach.
_PYNETDICOM_ASSOCIATION_LIMIT = 1_000_000
# An A-ASSOCIATE-RQ longer than this is left to pynetdicom to read (128 contexts of 40 transfer
# syntaxes each come to ~120 KiB).
_MAX_REQUEST_BYTES = 1024 * 1024
# How often the server looks for pending connections past their deadline and for spool leftovers.
SPOOL_SWEEP_INTERVAL_S = 30.0

_STORAGE_BRANCH = "1.2.840.10008.5.1.4.1.1."


def _register_unlisted_storage_classes() -> list[str]:
    """Storage SOP classes pydicom knows and pynetdicom does not list (mostly retired ones).

    Archives hold images from modalities decades old: retired Ultrasound (``...1.1.6``), Nuclear
    Medicine, X-Ray Bi-plane, the trial SR classes. pynetdicom leaves them out of its storage service,
    so a site would refuse their presentation contexts; they are registered with it here, under
    pydicom's keywords. Ingest still refuses any that lack the UIDs the grid files instances under.
    """
    added = []
    for uid, (name, kind, _info, _retired, keyword) in UID_dictionary.items():
        if kind != "SOP Class" or not uid.startswith(_STORAGE_BRANCH) or "Storage" not in name or not keyword:
            continue
        if uid_to_service_class(uid) is ServiceClass:
            register_uid(uid, keyword, StorageServiceClass)
            added.append(uid)
    return added


UNLISTED_STORAGE_CLASSES = _register_unlisted_storage_classes()


def storage_sop_classes() -> list[str]:
    """Every storage SOP class a site stores and sends (C-STORE, and C-GET/C-MOVE sub-operations)."""
    return [cx.abstract_syntax for cx in AllStoragePresentationContexts] + UNLISTED_STORAGE_CLASSES


# Which service of the site AE an abstract syntax belongs to, for per-service allow-lists; storage SOP
# classes are "storage" (see service_of). Verification and anything else are open to every allowed AE.
_SERVICE_OF = {
    PatientRootQueryRetrieveInformationModelFind: "query",
    StudyRootQueryRetrieveInformationModelFind: "query",
    PatientRootQueryRetrieveInformationModelGet: "retrieve",
    StudyRootQueryRetrieveInformationModelGet: "retrieve",
    PatientRootQueryRetrieveInformationModelMove: "retrieve",
    StudyRootQueryRetrieveInformationModelMove: "retrieve",
    StorageCommitmentPushModel: "commitment",
}
# The DIMSE requests of each service (the primitive's class name).
_SERVICE_OF_REQUEST = {"C_STORE": "storage", "C_FIND": "query", "C_GET": "retrieve", "C_MOVE": "retrieve",
                       "N_ACTION": "commitment"}
# PS3.7 C.5: "Refused: Not Authorized".
NOT_AUTHORIZED = 0x0124


def service_of(abstract_syntax: str) -> str | None:
    """The site AE service an abstract syntax belongs to (None: open to every allowed calling AE)."""
    if abstract_syntax in _SERVICE_OF:
        return _SERVICE_OF[abstract_syntax]
    return "storage" if abstract_syntax.startswith(_STORAGE_BRANCH) else None


@dataclass(frozen=True)
class Context:
    """A presentation context a service accepts (``scu_role`` for C-GET's storage sub-operations)."""

    abstract_syntax: str
    transfer_syntaxes: Sequence[str] = tuple(ALL_TRANSFER_SYNTAXES)
    scu_role: bool | None = None
    scp_role: bool | None = None


class DimseService(Protocol):
    def contexts(self) -> list[Context]: ...

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]: ...


class _CheapCopyContext(PresentationContext):
    """A supported presentation context that copies in microseconds.

    pynetdicom deep-copies the server's supported contexts for every association. For a site's ~190
    contexts of ~45 transfer syntaxes each that took ~40 ms with the GIL held, per association. The only
    state a context's copy needs of its own is its list of transfer syntaxes (UIDs are immutable).
    """

    @classmethod
    def of(cls, context: PresentationContext) -> "_CheapCopyContext":
        cheap = cls()
        cheap.__dict__.update(vars(context))
        return cheap

    def __deepcopy__(self, memo: dict[int, Any]) -> "_CheapCopyContext":
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def set_nodelay(event: evt.Event) -> None:
    # Without TCP_NODELAY every DIMSE response waits on the peer's delayed ACK.
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def prefer_requested_syntaxes(event: evt.Event) -> None:
    """Accept, in each presentation context, the transfer syntax the requestor prefers.

    pynetdicom accepts the first syntax of the *acceptor's* list that the requestor proposed, which is
    Implicit VR Little Endian whenever offered. The grid never transcodes, so that choice would make
    senders convert their native encoding before a C-STORE, and would give a C-GET requestor that
    proposes one context per SOP class (DCMTK getscu) only the implicit-VR instances. Following the
    requestor's order keeps every instance in the encoding its sender chose.
    """
    preference: dict[str, list[str]] = {}
    for proposed in event.assoc.requestor.primitive.presentation_context_definition_list:
        preference.setdefault(proposed.abstract_syntax, []).extend(proposed.transfer_syntax)
    contexts = event.assoc.acceptor.supported_contexts
    for context in contexts:
        order = preference.get(context.abstract_syntax)
        if order:
            rank: dict[str, int] = {}
            for position, ts in enumerate(order):
                rank.setdefault(ts, position)
            reordered = sorted(context.transfer_syntax, key=lambda ts: rank.get(ts, len(order)))
            if hasattr(context, "_transfer_syntax"):
                # The same UIDs, validated when the site's contexts were built: pynetdicom's setter
                # would validate each again (a regular expression per UID, ~190 contexts of ~45
                # syntaxes for every association).
                context._transfer_syntax = reordered
            else:
                context.transfer_syntax = reordered
    event.assoc.acceptor.supported_contexts = contexts


def requested_calling_ae(assoc: Association) -> str:
    """The calling AE title of an association request; at EVT_REQUESTED pynetdicom has not copied it to
    ``assoc.requestor.ae_title`` yet."""
    primitive = assoc.requestor.primitive
    title = getattr(primitive, "calling_ae_title", None) or assoc.requestor.ae_title or ""
    return title.strip()


def peer_of(event: evt.Event) -> tuple[str | None, str]:
    """(calling AE title, "host:port") of the association's requestor."""
    requestor = event.assoc.requestor
    # An association rejected as it is requested has no ae_title yet: its A-ASSOCIATE-RQ names it.
    return (requestor.ae_title or _calling_ae(event.assoc) or None), f"{requestor.address}:{requestor.port}"


# -- requests pynetdicom cannot decode ---------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A DIMSE request the site could not decode: what it was, what was wrong, what the peer got."""

    command: str | None  # "C-STORE", ...; None when the command set itself cannot be decoded
    field: str | None  # keyword of the offending command element
    reason: str  # what is wrong, never the value itself: logs and audit records do not echo peer input
    status: int | None  # the failure status answered, or None when the association was aborted


# Command Field -> (name, response primitive, default failure status, failure status per offending field).
# PS3.4: C-STORE 0xCxxx "cannot understand" (0xC001 is the grid's "missing or invalid UID", as for an
# invalid UID in the data set); C-FIND, C-GET, C-MOVE 0xCxxx "unable to process" (0xC000, the
# query engine's value for a malformed value) and C-MOVE 0xA801 "move destination unknown"; C-ECHO
# has only the general 0x0212 "mistyped argument" (PS3.7 C.5.2). C-CANCEL has no response.
_ANSWERABLE: dict[int, tuple[str, type[Any] | None, int, dict[str, int]]] = {
    0x0001: ("C-STORE", C_STORE, 0xC000, {"AffectedSOPClassUID": 0xC001, "AffectedSOPInstanceUID": 0xC001}),
    0x0020: ("C-FIND", C_FIND, 0xC000, {}),
    0x0010: ("C-GET", C_GET, 0xC000, {}),
    0x0021: ("C-MOVE", C_MOVE, 0xC000, {"MoveDestination": 0xA801}),
    0x0030: ("C-ECHO", C_ECHO, 0x0212, {}),
    0x0FFF: ("C-CANCEL", None, 0, {}),
}
_VALUE_LIMITS = {"UI": (64, "UID"), "AE": (16, "AE title")}


def _what_is_wrong(keyword: str, value: Any) -> str:
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        vr = ""
    if vr in _VALUE_LIMITS:
        limit, name = _VALUE_LIMITS[vr]
        if isinstance(value, (str, bytes)) and len(value.strip()) > limit:
            return f"longer than {limit} characters"
        return f"not a valid {name}"
    return "not a valid value"


def _offending_field(primitive: Any, message: DIMSEMessage) -> tuple[str, int, str]:
    """The command element pynetdicom refused to put in ``primitive``: (keyword, tag, what is wrong).

    Mirrors the loop of ``DIMSEMessage.message_to_primitive``, one element at a time.
    """
    for elem in message.command_set:
        if not hasattr(primitive, elem.keyword):
            continue
        try:
            value = elem.value
        except Exception:
            return elem.keyword, int(elem.tag), "cannot be decoded"
        try:
            setattr(primitive, elem.keyword, value[0] if isinstance(value, list) and value else value)
        except Exception:
            return elem.keyword, int(elem.tag), _what_is_wrong(elem.keyword, value)
    return "command set", 0, "cannot be decoded"


def _int_field(message: DIMSEMessage, keyword: str) -> int | None:
    try:
        return int(message.command_set[keyword].value)
    except Exception:
        return None


class _SiteDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, changed in two ways; the one place the grid adapts pynetdicom's
    internals (3.0.x, pinned), mirroring ``DIMSEServiceProvider.receive_primitive`` otherwise.

    * pynetdicom answers a request whose command it cannot turn into a primitive (a UID over 64
      characters, an AE title over 16, an out-of-range Priority) with an A-ABORT, which a PACS retries
      forever and nobody audits. Here such a request gets the nearest failure status of its service,
      with an Error Comment and the Offending Element, and the association carries on. A command set
      that cannot be decoded at all has no Message ID to answer, so that association is still
      aborted. Both are reported to ``refused`` (log line and audit record).
    * Every data set streamed to a spool file is recorded, so that whatever is left of them can be
      deleted when the association ends (pynetdicom deletes a file only after its handler ran).
    """

    def __init__(self, assoc: Association, refused: Callable[[Association, Refusal], None],
                 may_use: Callable[[Association, str], bool] = lambda assoc, service: True) -> None:
        super().__init__(assoc)
        self._refused = refused
        self._may_use = may_use
        self.spool_files: list[Path] = []

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
        message = self.message
        try:
            complete = message.decode_msg(primitive, self.assoc)
        except Exception as exc:
            self._claim_spool_file(message)
            self._discard(message)
            self._refused(self.assoc, Refusal(None, None, f"command set cannot be decoded ({type(exc).__name__})", None))
            self.dul.event_queue.put("Evt19")  # A-ABORT through the state machine, as pynetdicom does
            return
        self._claim_spool_file(message)
        if not complete:
            return

        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        context_id = message.context_id
        try:
            request = message.message_to_primitive()
        except Exception:
            self._discard(message)
            self._answer_undecodable(message, context_id)
            return

        service = _SERVICE_OF_REQUEST.get(type(request).__name__)
        if service is not None and not self._may_use(self.assoc, service):
            # Its contexts were rejected at negotiation; this catches storage requests on a C-GET
            # association (whose storage contexts a retrieve-only AE needs for the sub-operations).
            self._answer_not_authorized(message, request, context_id, service)
            return

        # From here on as in pynetdicom.
        if isinstance(request, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[request.MessageIDBeingRespondedTo] = request
        elif isinstance(request, N_EVENT_REPORT) and request.is_valid_request:
            threading.Thread(target=make_target(self.assoc._serve_request), args=(request, context_id)).start()
        else:
            self.msg_queue.put((context_id, request))
        self._reset(message)

    def _answer_undecodable(self, message: DIMSEMessage, context_id: int | None) -> None:
        """Answer a request whose command set decoded but did not convert; abort when it cannot be."""
        command_field, message_id = _int_field(message, "CommandField"), _int_field(message, "MessageID")
        known = _ANSWERABLE.get(command_field)
        if known is not None and known[1] is None:  # a C-CANCEL nobody can match is ignored
            self._refused(self.assoc, Refusal(known[0], None, "cancel request cannot be decoded; ignored", None))
            return
        accepted = {cx.context_id for cx in self.assoc.accepted_contexts}
        if known is None or message_id is None or context_id not in accepted:
            self._refused(self.assoc, Refusal(known[0] if known else None, None, "command cannot be decoded", None))
            self.dul.event_queue.put("Evt19")
            return
        name, response_class, default_status, per_field = known
        keyword, tag, wrong = _offending_field(response_class(), message)
        status = per_field.get(keyword, default_status)
        response = response_class()
        response.MessageIDBeingRespondedTo = message_id
        response.Status = status
        response.ErrorComment = f"{keyword} {wrong}"[:64]
        if tag:
            response.OffendingElement = [tag]
        for echoed in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
            if echoed != keyword and hasattr(response, echoed):
                try:
                    setattr(response, echoed, message.command_set.get(echoed))
                except Exception:
                    pass
        self._refused(self.assoc, Refusal(name, keyword, wrong, status))
        self.send_msg(response, context_id)

    def _answer_not_authorized(self, message: DIMSEMessage, request: Any, context_id: int | None,
                               service: str) -> None:
        command = type(request).__name__.replace("_", "-")
        self._discard(message)
        response = type(request)()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.Status = NOT_AUTHORIZED
        response.ErrorComment = f"calling AE may not use {service}"[:64]
        for echoed in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
            if hasattr(response, echoed) and getattr(request, echoed, None):
                setattr(response, echoed, getattr(request, echoed))
        self._refused(self.assoc, Refusal(command, None, f"calling AE may not use {service}", NOT_AUTHORIZED))
        self.send_msg(response, context_id)

    def _claim_spool_file(self, message: DIMSEMessage) -> None:
        path = message._data_set_path
        if path is not None and path not in self.spool_files:
            # Files pynetdicom already deleted after their handler ran need no remembering.
            self.spool_files = [p for p in self.spool_files if p.exists()] + [path]

    def _discard(self, message: DIMSEMessage) -> None:
        """Drop a message that will never reach a handler, and its spool file."""
        if message._data_set_file is not None:
            message._data_set_file.close()
            Path(message._data_set_file.name).unlink(missing_ok=True)
        self._reset(message)

    def _reset(self, message: DIMSEMessage) -> None:
        # pynetdicom's fix for its issue #41 (the message would keep every fragment alive).
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        message._data_set_file = None
        message._data_set_path = None
        self.message = None

    def remove_spool_files(self) -> int:
        """Delete every spool file of this association that is still there (the association is over)."""
        if self.message is not None and self.message._data_set_file is not None:
            self.message._data_set_file.close()
        removed = 0
        for path in self.spool_files:
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
        self.spool_files = []
        return removed


# -- the listener: limits for connections that have not negotiated, spool cleanup ------------------


class _State(enum.Enum):
    WAITING = "waiting for A-ASSOCIATE-RQ"
    ADMITTED = "negotiated or negotiating"


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str  # IP address, the unit of the per-peer cap
    accepted: float  # time.monotonic()
    assoc: Association | None = None
    state: _State = _State.WAITING
    # Served by the storage path (no pynetdicom association): its calling AE title.
    direct_ae: str | None = None

    def holds_slot(self) -> bool:
        """Whether the connection counts against the association limits."""
        if self.state is not _State.ADMITTED:
            return False
        return self.direct_ae is not None or (self.assoc is not None and self.assoc.is_alive())

    def calling_ae(self) -> str:
        return self.direct_ae if self.direct_ae is not None else _calling_ae(self.assoc) if self.assoc else ""


@dataclass(eq=False)
class _Registry:
    """The connections of a receiver process, shared by its plain and TLS listeners, so the limits
    count them together."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: dict[socket.socket, _Connection] = field(default_factory=dict)
    by_assoc: dict[Association, _Connection] = field(default_factory=dict)


# Why an association is rejected, for its audit record (set before the rejection is sent).
_REJECTION_NOTE = "_dicomgrid_rejection"


class DirectPath(Protocol):
    """Associations a service serves itself, without pynetdicom (the site's storage path)."""

    def takes(self, request: ul.AssociateRequest) -> bool: ...

    def serve(self, sock: socket.socket, request: ul.AssociateRequest, peer: str) -> None: ...


class _ReplaySocket(AssociationSocket):
    """An association socket whose first bytes were read already (the A-ASSOCIATE-RQ, read by the
    server to choose between the direct path and pynetdicom): they are read again from memory."""

    prefix: bytearray

    @property
    def ready(self) -> bool:
        return bool(self.prefix) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if not self.prefix:
            return super().recv(nr_bytes)
        head = self.prefix[:nr_bytes]
        del self.prefix[:nr_bytes]
        return head + super().recv(nr_bytes - len(head)) if len(head) < nr_bytes else head


class _SiteRequestHandler(RequestHandler):
    prefix = b""

    def handle(self) -> None:
        server: SiteServer = self.server  # type: ignore[assignment]
        if isinstance(self.request, ssl.SSLSocket) and not server.handshake(self.request):
            return
        if server.direct is not None:
            prefix = server.read_request(self.request)
            if prefix is None:
                server.shutdown_request(self.request)
                return
            if server.serve_direct(self.request, prefix, self.client_address):
                server.shutdown_request(self.request)
                return
            self.prefix = prefix
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if self.prefix:
            sock = assoc.dul.socket
            sock.__class__ = _ReplaySocket
            sock.prefix = bytearray(self.prefix)  # type: ignore[attr-defined]
        self.server.attach(self.request, assoc)  # type: ignore[attr-defined]
        return assoc


class SiteServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, guarded against connections that never negotiate.

    pynetdicom starts an association (two threads) for every accepted socket, counts it against
    ``maximum_associations`` before it has negotiated anything, and waits ``acse_timeout`` (30 s) for
    the A-ASSOCIATE-RQ; once a peer has sent the first bytes of a PDU its DUL thread blocks reading the
    rest and the ARTIM timer is never checked, so a slow sender holds the connection for as long as it
    keeps dribbling. Here:

    * a connection that has not sent its A-ASSOCIATE-RQ within ``request_timeout_s`` of accept is shut
      down (which also unblocks a DUL thread stuck reading);
    * at most ``max_pending_per_peer`` such connections per IP address and ``max_pending`` in all: a
      new one closes the oldest, so a real PACS at an attacker's address still gets its turn;
    * ``max_associations`` counts negotiated associations only (the plain and TLS ports together), and ``[limits]
      max_associations_per_calling_ae`` caps those of one calling AE title, so one PACS opening
      associations without end cannot take every slot from the others;
    * on a TLS port the handshake runs in the connection's own thread, within the same deadline (the
      accept loop would otherwise wait on a client that never sends its hello), and ``admit`` decides
      about each association request before negotiation (the site AE checks that a client
      certificate speaks for the calling AE title);
    * every spool file of an association is deleted when it ends, for whatever reason, and a periodic
      sweep (:class:`~dicomgrid.core.spool.ReceiveSpool`) removes anything left over.
    """

    # socketserver listens with a backlog of 5: a burst of connections (PACS opening several
    # associations, or an attacker) would wait on SYN retransmits, seconds each, before being accepted.
    request_queue_size = 512

    def __init__(self, *args: Any, limits: ConnectionLimits, spool: ReceiveSpool | None,
                 refused: Callable[[Association, Refusal], None], reuse_port: bool = False,
                 registry: _Registry | None = None,
                 admit: Callable[[Association], tuple[tuple[int, int, int], str] | None] | None = None,
                 may_use: Callable[[Association, str], bool] | None = None,
                 handshake_failed: Callable[[str, str], None] | None = None,
                 request_limits: LimitsConfig | None = None,
                 direct: DirectPath | None = None,
                 admit_direct: Callable[[socket.socket, ul.AssociateRequest], bool] | None = None,
                 **kwargs: Any) -> None:
        self.limits = limits
        self.direct = direct
        self.admit_direct = admit_direct or (lambda sock, request: True)
        self.request_limits = request_limits or LimitsConfig()
        self.spool = spool
        self.refused = refused
        self.reuse_port = reuse_port
        self.admit = admit
        self.may_use = may_use or (lambda assoc, service: True)
        self.handshake_failed = handshake_failed
        self.registry = registry or _Registry()
        self._lock = self.registry.lock
        self._connections = self.registry.connections
        self._by_assoc = self.registry.by_assoc
        self._next_sweep = time.monotonic() + SPOOL_SWEEP_INTERVAL_S
        super().__init__(*args, request_handler=_SiteRequestHandler, **kwargs)
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        for ended in (evt.EVT_REJECTED, evt.EVT_RELEASED, evt.EVT_ABORTED):
            self.bind(ended, self._on_ended)

    def server_bind(self) -> None:
        if self.reuse_port:
            # Several receiver processes accept on one port; the kernel spreads connections over them.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    # accept loop ---------------------------------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        if self.ssl_context is not None:
            # The handshake waits for the client: it runs in the connection's thread (handshake()).
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def handshake(self, sock: ssl.SSLSocket) -> bool:
        """TLS handshake of an accepted connection, within the time it has left to associate."""
        with self._lock:
            connection = self._connections.get(sock)
        left = self.limits.request_timeout_s - (time.monotonic() - connection.accepted) if connection else 0.0
        peer = connection.peer if connection else "unknown"
        try:
            if left <= 0:
                raise TimeoutError("closed for a newer connection")
            sock.settimeout(left)
            sock.do_handshake()
            sock.settimeout(None)
            return True
        except (OSError, ValueError) as exc:
            reason = _handshake_failure(exc)
            log.info("dicom tls handshake failed", peer=peer, reason=reason)
            # Idle connections are the pending limits' business (logged, as on the plain port); a
            # handshake that failed on its merits (a certificate refused, a protocol error) is audited.
            if self.handshake_failed is not None and isinstance(exc, ssl.SSLError):
                self.handshake_failed(peer, reason)
            self.shutdown_request(sock)
            return False

    def process_request(self, request: Any, client_address: Any) -> None:
        connection = _Connection(request, str(client_address[0]), time.monotonic())
        with self._lock:
            waiting = [c for c in self._connections.values() if c.state is _State.WAITING]
            same_peer = [c for c in waiting if c.peer == connection.peer]
            if len(same_peer) >= self.limits.max_pending_per_peer:
                victim: _Connection | None = min(same_peer, key=lambda c: c.accepted)
            elif len(waiting) >= self.limits.max_pending:
                victim = min(waiting, key=lambda c: c.accepted)
            else:
                victim = None
            self._connections[request] = connection
        if victim is not None:
            self._close(victim, "pending connection closed for a newer one", peer_cap=victim.peer == connection.peer)
        super().process_request(request, client_address)

    def service_actions(self) -> None:
        super().service_actions()
        now = time.monotonic()
        with self._lock:
            overdue = [c for c in self._connections.values()
                       if c.state is _State.WAITING and now - c.accepted > self.limits.request_timeout_s]
            # ident is None until the thread starts: attach() runs just before that.
            dead = [c.assoc for c in self._by_assoc.values()
                    if c.assoc is not None and c.assoc.ident is not None and not c.assoc.is_alive()]
        for connection in overdue:
            self._close(connection, "no A-ASSOCIATE-RQ within the request timeout")
        for assoc in dead:
            self._finish(assoc)
        if self.spool is not None and now >= self._next_sweep:
            self._next_sweep = now + SPOOL_SWEEP_INTERVAL_S
            self.spool.sweep(self.claimed_spool_files())

    def shutdown_request(self, request: Any) -> None:
        # pynetdicom calls this when an acceptor's reactor ends (not on every path: see _on_ended).
        connection = self._connections.get(request)
        if connection is not None and connection.assoc is not None:
            self._finish(connection.assoc)
        else:
            with self._lock:
                self._connections.pop(request, None)
        super().shutdown_request(request)

    # association events (in the association's threads) ----------------------------------------------

    def attach(self, request: Any, assoc: Association) -> None:
        """Called as pynetdicom creates the association for an accepted socket, before it starts."""
        assoc.dimse = _SiteDIMSE(assoc, self.refused, self.may_use)
        with self._lock:
            connection = self._connections.get(request)
            if connection is not None:
                connection.assoc = assoc
                self._by_assoc[assoc] = connection
        if connection is None:  # closed for a newer connection before its association existed
            assoc.acse_timeout = 0
            assoc.dul.kill_dul()
            return
        # pynetdicom waits acse_timeout for the A-ASSOCIATE-RQ: make that the time left of the deadline.
        assoc.acse_timeout = max(0.0, self.limits.request_timeout_s - (time.monotonic() - connection.accepted))

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        refusal = self.admit(assoc) if self.admit is not None else None
        if refusal is None:
            calling_ae = _calling_ae(assoc)
            with self._lock:
                connection = self._by_assoc.get(assoc)
                full = self._full_locked(calling_ae)
                if connection is not None and full is None:
                    # Taken now, before negotiation ends, so two requests at once cannot both get the last slot.
                    connection.state = _State.ADMITTED
            if full is not None:
                # As pynetdicom rejects: rejected transient, service provider (presentation), local limit exceeded.
                assoc.limit_reached = full  # type: ignore[attr-defined]  # read by the rejection's audit record
                refusal = (0x02, 0x03, 0x02), full
        if refusal is not None:
            # (result, source, diagnostic), and why (for the rejection's audit record).
            (result, source, diagnostic), why = refusal
            setattr(assoc, _REJECTION_NOTE, why)
            assoc.acse.send_reject(result, source, diagnostic)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

    def _on_ended(self, event: evt.Event) -> None:
        self._finish(event.assoc)

    def _full_locked(self, calling_ae: str) -> str | None:
        """Why one more association of ``calling_ae`` is over the limits (None: it is not)."""
        admitted = [c for c in self._connections.values() if c.holds_slot()]
        same_ae = sum(1 for c in admitted if c.calling_ae() == calling_ae)
        per_ae = self.request_limits.max_associations_per_calling_ae
        if len(admitted) >= self.limits.max_associations:
            return f"local limit of {self.limits.max_associations} associations reached"
        if same_ae >= per_ae:
            return f"local limit of {per_ae} associations per calling AE reached (calling AE {calling_ae!r})"
        return None

    # the direct path (in the connection's thread) ------------------------------------------------------

    def read_request(self, sock: socket.socket) -> bytes | None:
        """The connection's first PDU, whole if it is an A-ASSOCIATE-RQ (None: the connection went, or
        was closed at its deadline by :meth:`service_actions`)."""
        with self._lock:
            connection = self._connections.get(sock)
        if connection is None:
            return None
        left = self.limits.request_timeout_s - (time.monotonic() - connection.accepted)
        data = bytearray()
        try:
            # The deadline's own sweep also shuts the socket down; the timeout is the backstop.
            sock.settimeout(max(left, 0.0) + 1.0)
            while len(data) < 6:
                if not _recv_more(sock, data, 6 - len(data)):
                    return None
            kind, length = ul.pdu_header(data)
            if kind != ul.ASSOCIATE_RQ or length > _MAX_REQUEST_BYTES:
                return bytes(data)  # pynetdicom answers what is not a plausible request
            while len(data) < 6 + length:
                if not _recv_more(sock, data, 6 + length - len(data)):
                    return None
            return bytes(data)
        except (OSError, ValueError):
            self._close(connection, "no A-ASSOCIATE-RQ within the request timeout")
            return None
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass

    def serve_direct(self, sock: socket.socket, prefix: bytes, client_address: Any) -> bool:
        """Serve the association on the direct path if it takes it and it is admissible as requested;
        False leaves it to pynetdicom (whatever is to be rejected, or not the direct path's)."""
        assert self.direct is not None
        try:
            request = ul.parse_associate_rq(prefix)
        except ul.ULError:
            return False
        if not self.direct.takes(request) or not self.admit_direct(sock, request):
            return False
        with self._lock:
            connection = self._connections.get(sock)
            if connection is None or self._full_locked(request.calling_ae) is not None:
                return False
            connection.state = _State.ADMITTED
            connection.direct_ae = request.calling_ae
        self.direct.serve(sock, request, f"{client_address[0]}:{client_address[1]}")
        return True

    # bookkeeping ---------------------------------------------------------------------------------

    def _close(self, connection: _Connection, why: str, peer_cap: bool = False) -> None:
        with self._lock:
            if self._connections.pop(connection.sock, None) is None:
                return
            if connection.assoc is not None:
                self._by_assoc.pop(connection.assoc, None)
        log.info("pending dicom connection closed", reason=why, peer=connection.peer,
                 pending_s=round(time.monotonic() - connection.accepted, 2), per_peer_cap=peer_cap)
        try:
            # Shutdown, not close: the association's threads may be using the socket; it is closed
            # when the association ends. Shutdown also ends a DUL thread's blocking read.
            connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if connection.assoc is not None:
            connection.assoc.dul.kill_dul()

    def _finish(self, assoc: Association) -> None:
        """The association is over: forget it and delete what is left of its spool files."""
        with self._lock:
            connection = self._by_assoc.pop(assoc, None)
            if connection is not None:
                self._connections.pop(connection.sock, None)
        dimse = assoc.dimse
        if isinstance(dimse, _SiteDIMSE):
            removed = dimse.remove_spool_files()
            if removed:
                log.info("partial data set removed", files=removed, peer=f"{assoc.requestor.address}:{assoc.requestor.port}")

    def direct_associations(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections.values() if c.direct_ae is not None)

    def claimed_spool_files(self) -> set[Path]:
        with self._lock:
            associations = [c.assoc for c in self._by_assoc.values() if c.assoc is not None]
        claimed: set[Path] = set()
        for assoc in associations:
            if isinstance(assoc.dimse, _SiteDIMSE):
                claimed.update(assoc.dimse.spool_files)
        return claimed

    def pending_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections.values() if c.state is _State.WAITING)


_AUDIT_EVENT = {
    "C-STORE": ("C", "DICOM Instances Transferred"),
    "C-FIND": ("E", "Query"),
    "C-GET": ("R", "DICOM Instances Transferred"),
    "C-MOVE": ("R", "DICOM Instances Transferred"),
}
_REJECTIONS = {
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x07): "called AE title is not this site's",
    (0x02, 0x02): "protocol version not supported",
}


def _recv_more(sock: socket.socket, data: bytearray, wanted: int) -> bool:
    chunk = sock.recv(min(wanted, 65536))
    data += chunk
    return bool(chunk)


def _calling_ae(assoc: Association) -> str:
    """The calling AE title of an association, once its A-ASSOCIATE-RQ has arrived ("" before)."""
    primitive = assoc.requestor.primitive
    return (getattr(primitive, "calling_ae_title", None) or assoc.requestor.ae_title or "").strip()


def _handshake_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, as a log and audit line can say it (no peer input)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "no TLS handshake within the request timeout"
    return f"connection lost during the TLS handshake ({type(exc).__name__})"


def _rejection_reason(assoc: Association, limits: ConnectionLimits) -> str:
    noted = getattr(assoc, _REJECTION_NOTE, None)
    if noted:
        return noted
    primitive = assoc.acceptor.primitive
    source, diagnostic = getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None)
    if (source, diagnostic) == (0x03, 0x02):
        return getattr(assoc, "limit_reached", None) or f"local limit of {limits.max_associations} associations reached"
    calling_ae = assoc.requestor.ae_title or None
    reason = _REJECTIONS.get((source, diagnostic), f"source {source}, diagnostic {diagnostic}")
    return f"{reason} (calling AE {calling_ae!r})"


class CalledAETitles(Protocol):
    """AE titles besides the site's own that its port answers to (trials), with services of their own.

    An association calling one of them is accepted as if it had called the site's title, and every
    request on it goes to :meth:`handler` for its event (which reads ``event.assoc.acceptor.ae_title``);
    the site's own services never see it.
    """

    def serves(self, called_ae_title: str) -> bool: ...

    def handler(self, event_type: Any) -> Callable[..., Any] | None: ...


class SiteAE:
    """The DICOM face of one site: Verification plus every service given."""

    def __init__(self, config: GridConfig, site: str, services: Sequence[DimseService], audit: AuditTrail,
                 called_aes: CalledAETitles | None = None) -> None:
        self.config = config
        self.site = config.site(site)
        self.services = list(services)
        self.audit = audit
        self.called_aes = called_aes
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.site.ae_title)
        # One identity on both receive paths (the storage path answers with the grid's own).
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = _PYNETDICOM_ASSOCIATION_LIMIT
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for service in self.services:
            for cx in service.contexts():
                ae.add_supported_context(cx.abstract_syntax, list(cx.transfer_syntaxes), cx.scu_role, cx.scp_role)
        ae.require_called_aet = True
        security = self.config.security
        if not (security.allow_any_calling_ae and not security.allowed_calling_aes):
            ae.require_calling_aet = list(security.allowed_calling_aes)
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        out: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, prefer_requested_syntaxes),
            (evt.EVT_REQUESTED, self._offer_allowed_services),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        for service in self.services:
            out.extend(service.handlers())
        if self.called_aes is None:
            return out
        # -- other called AE titles (trials) on the same port --
        routed: list[tuple[Any, Callable[..., Any]]] = [(evt.EVT_REQUESTED, self._adopt_called_ae)]
        for event_type, handler in out:
            if event_type.is_intervention and event_type is not evt.EVT_C_ECHO:
                routed.append((event_type, self._route(event_type, handler)))
            else:
                routed.append((event_type, handler))
        return routed

    def _adopt_called_ae(self, event: evt.Event) -> None:
        """Answer as the AE title called when it is one of ``called_aes`` (checked by pynetdicom right after)."""
        called = (event.assoc.requestor.primitive.called_ae_title or "").strip()
        assert self.called_aes is not None
        if called and called != self.site.ae_title and self.called_aes.serves(called):
            event.assoc.acceptor.ae_title = called

    def _route(self, event_type: Any, site_handler: Callable[..., Any]) -> Callable[..., Any]:
        assert self.called_aes is not None
        other = self.called_aes.handler(event_type)

        def route(event: evt.Event) -> Any:
            if event.assoc.acceptor.ae_title == self.site.ae_title:
                return site_handler(event)
            if other is None:  # a service the other AE title does not offer: never the site's
                log.warning("request refused on another called AE title", called_ae=event.assoc.acceptor.ae_title,
                            event=event_type.name)
                event.assoc.abort()
                return None
            return other(event)

        return route

    # -- end of other called AE titles --

    # -- who may do what -----------------------------------------------------------------------------

    def _admit(self, assoc: Association) -> tuple[tuple[int, int, int], str] | None:
        """Before negotiation: a client certificate must speak for the calling AE title it is used with."""
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return None
        calling_ae = requested_calling_ae(assoc)
        cert = sock.getpeercert()
        if not cert:
            return None  # no certificate (tls.client_certificates = "optional" or "none")
        if certificate_speaks_for(self.config, cert, calling_ae):
            return None
        names = ", ".join(repr(n) for n in certificate_identities(cert)[:3]) or "no identity"
        # Rejected permanent, service user, calling AE title not recognised.
        return (0x01, 0x01, 0x03), f"TLS client certificate of {names} does not speak for calling AE {calling_ae!r}"

    def _admits_as_requested(self, sock: socket.socket, request: ul.AssociateRequest) -> bool:
        """Whether the request would be accepted as it stands, every context offered: only such a
        request may go to the direct path (every other one is pynetdicom's to refuse and audit)."""
        config = self.config
        if (request.called_ae != self.site.ae_title or request.protocol_version != 1
                or request.application_context != ul.APPLICATION_CONTEXT
                or not config.is_calling_ae_allowed(request.calling_ae)
                or (config.security.service_aes and not config.ae_may_use(request.calling_ae, "storage"))):
            return False
        if isinstance(sock, ssl.SSLSocket):
            cert = sock.getpeercert()
            if cert and not certificate_speaks_for(config, cert, request.calling_ae):
                return False
        return True

    def _direct_path(self) -> DirectPath | None:
        """The storage path, from the service that offers one."""
        for service in self.services:
            make = getattr(service, "direct_path", None)
            if make is not None:
                return make(max_pdu=MAX_PDU_BYTES, network_timeout_s=self.ae.network_timeout or 60.0)  # type: ignore[no-any-return]
        return None

    def _may_use(self, assoc: Association, service: str) -> bool:
        return self.config.ae_may_use(assoc.requestor.ae_title, service)

    def _offer_allowed_services(self, event: evt.Event) -> None:
        """Reject the presentation contexts of the services the calling AE may not use.

        Storage contexts stay for an AE that may retrieve: C-GET sends on them (the requestor's C-STORE
        requests on them are refused by the DIMSE provider).
        """
        assoc = event.assoc
        calling_ae = requested_calling_ae(assoc)
        if (not self.config.security.service_aes or assoc.is_rejected or assoc.is_aborted
                or not self.config.is_calling_ae_allowed(calling_ae)):
            return  # refused as a whole, or open to everything
        allowed = {name: self.config.ae_may_use(calling_ae, name) for name in ("storage", "query", "retrieve", "commitment")}
        allowed["storage"] = allowed["storage"] or allowed["retrieve"]
        proposed = {cx.abstract_syntax for cx in assoc.requestor.primitive.presentation_context_definition_list}
        denied = sorted({service_of(uid) for uid in proposed if service_of(uid) and not allowed[service_of(uid)]})  # type: ignore[index]
        if not denied:
            return
        assoc.acceptor.supported_contexts = [
            cx for cx in assoc.acceptor.supported_contexts
            if service_of(cx.abstract_syntax) is None or allowed[service_of(cx.abstract_syntax)]  # type: ignore[index]
        ]
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        log.warning("presentation contexts rejected: service not allowed", calling_ae=calling_ae, peer=peer,
                    services=denied)
        self.audit.record(
            "E", "Security Alert", MINOR_FAILURE,
            f"calling AE {calling_ae!r} may not use {', '.join(denied)}: its presentation contexts were rejected",
            [Participant(calling_ae or "unknown", True, calling_ae or None, peer, "Source"),
             Participant(self.site.name, False, self.site.ae_title, None, "Destination")],
        )

    def _on_handshake_failed(self, peer: str, reason: str) -> None:
        self.audit.record(
            "E", "Security Alert", MINOR_FAILURE, f"DICOM TLS connection refused: {reason}",
            [Participant(peer, True, None, peer, "Source"),
             Participant(self.site.name, False, self.site.ae_title, None, "Destination")],
        )

    def _on_rejected(self, event: evt.Event) -> None:
        calling_ae, peer = peer_of(event)
        reason = _rejection_reason(event.assoc, self.config.connections)
        log.warning("association rejected", reason=reason, calling_ae=calling_ae, peer=peer)
        self.audit.record(
            "E",
            "Security Alert",
            MINOR_FAILURE,
            f"association rejected: {reason}",
            [Participant(calling_ae or "unknown", True, calling_ae, peer, "Requestor")],
        )

    def _on_refused(self, assoc: Association, refusal: Refusal) -> None:
        """A request pynetdicom could not decode was answered with a failure status, or aborted."""
        requestor = assoc.requestor
        calling_ae = requestor.ae_title or None
        peer = f"{requestor.address}:{requestor.port}"
        what = f"{refusal.field} {refusal.reason}" if refusal.field else refusal.reason
        if refusal.status is not None:
            outcome = f"{refusal.command} refused with 0x{refusal.status:04X}: {what}"
        else:
            outcome = f"{refusal.command or 'DIMSE message'} not answerable, association aborted: {what}"
        log.warning("undecodable dimse request", command=refusal.command, field=refusal.field,
                    reason=refusal.reason, status=None if refusal.status is None else f"0x{refusal.status:04X}",
                    calling_ae=calling_ae, peer=peer)
        action, event = _AUDIT_EVENT.get(refusal.command or "", ("E", "Security Alert"))
        self.audit.record(
            action, event, MINOR_FAILURE, outcome,
            [
                Participant(calling_ae or "unknown", True, calling_ae, peer, "Source"),
                Participant(self.site.name, False, self.site.ae_title, None, "Destination"),
            ],
        )

    def serve(self, *, spool_dir: Path, reuse_port: bool = False, block: bool = True) -> "Listeners":
        """Listen on the site's DICOM port and DICOM TLS port (as ``tls`` says); blocks unless ``block``
        is false.

        ``spool_dir`` (the site's ``incoming/``) receives the data sets pynetdicom streams to temporary
        files, in a folder of this process's own: keep it on the site's volume. These settings are
        process-wide in pynetdicom, so they are made here, by the process that serves, rather than on
        import.
        """
        # Received data sets are streamed to a file, and C-GET/C-MOVE sub-operations send stored files
        # from disk a PDU at a time: memory stays flat for 1 GB instances either way.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        spool = ReceiveSpool(Path(spool_dir))
        tempfile.tempdir = str(spool.create())
        spool.sweep(grace_s=0)
        ports: list[tuple[int, ssl.SSLContext | None]] = []
        if self.config.tls.plain_dicom:
            ports.append((self.site.dicom_port, None))
        tls_port = self.config.dicom_tls_port(self.site.name)
        if tls_port is not None:
            ports.append((tls_port, dicom_server_context(self.config, self.site.name)))
        registry = _Registry()
        direct = self._direct_path()
        servers = []
        for number, (port, context) in enumerate(ports):
            server = self.ae.make_server(
                (self.site.dicom_host, port),
                contexts=[_CheapCopyContext.of(cx) for cx in self.ae.supported_contexts],
                ssl_context=context,
                evt_handlers=self.handlers(),
                server_class=SiteServer,
                limits=self.config.connections,
                request_limits=self.config.limits,
                spool=spool if number == 0 else None,  # one sweeper per process
                refused=self._on_refused,
                reuse_port=reuse_port,
                registry=registry,
                admit=self._admit,
                may_use=self._may_use,
                handshake_failed=self._on_handshake_failed,
                direct=direct,
                admit_direct=self._admits_as_requested,
            )
            self.ae._servers.append(server)
            servers.append(server)
        log.info(
            "dicom services listening",
            site=self.site.name,
            ae_title=self.site.ae_title,
            address=f"{self.site.dicom_host}:{self.site.dicom_port}" if self.config.tls.plain_dicom else None,
            tls_address=f"{self.site.dicom_host}:{tls_port}" if tls_port else None,
            client_certificates=self.config.tls.client_certificates if tls_port else None,
            services=[type(s).__name__ for s in self.services],
        )
        listeners = Listeners(servers)
        for server in servers[1:] if block else servers:
            threading.Thread(target=server.serve_forever, name=f"dimse-{self.site.name}", daemon=True).start()
        if block:
            try:
                servers[0].serve_forever()
            finally:
                listeners.shutdown()
        return listeners


@dataclass
class Listeners:
    """The listening servers of one receiver process (plain and TLS), which share its limits."""

    servers: list[SiteServer]

    def shutdown(self) -> None:
        for server in self.servers:
            try:
                server.shutdown()
            except ValueError:  # already removed from the AE's servers
                pass

    def server_close(self) -> None:
        for server in self.servers:
            server.server_close()

    def pending_connections(self) -> int:
        return self.servers[0].pending_connections() if self.servers else 0
