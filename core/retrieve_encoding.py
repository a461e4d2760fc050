"""DIMSE command sets and P-DATA-TF PDUs of retrieve sub-operations, encoded with ``struct``.

A C-GET or C-MOVE sends one C-STORE-RQ per instance and, for C-GET, one pending response after each. Their
command sets differ only in a few values (Message ID, SOP Class and Instance UIDs, Move Originator,
sub-operation counts), yet pynetdicom builds each as a pydicom ``Dataset`` and encodes it twice (once for
the group length): a third of the sending thread's time for small instances. The bytes here are the
same as pynetdicom's (Implicit VR Little Endian, elements in tag order, UIDs padded with NUL and AE
titles with a space to even length; the unit tests compare them), built directly.

Received command sets are parsed only as far as a sub-operation needs (the C-STORE-RSP's Command Field,
Message ID Being Responded To and Status); anything else is left to pynetdicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RSP, C_MOVE_RSP = 0x8010, 0x8021
C_CANCEL_RQ = 0x0FFF
DATA_SET_PRESENT, NO_DATA_SET = 0x0001, 0x0101
PENDING = 0xFF00

P_DATA_TF = 0x04
PDU_HEADER = struct.Struct(">BBL")
PDV_HEADER = struct.Struct(">LBB")
# Message Control Header (PS3.8 E.2): bit 0 command (1) or data set (0), bit 1 last fragment.
COMMAND_LAST = 0x03
DATA_MORE, DATA_LAST = 0x00, 0x02

_ELEMENT = struct.Struct("<HHL")
# Command elements whose VR is US (PS3.7 E.1-1): the only values read back from a received command set.
_US_ELEMENTS = frozenset({0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1020, 0x1021, 0x1022, 0x1023, 0x1031})
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


def _element(elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, elem, len(value)) + value


def _us(elem: int, value: int) -> bytes:
    return _ELEMENT.pack(0x0000, elem, 2) + _US.pack(value)


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def _ae(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b" " if len(data) % 2 else data


def _command_set(body: bytes) -> bytes:
    return _element(0x0000, _UL.pack(len(body))) + body


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str, *, priority: int = 2,
               move_originator_aet: str | None = None, move_originator_id: int | None = None) -> bytes:
    """The command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1)."""
    body = b"".join((
        _element(0x0002, _uid(sop_class_uid)),
        _us(0x0100, C_STORE_RQ),
        _us(0x0110, message_id),
        _us(0x0700, priority),
        _us(0x0800, DATA_SET_PRESENT),
        _element(0x1000, _uid(sop_instance_uid)),
        _element(0x1030, _ae(move_originator_aet)) if move_originator_aet else b"",
        _us(0x1031, move_originator_id) if move_originator_id is not None else b"",
    ))
    return _command_set(body)


def retrieve_pending_rsp(command_field: int, message_id_being_responded_to: int, sop_class_uid: str,
                         remaining: int, completed: int, failed: int, warning: int) -> bytes:
    """The command set of a pending C-GET-RSP or C-MOVE-RSP without an identifier (PS3.7 9.3.3.2, 9.3.4.2)."""
    body = b"".join((
        _element(0x0002, _uid(sop_class_uid)),
        _us(0x0100, command_field),
        _us(0x0120, message_id_being_responded_to),
        _us(0x0800, NO_DATA_SET),
        _us(0x0900, PENDING),
        _us(0x1020, remaining),
        _us(0x1021, completed),
        _us(0x1022, failed),
        _us(0x1023, warning),
    ))
    return _command_set(body)


def p_data_pdus(context_id: int, command: bytes, data: memoryview | bytes | None,
                max_pdu: int) -> list[bytes | memoryview]:
    """The P-DATA-TF PDUs of one DIMSE message, as buffers to write in order (one PDV per PDU).

    Fragments are at most ``max_pdu`` - 6 bytes, as pynetdicom cuts them (``max_pdu`` is the peer's
    maximum PDU length, 0 for unlimited); data set fragments are slices of ``data``, not copies. An
    empty data set still gets its one (empty) last fragment, as the command set announces one.
    """
    out: list[bytes | memoryview] = []
    out.extend(_pdv_pdus(context_id, command, max_pdu, command=True))
    if data is not None:
        out.extend(_pdv_pdus(context_id, memoryview(data), max_pdu, command=False))
    return out


def _pdv_pdus(context_id: int, payload: bytes | memoryview, max_pdu: int, *, command: bool) -> Iterator[bytes | memoryview]:
    size = max(len(payload), 1) if max_pdu == 0 else max_pdu - 6
    if size <= 0:
        raise ValueError(f"maximum PDU length {max_pdu} leaves no room for a fragment")
    last_flag, more_flag = (COMMAND_LAST, 0x01) if command else (DATA_LAST, DATA_MORE)
    for start in range(0, max(len(payload), 1), size):
        fragment = payload[start:start + size]
        flag = last_flag if start + size >= len(payload) else more_flag
        yield PDU_HEADER.pack(P_DATA_TF, 0, len(fragment) + 6) + PDV_HEADER.pack(len(fragment) + 2, context_id, flag)
        yield fragment


def command_values(command: bytes | memoryview) -> dict[int, int]:
    """The US values of a received command set by element number (group 0000), e.g. 0x0900 Status.

    Other VRs are skipped; raises ``ValueError`` if the elements do not add up to the bytes given.
    """
    view = memoryview(command)
    values: dict[int, int] = {}
    offset, end = 0, len(view)
    while offset < end:
        if offset + 8 > end:
            raise ValueError("truncated command element")
        group, elem, length = _ELEMENT.unpack_from(view, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise ValueError("not a command set element")
        if length == 2 and elem in _US_ELEMENTS:
            values[elem] = _US.unpack_from(view, offset)[0]
        offset += length
    return values
