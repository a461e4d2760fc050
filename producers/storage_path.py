"""The site's storage path: associations that only store (and echo), served without pynetdicom.

A PACS pushing studies opens associations that propose storage SOP classes and nothing else. Those
are served here, by the connection's own thread, as a storage SCP that speaks the Upper Layer
(:mod:`dicomgrid.core.ul`) and the two DIMSE commands it needs (:mod:`dicomgrid.core.dimse_commands`)
directly: each P-DATA is read into one reused buffer, its data set fragments go straight into the
payload's temp file in the blob store while they are hashed (:meth:`Ingestor.receive`), and the
C-STORE-RSP is sent only after :class:`~dicomgrid.producers.ingest.Reception` has made the payload
durable and the brokers have confirmed its event, as on every other ingest path, and its audit record
is held in the site's audit spool.

The site AE (:class:`~dicomgrid.core.dimse.SiteAE`) decides which associations come here: those it
would accept as they are (called AE title, calling AE allowed to store, TLS identity, the association
limits), asking only for contexts this path serves (:meth:`StoragePath.takes`). Every other request,
including every one that is to be rejected, goes to pynetdicom with the query, retrieve and Storage
Commitment services, which keeps one implementation of each refusal and its audit record.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from dataclasses import dataclass

from pynetdicom import ALL_TRANSFER_SYNTAXES

from dicomgrid.core import metrics
from dicomgrid.core.audit import MINOR_FAILURE, Participant
from dicomgrid.core.blobstore import BlobStoreError, SpareTemp
from dicomgrid.core.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomgrid.core.dimse_commands import (
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    C_ECHO_RQ,
    C_STORE_RQ,
    MESSAGE_ID,
    VERIFICATION,
    Command,
    CommandError,
    c_echo_rsp,
    c_store_rsp,
    parse_command,
)
from dicomgrid.core.events import Source
from dicomgrid.core.logging import get_logger
from dicomgrid.core import ul
from dicomgrid.producers.ingest import Expected, Ingestor, Reception
from dicomgrid.producers.store_audit import StoreAudit

log = get_logger(__name__)

# A peer that sends P-DATA PDUs larger than the site's advertised maximum is tolerated up to this
# (some senders ignore the limit); beyond it the association is aborted rather than buffered.
_MAX_ACCEPTED_PDU = 16 * 1024 * 1024


class _Closed(Exception):
    """The peer closed the connection."""


# What a blocking socket raises when a kernel timeout (SO_RCVTIMEO, SO_SNDTIMEO) expires.
_TIMED_OUT = BlockingIOError


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Bound every receive and send by ``seconds``.

    A Python socket timeout polls the socket before each call, which doubles the system calls of the
    association's thread (and each one hands the GIL to another thread); the kernel's own timeouts
    (SO_RCVTIMEO, SO_SNDTIMEO) cost nothing per call. The socket stays blocking, so a call that times
    out raises :data:`_TIMED_OUT`, which the association turns into :class:`TimeoutError`. A TLS
    socket keeps Python's timeout: its blocking reads retry OpenSSL's want-read without end, so a
    kernel timeout would never reach the association.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _sendall(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except _TIMED_OUT as exc:
        raise TimeoutError("send timed out") from exc


class _PDUReader:
    """Reads whole PDUs from a socket into one buffer, reused for the association's life.

    A returned body is a view into the buffer, valid until the next :meth:`next_pdu`.
    """

    def __init__(self, sock: socket.socket, size: int) -> None:
        self._sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _fill(self, need: int) -> None:
        while self._end - self._start < need:
            if len(self._buf) - self._start < need:
                self._make_room(need)
            try:
                got = self._sock.recv_into(self._view[self._end:])
            except _TIMED_OUT as exc:
                raise TimeoutError("receive timed out") from exc
            if got == 0:
                raise _Closed()
            self._end += got

    def _make_room(self, need: int) -> None:
        pending = self._end - self._start
        if need > len(self._buf):
            # A new buffer: views handed out earlier keep the old one alive until they are dropped.
            grown = bytearray(max(need, 2 * len(self._buf)))
            grown[:pending] = self._view[self._start : self._end]
            self._buf, self._view = grown, memoryview(grown)
        else:
            self._buf[:pending] = self._view[self._start : self._end]
        self._start, self._end = 0, pending

    def next_pdu(self) -> tuple[int, memoryview]:
        self._fill(6)
        kind, length = ul.pdu_header(self._view, self._start)
        if length > _MAX_ACCEPTED_PDU:
            raise ul.ULError(f"PDU of {length} bytes exceeds {_MAX_ACCEPTED_PDU}")
        self._fill(6 + length)
        body = self._view[self._start + 6 : self._start + 6 + length]
        self._start += 6 + length
        return kind, body


@dataclass
class _Store:
    """The C-STORE whose data set is arriving."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    reception: Reception
    started: float


