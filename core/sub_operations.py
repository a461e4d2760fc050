"""C-STORE sub-operations (C-GET, C-MOVE) written straight to a pynetdicom association's socket.

pynetdicom moves every PDU through its DUL thread: the sending thread queues a primitive, the DUL
thread (which polls, sleeping between polls) encodes and writes it; every received PDU is read by that
thread 4 KB at a time, goes through the state machine, and the DIMSE layer rebuilds its command set as
a pydicom ``Dataset`` for the waiting thread. For a retrieve of small instances those hops cost more
than the bytes. Here the thread running the sub-operations writes a C-STORE-RQ's PDUs itself (command
set from :mod:`~dicomgrid.core.dimse_commands`, data set fragments sliced from the payload in
memory) and reads the peer's C-STORE-RSP itself.

While it does, it holds the link's lock; the DUL thread skips reading the socket while the lock is
held and waits for it before writing any PDU of its own, so the byte streams never interleave and
pynetdicom's state machine sees none of it (P-DATA leaves the established state unchanged). Anything
other than a successful C-STORE-RSP to the request just sent (a failure or warning status, a C-CANCEL,
an A-ABORT or A-RELEASE, a PDU that does not parse) is handed to the DUL thread exactly as it would have
read it, and pynetdicom's own path takes over: status datasets, cancels and aborts behave as before.

pynetdicom 3.0's DUL internals are used (``_is_transport_event``, ``_send``, ``_recv_pdu``,
``_decode_pdu``, the event and provider queues); :meth:`DirectLink.of` returns None for an
association without them, and callers then use pynetdicom's ``send_c_store``.
"""

from __future__ import annotations

import select
import ssl
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE

from dicomgrid.core.logging import get_logger
from dicomgrid.core.dimse_commands import (
    C_GET_RSP,
    C_MOVE_RSP,
    C_STORE_RSP,
    PENDING,
    c_store_rq,
    parse_command,
    retrieve_pending_rsp,
)
from dicomgrid.core.ul import P_DATA_TF, PDU_HEADER, PDV_HEADER, p_data_pdus

log = get_logger(__name__)

_DUL_NEEDS = ("_is_transport_event", "_send", "_recv_pdu", "_decode_pdu", "_idle_timer", "event_queue",
              "to_provider_queue")
# Writes are gathered into pieces of about this size: one send per small instance, bounded copies.
WRITE_BYTES = 1024 * 1024
# Size of one read from the socket (a C-STORE-RSP is about a hundred bytes).
RECEIVE_BYTES = 64 * 1024
# How long to wait for pynetdicom to write what it queued before a direct write goes after it.
_DRAIN_S = 5.0
_RESPONSES = {C_GET: C_GET_RSP, C_MOVE: C_MOVE_RSP}