class StoragePath:
    """Storage associations of one site, each served in the thread that accepted its connection."""

    def __init__(self, ingestor: Ingestor, called_ae: str, *, max_pdu: int, network_timeout_s: float,
                 storage_classes: list[str]) -> None:
        self.ingestor = ingestor
        self.called_ae = called_ae
        self.max_pdu = max_pdu
        self.network_timeout_s = network_timeout_s
        self.storage_classes = frozenset(storage_classes)
        self.transfer_syntaxes = frozenset(ALL_TRANSFER_SYNTAXES)

    def takes(self, request: ul.AssociateRequest) -> bool:
        """Whether every context the request proposes is storage or verification."""
        return bool(request.contexts) and all(
            cx.abstract_syntax in self.storage_classes or cx.abstract_syntax == VERIFICATION
            for cx in request.contexts
        )

    def serve(self, sock: socket.socket, request: ul.AssociateRequest, peer: str) -> None:
        """Accept ``request`` (already admitted by the site AE) and serve it until it ends."""
        _Association(self, sock, request, peer).run()


class _Association:
    def __init__(self, path: StoragePath, sock: socket.socket, request: ul.AssociateRequest, peer: str) -> None:
        self.path = path
        self.sock = sock
        self.request = request
        self.peer = peer
        self.site = path.ingestor.site
        self.source = Source("DIMSE", request.calling_ae, request.called_ae, peer)
        # What the association stores is audited in one record when it ends (producers.store_audit).
        self.stores = StoreAudit(path.ingestor.audit, self.site, self.source)
        self.contexts = self._negotiate()
        self.command = bytearray()
        self.store: _Store | None = None
        # The temp file of the next C-STORE, made while the sender prepares it (see _stored).
        self.spare: SpareTemp | None = None

    def _negotiate(self) -> dict[int, ul.AcceptedContext]:
        """Each proposed context accepted with the first transfer syntax the requestor lists that the
        site stores (the grid never transcodes: the sender's own encoding is kept)."""
        out = {}
        for cx in self.request.contexts:
            syntax = next((ts for ts in cx.transfer_syntaxes if ts in self.path.transfer_syntaxes), "")
            result = ul.ACCEPTANCE if syntax else ul.TRANSFER_SYNTAXES_NOT_SUPPORTED
            out[cx.context_id] = ul.AcceptedContext(cx.context_id, result, cx.abstract_syntax, syntax)
        return out

    def _accept(self) -> None:
        # A storage SOP class's proposed roles are accepted as proposed (the site is SCU and SCP of
        # storage, as pynetdicom's contexts of the site AE say); others keep the default roles.
        roles = {uid: role for uid, role in self.request.roles.items() if uid in self.path.storage_classes}
        _sendall(self.sock, ul.encode_associate_ac(
            self.request, self.contexts.values(), max_pdu=self.path.max_pdu,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME, roles=roles,
        ))

    def run(self) -> None:
        # Without TCP_NODELAY every response waits on the peer's delayed ACK.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _set_timeouts(self.sock, self.path.network_timeout_s)
        reader = _PDUReader(self.sock, 2 * (self.path.max_pdu + 6))
        try:
            self._accept()
            log.debug("storage association accepted", calling_ae=self.request.calling_ae, peer=self.peer,
                      contexts=len(self.contexts))
            while True:
                kind, body = reader.next_pdu()
                if kind == ul.P_DATA_TF:
                    self._p_data(body)
                elif kind == ul.RELEASE_RQ:
                    if self.store is not None:
                        raise ul.ULError("A-RELEASE-RQ in the middle of a data set")
                    self._drop_spare()  # before the reply: a released association leaves no file behind
                    _sendall(self.sock, ul.encode_release_rp())
                    return
                elif kind == ul.ABORT:
                    self._ended("aborted by the peer")
                    return
                else:
                    raise ul.ULError(f"unexpected PDU type 0x{kind:02X}")
        except (ul.ULError, CommandError) as exc:
            self._protocol_error(str(exc))
        except _Closed:
            self._ended("connection closed by the peer")
        except TimeoutError:
            self._ended(f"no PDU within {self.path.network_timeout_s} s")
            self._send_abort(ul.ABORT_REASON_NOT_SPECIFIED)
        except OSError as exc:
            self._ended(f"connection lost ({type(exc).__name__})")
        finally:
            if self.store is not None:
                self.store.reception.abort()
                self.store = None
            self._drop_spare()
            self.stores.flush()

    # -- DIMSE ---------------------------------------------------------------------------------------

    def _p_data(self, body: memoryview) -> None:
        for context_id, control, fragment in ul.iter_pdvs(body):
            context = self.contexts.get(context_id)
            if context is None or context.result != ul.ACCEPTANCE:
                raise ul.ULError(f"data on presentation context {context_id}, which was not accepted")
            if control & ul.PDV_COMMAND:
                if self.store is not None:
                    raise CommandError("a command arrived before the previous data set ended")
                self.command += fragment
                if control & ul.PDV_LAST:
                    command = parse_command(self.command)
                    self.command.clear()
                    self._on_command(context, command)
            else:
                store = self.store
                if store is None or store.context_id != context_id:
                    raise CommandError("a data set fragment arrived without its C-STORE request")
                store.reception.write(fragment)
                if control & ul.PDV_LAST:
                    self.store = None
                    self._stored(store)

    def _on_command(self, context: ul.AcceptedContext, command: Command) -> None:
        field = command.field
        message_id = command.us(MESSAGE_ID)
        if message_id is None:
            raise CommandError("command without a Message ID")
        if field == C_ECHO_RQ:
            self._send(context.context_id, c_echo_rsp(message_id))
        elif field == C_STORE_RQ:
            if context.abstract_syntax == VERIFICATION:
                raise CommandError("C-STORE on the Verification context")
            if not command.has_data_set:
                raise CommandError("C-STORE request without a data set")
            sop_class = command.text(AFFECTED_SOP_CLASS_UID) or ""
            sop_instance = command.text(AFFECTED_SOP_INSTANCE_UID) or ""
            spare, self.spare = self.spare, None
            reception = self.path.ingestor.receive(self.source, Expected(sop_class, sop_instance), context.transfer_syntax,
                                                   self.stores, spare)
            self.store = _Store(context.context_id, message_id, sop_class, sop_instance, reception, time.perf_counter())
        else:
            name = f"0x{field:04X}" if field is not None else "missing"
            raise CommandError(f"command field {name} is not served on a storage association")

    def _stored(self, store: _Store) -> None:
        result = store.reception.complete()
        store.reception.audit(result)
        comment = None if result.ok else result.error_comment
        try:
            self._send(store.context_id, c_store_rsp(store.sop_class_uid, store.sop_instance_uid, store.message_id,
                                                     result.outcome.status, comment, result.offending_element))
            metrics.REQUEST_SECONDS.labels(self.site, "C-STORE").observe(time.perf_counter() - store.started)
        finally:
            # After the response: at one association the sender waits on nothing else. Counted even
            # when the response cannot be sent, as the outcome (stored or refused) stands.
            store.reception.report(result)
        self.spare = self._spare()

    def _drop_spare(self) -> None:
        if self.spare is not None:
            self.spare.discard()
            self.spare = None

    def _spare(self) -> SpareTemp | None:
        """A temp file for the association's next C-STORE, or None: a store that cannot create one now
        is left to refuse that C-STORE itself, with its own status and audit record."""
        try:
            return self.path.ingestor.blobs.spare()
        except BlobStoreError:
            return None

    def _send(self, context_id: int, command_set: bytes) -> None:
        _sendall(self.sock, ul.encode_p_data(context_id, command_set, command=True, max_pdu=self.request.max_pdu))

    # -- endings ----------------------------------------------------------------------------------

    def _send_abort(self, reason: int) -> None:
        try:
            _sendall(self.sock, ul.encode_abort(ul.ABORT_SOURCE_PROVIDER, reason))
        except OSError:
            pass

    def _ended(self, why: str) -> None:
        if self.store is not None:
            log.info("storage association ended in a data set", reason=why, calling_ae=self.request.calling_ae,
                     peer=self.peer, sop_instance_uid=self.store.sop_instance_uid)
        else:
            log.debug("storage association ended", reason=why, calling_ae=self.request.calling_ae, peer=self.peer)

    def _protocol_error(self, reason: str) -> None:
        """A PDU or command the standard does not allow here: abort, log and audit (no patient data)."""
        calling_ae = self.request.calling_ae or None
        log.warning("storage association aborted", reason=reason, calling_ae=calling_ae, peer=self.peer)
        self._send_abort(ul.ABORT_REASON_INVALID_PARAMETER)
        self.path.ingestor.audit.record(
            "E", "Security Alert", MINOR_FAILURE, f"storage association aborted: {reason}",
            [Participant(calling_ae or "unknown", True, calling_ae, self.peer, "Source"),
             Participant(self.site, False, self.path.called_ae, None, "Destination")],
        )