class _Status(Dataset):
    """A C-STORE-RSP status that cannot be changed once made."""

    def __init__(self, status: int) -> None:
        super().__init__()
        self.Status = status
        self._frozen = True

    def _refuse(self) -> None:
        if getattr(self, "_frozen", False):
            raise TypeError("a shared sub-operation status is read-only")

    def __setattr__(self, name: str, value: Any) -> None:
        self._refuse()
        super().__setattr__(name, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._refuse()
        super().__setitem__(key, value)

    def __delattr__(self, name: str) -> None:
        self._refuse()
        super().__delattr__(name)

    def __delitem__(self, key: Any) -> None:
        self._refuse()
        super().__delitem__(key)


# What every successful sub-operation returns: its readers (pynetdicom's C-GET and C-MOVE loops, the
# retrieve service) only read the status, and a Dataset made and filled for each one cost more of a
# 200-instance C-GET than writing its command sets.
SUCCESS = _Status(0x0000)


class _HandOver(Exception):
    """What came from the peer is pynetdicom's to handle (or nothing came)."""

    def __init__(self, reason: str = "handed over") -> None:
        super().__init__(reason)
        self.reason = reason


class DirectLink:
    """Direct C-STORE sub-operations on one association (see the module docstring)."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self._lock = threading.Lock()
        self._contexts: dict[tuple[str, str], int] = {}
        # Pending responses not written yet: they go out with the next write on the socket, whoever
        # makes it, so the peer gets a response and the next request from one segment.
        self._deferred: list[bytes | memoryview] = []
        # Bytes read from the socket that are not a whole PDU yet.
        self._inbox = bytearray()
        self._buffer = bytearray(RECEIVE_BYTES)
        transport_event, send = self.dul._is_transport_event, self.dul._send

        def gated_transport_event() -> bool:
            if not self._lock.acquire(blocking=False):
                return False  # the socket is being read by a sub-operation
            try:
                return transport_event()
            finally:
                self._lock.release()

        def gated_send(pdu: Any) -> None:
            with self._lock:
                if self._deferred:
                    try:
                        self._write([])
                    except OSError:
                        pass  # pynetdicom's own send reports the broken connection
                send(pdu)

        self.dul._is_transport_event = gated_transport_event
        self.dul._send = gated_send
        dimse = assoc.dimse
        send_msg = dimse.send_msg

        def send_pending_directly(primitive: Any, context_id: int) -> None:
            if not self.send_pending_response(primitive, context_id):
                send_msg(primitive, context_id)

        dimse.send_msg = send_pending_directly

    @classmethod
    def of(cls, assoc: Association) -> "DirectLink | None":
        """The association's link (made on first use), None when its pynetdicom lacks what it needs."""
        link = getattr(assoc, "_direct_link", None)
        if link is None:
            dul = getattr(assoc, "dul", None)
            sock = getattr(getattr(dul, "socket", None), "socket", None)
            if dul is None or sock is None or not all(hasattr(dul, name) for name in _DUL_NEEDS):
                return None
            link = cls(assoc)
            assoc._direct_link = link  # type: ignore[attr-defined]
        return link

    # -- sending -------------------------------------------------------------------------------------

    def context_id(self, sop_class_uid: str, transfer_syntax_uid: str) -> int:
        """The accepted context to send an instance on, as pynetdicom picks it (ValueError if none)."""
        key = (sop_class_uid, transfer_syntax_uid)
        found = self._contexts.get(key)
        if found is None:
            context = self.assoc._get_valid_context(sop_class_uid, transfer_syntax_uid, "scu", allow_conversion=False)
            found = self._contexts[key] = int(context.context_id)  # type: ignore[arg-type]
        return found

    def send_c_store(self, data_set: memoryview, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     message_id: int, *, priority: int = 2, move_originator_aet: str | None = None,
                     move_originator_id: int | None = None) -> Dataset | None:
        """Send one C-STORE-RQ with ``data_set`` (the encoded data set, no file meta) and return the
        response's status as pynetdicom's ``send_c_store`` does (an empty ``Dataset`` when the
        association broke or the peer did not answer in time); None when nothing was sent because
        pynetdicom still had PDUs of its own to write (the caller then sends through pynetdicom)."""
        context_id = self.context_id(sop_class_uid, transfer_syntax_uid)
        command = c_store_rq(message_id, sop_class_uid, sop_instance_uid, priority=priority,
                             move_originator_aet=move_originator_aet, move_originator_id=move_originator_id)
        pdus = p_data_pdus(context_id, command, data_set, self.assoc.dimse.maximum_pdu_size)
        if not self._take():
            return None
        outcome: Dataset | str
        try:
            self._write(pdus)
            outcome = self._await_success(message_id)
        except _HandOver as handed:
            outcome = handed.reason
        except (OSError, ValueError) as exc:  # connection lost, or a PDU cut short
            self._lost(exc)
            outcome = "lost"
        finally:
            # Released before anything below may abort: pynetdicom's abort waits for the DUL thread,
            # which may be waiting for this lock to write.
            self._lock.release()
        if isinstance(outcome, Dataset):
            return outcome
        if outcome == "lost":
            return Dataset()
        if outcome == "no response":
            self.assoc._handle_no_response()
            return Dataset()
        return self._await_pynetdicom()

    def send_pending_response(self, primitive: Any, context_id: int) -> bool:
        """Write a pending C-GET/C-MOVE response without an identifier; False for any other message
        (for pynetdicom to send)."""
        command_field = _RESPONSES.get(type(primitive))
        if (command_field is None or primitive.MessageIDBeingRespondedTo is None or primitive.Status != PENDING
                or primitive.Identifier is not None or primitive.ErrorComment is not None
                or getattr(primitive, "OffendingElement", None) is not None):
            return False
        counts = (primitive.NumberOfRemainingSuboperations, primitive.NumberOfCompletedSuboperations,
                  primitive.NumberOfFailedSuboperations, primitive.NumberOfWarningSuboperations)
        if primitive.AffectedSOPClassUID is None or any(c is None for c in counts):
            return False
        command = retrieve_pending_rsp(command_field, primitive.MessageIDBeingRespondedTo,
                                       primitive.AffectedSOPClassUID, *counts)
        if not self._take():
            return False
        try:
            self._deferred.extend(p_data_pdus(context_id, command, None, self.assoc.dimse.maximum_pdu_size))
        finally:
            self._lock.release()
        return True

    # -- the socket ----------------------------------------------------------------------------------

    def _take(self) -> bool:
        """Hold the lock once pynetdicom has written everything it queued (False: it did not in time)."""
        if not self.assoc.is_established:
            return False
        deadline = time.monotonic() + _DRAIN_S
        while True:
            if self.dul.to_provider_queue.empty():
                self._lock.acquire()
                if self.dul.to_provider_queue.empty():
                    return True
                self._lock.release()
            if time.monotonic() > deadline or not self.dul.is_alive():
                return False
            time.sleep(0.0001)

    @property
    def _socket(self) -> Any:
        return self.dul.socket.socket

    def _write(self, buffers: list[bytes | memoryview]) -> None:
        sock = self._socket
        if sock is None:
            raise OSError("association socket closed")
        piece: list[bytes | memoryview] = []
        size = 0
        if self._deferred:
            buffers = [*self._deferred, *buffers]
            self._deferred.clear()
        for buffer in buffers:
            piece.append(buffer)
            size += len(buffer)
            if size >= WRITE_BYTES:
                sock.sendall(b"".join(piece))
                piece, size = [], 0
        if piece:
            sock.sendall(b"".join(piece))

    def _readable(self, sock: Any, timeout: float | None) -> bool:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        ready, _, _ = select.select([sock], [], [], timeout)
        return bool(ready)

    def _read_pdu(self) -> bytes | None:
        """The next whole PDU from the socket; None if nothing arrived within the DIMSE timeout."""
        inbox = self._inbox
        while True:
            if len(inbox) >= PDU_HEADER.size:
                end = PDU_HEADER.size + PDU_HEADER.unpack_from(inbox)[2]
                if len(inbox) >= end:
                    pdu = bytes(inbox[:end])
                    del inbox[:end]
                    return pdu
            sock = self._socket
            if sock is None:
                raise OSError("association socket closed")
            if not self._readable(sock, self.assoc.dimse_timeout):
                if not inbox:
                    return None
                raise ValueError("PDU cut short by a timeout")
            count = sock.recv_into(self._buffer)
            if count == 0:
                raise OSError("connection closed by the peer")
            inbox += memoryview(self._buffer)[:count]

    def _rest_of_inbox(self) -> list[bytes]:
        """The PDUs received after the one being looked at, read up to the end of the last one."""
        rest = []
        while self._inbox:
            pdu = self._read_pdu()
            if pdu is None:
                raise ValueError("PDU cut short by a timeout")
            rest.append(pdu)
        return rest

    def _pass_on_the_rest(self) -> None:
        """Whatever followed the response (a C-CANCEL, an A-RELEASE-RQ) is pynetdicom's."""
        if self._inbox:
            try:
                self._hand_over([])
            except _HandOver:
                pass

    def _await_success(self, message_id: int) -> Dataset:
        """Read PDUs until the C-STORE-RSP; a successful one is answered here, the rest handed over."""
        received: list[bytes] = []
        command = bytearray()
        while True:
            pdu = self._read_pdu()
            if pdu is None:
                raise _HandOver("no response")
            received.append(pdu)
            self.dul._idle_timer.restart()
            if pdu[0] != P_DATA_TF:
                self._hand_over(received)
            offset, complete = PDU_HEADER.size, False
            while offset < len(pdu):
                if complete:
                    self._hand_over(received)  # more after the command set: not a plain response
                length, _, control = PDV_HEADER.unpack_from(pdu, offset)
                start, offset = offset + PDV_HEADER.size, offset + 4 + length
                if not control & 0x01 or length < 2 or offset > len(pdu):
                    self._hand_over(received)
                command += pdu[start:offset]
                complete = bool(control & 0x02)
            if not complete:
                continue
            try:
                values = parse_command(command)
            except ValueError:
                self._hand_over(received)
            if (values.us(0x0100) == C_STORE_RSP and values.us(0x0120) == message_id
                    and values.us(0x0900) == 0x0000 and values.us(0x0800) == 0x0101):
                self._pass_on_the_rest()
                return SUCCESS
            self._hand_over(received)

    def _hand_over(self, received: list[bytes]) -> None:
        """Queue PDUs for the DUL thread as if it had read them itself (with any received after
        them), then stop reading."""
        for pdu in [*received, *self._rest_of_inbox()]:
            try:
                decoded, event = self.dul._decode_pdu(bytearray(pdu))
            except Exception:
                self.dul.event_queue.put("Evt19")  # unrecognised or invalid PDU, as pynetdicom reacts
                raise _HandOver() from None
            self.dul._recv_pdu.put(decoded)
            self.dul.event_queue.put(event)
        raise _HandOver()

    def _await_pynetdicom(self) -> Dataset:
        """Wait for the response through pynetdicom, as its ``send_c_store`` does."""
        assoc = self.assoc
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused and assoc.is_alive():
                time.sleep(0.0001)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if response is None:
            assoc._handle_no_response()
            return Dataset()
        return assoc._check_received_status(response)

    def _lost(self, exc: Exception) -> None:
        log.warning("association lost during a sub-operation", error=str(exc))
        self.dul.event_queue.put("Evt17")  # transport connection closed, as pynetdicom reports it
