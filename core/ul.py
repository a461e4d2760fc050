"""The DICOM Upper Layer protocol's PDUs (PS3.8 section 9.3), decoded and encoded directly.

The site's storage path (:mod:`dicomgrid.producers.storage_path`) speaks the Upper Layer itself:
pynetdicom's PDU objects cost milliseconds per association request (~25 ms for a storescu request of
~120 presentation contexts) and per P-DATA, which is most of a small instance's CPU budget. Only what
an association acceptor needs is here: the A-ASSOCIATE-RQ it reads, the A-ASSOCIATE-AC, P-DATA-TF,
A-RELEASE-RP and A-ABORT it writes. Everything else (rejections, the query and retrieve services)
stays with pynetdicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07

# Presentation context results (PS3.8 9.3.3.2).
ACCEPTANCE = 0x00
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04

# A-ABORT source and reason (PS3.8 9.3.8): the service provider, for a PDU it cannot take.
ABORT_SOURCE_PROVIDER = 0x02
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_REASON_UNEXPECTED_PDU = 0x02
ABORT_REASON_INVALID_PARAMETER = 0x06

# Message control header bits of a presentation data value (PS3.8 E.2).
PDV_COMMAND = 0x01
PDV_LAST = 0x02

# PDU header (type, reserved, length) and PDV header (item length, context ID, message control header).
PDU_HEADER = struct.Struct(">BBL")
PDV_HEADER = struct.Struct(">LBB")
_ITEM = struct.Struct(">BxH")


class ULError(ValueError):
    """A PDU that does not follow PS3.8: the association is aborted."""


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass
class AssociateRequest:
    """What an A-ASSOCIATE-RQ asks for (the fields an acceptor acts on)."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    # The 64 bytes after the protocol version an A-ASSOCIATE-AC sends back as received (PS3.8 9.3.3).
    echoed: bytes
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    max_pdu: int = 0  # 0: no limit
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    # Abstract syntax -> (SCU role, SCP role) the requestor proposes (PS3.7 D.3.3.4).
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)
    async_ops: tuple[int, int] | None = None
    # User information sub-items beyond the ones above (extended negotiation, user identity), by type.
    other_items: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    result: int
    abstract_syntax: str
    transfer_syntax: str  # the one accepted ("" unless result is ACCEPTANCE)


def _text(raw: bytes | memoryview) -> str:
    # UIDs may be padded with a NUL, AE titles with spaces (PS3.8 9.3.2.2, PS3.5 9.1).
    return bytes(raw).decode("ascii", "replace").strip(" \x00")


def _items(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    offset = 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise ULError("truncated item header")
        kind, length = _ITEM.unpack_from(data, offset)
        start = offset + 4
        if start + length > len(data):
            raise ULError(f"item 0x{kind:02X} longer than its PDU")
        yield kind, data[start : start + length]
        offset = start + length


def parse_associate_rq(pdu: bytes | bytearray | memoryview) -> AssociateRequest:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included); raises :class:`ULError`."""
    data = memoryview(pdu)
    if len(data) < 74 or data[0] != ASSOCIATE_RQ:
        raise ULError("not an A-ASSOCIATE-RQ")
    (length,) = struct.unpack_from(">L", data, 2)
    if length + 6 != len(data):
        raise ULError("A-ASSOCIATE-RQ length does not match its bytes")
    (version,) = struct.unpack_from(">H", data, 6)
    request = AssociateRequest(
        protocol_version=version,
        called_ae=_text(data[10:26]),
        calling_ae=_text(data[26:42]),
        echoed=bytes(data[10:74]),
    )
    for kind, body in _items(data[74:]):
        if kind == 0x10:
            request.application_context = _text(body)
        elif kind == 0x20:
            if len(body) < 4:
                raise ULError("truncated presentation context item")
            abstract, syntaxes = "", []
            for sub, value in _items(body[4:]):
                if sub == 0x30:
                    abstract = _text(value)
                elif sub == 0x40:
                    syntaxes.append(_text(value))
            request.contexts.append(ProposedContext(body[0], abstract, tuple(syntaxes)))
        elif kind == 0x50:
            _user_information(body, request)
    return request


def _user_information(body: memoryview, request: AssociateRequest) -> None:
    for sub, value in _items(body):
        if sub == 0x51 and len(value) == 4:
            (request.max_pdu,) = struct.unpack(">L", value)
        elif sub == 0x52:
            request.implementation_class_uid = _text(value)
        elif sub == 0x55:
            request.implementation_version_name = _text(value)
        elif sub == 0x53 and len(value) == 4:
            request.async_ops = struct.unpack(">HH", value)  # type: ignore[assignment]
        elif sub == 0x54:
            if len(value) < 2:
                raise ULError("truncated role selection item")
            (uid_length,) = struct.unpack_from(">H", value)
            if len(value) != uid_length + 4:
                raise ULError("role selection item length does not match its UID")
            uid = _text(value[2 : 2 + uid_length])
            request.roles[uid] = (value[2 + uid_length], value[3 + uid_length])
        else:
            request.other_items.add(sub)


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(kind: int, body: bytes) -> bytes:
    return _ITEM.pack(kind, len(body)) + body


def _pdu(kind: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(kind, 0, len(body)) + body


def encode_associate_ac(
    request: AssociateRequest,
    contexts: Iterable[AcceptedContext],
    *,
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    roles: dict[str, tuple[int, int]] | None = None,
) -> bytes:
    """The A-ASSOCIATE-AC answering ``request``: one result per proposed context, the accepted roles."""
    parts = [struct.pack(">HH", 1, 0), request.echoed, _item(0x10, _uid_bytes(APPLICATION_CONTEXT))]
    for context in contexts:
        # The transfer syntax sub-item is present for every result; it is significant only on acceptance.
        syntax = _item(0x40, _uid_bytes(context.transfer_syntax or "1.2.840.10008.1.2"))
        parts.append(_item(0x21, bytes((context.context_id, 0, context.result, 0)) + syntax))
    user = [_item(0x51, struct.pack(">L", max_pdu)), _item(0x52, _uid_bytes(implementation_class_uid))]
    if request.async_ops is not None:
        # One operation at a time each way: what the storage path serves.
        user.append(_item(0x53, struct.pack(">HH", 1, 1)))
    for uid, (scu, scp) in (roles or {}).items():
        raw = uid.encode("ascii")
        user.append(_item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu, scp))))
    user.append(_item(0x55, implementation_version_name.encode("ascii")))
    parts.append(_item(0x50, b"".join(user)))
    return _pdu(ASSOCIATE_AC, b"".join(parts))


def encode_release_rp() -> bytes:
    return _pdu(RELEASE_RP, b"\x00\x00\x00\x00")


def encode_abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    return _pdu(ABORT, bytes((0, 0, source, reason)))


def pdv_pdus(context_id: int, payload: bytes | memoryview, max_pdu: int, *, command: bool) -> Iterator[bytes | memoryview]:
    """One message part (command set or data set) as P-DATA-TF PDUs of one PDV each, as buffers to
    write in order: header, then the fragment (a slice of ``payload``, not a copy).

    Fragments are at most ``max_pdu`` - 6 bytes, as pynetdicom cuts them (``max_pdu`` is the peer's
    maximum PDU length, 0 for none). An empty payload still gets its one (empty) last fragment.
    """
    size = max(len(payload), 1) if max_pdu == 0 else max_pdu - 6
    if size <= 0:
        raise ValueError(f"maximum PDU length {max_pdu} leaves no room for a fragment")
    control = PDV_COMMAND if command else 0
    for start in range(0, max(len(payload), 1), size):
        fragment = payload[start : start + size]
        last = PDV_LAST if start + size >= len(payload) else 0
        yield PDU_HEADER.pack(P_DATA_TF, 0, len(fragment) + 6) + PDV_HEADER.pack(len(fragment) + 2, context_id, control | last)
        yield fragment


def p_data_pdus(context_id: int, command: bytes, data: bytes | memoryview | None, max_pdu: int) -> list[bytes | memoryview]:
    """A DIMSE message (command set, then the data set if any) as buffers to write in order."""
    out: list[bytes | memoryview] = list(pdv_pdus(context_id, command, max_pdu, command=True))
    if data is not None:
        out.extend(pdv_pdus(context_id, memoryview(data), max_pdu, command=False))
    return out


def encode_p_data(context_id: int, data: bytes, *, command: bool, max_pdu: int) -> bytes:
    """``data`` as P-DATA-TF PDUs of at most ``max_pdu`` bytes each (the peer's limit, 0 for none)."""
    return b"".join(pdv_pdus(context_id, data, max_pdu, command=command))


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(presentation context ID, message control header, fragment) of each PDV in a P-DATA-TF body."""
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise ULError("truncated presentation data value")
        length, context_id, control = PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ULError("presentation data value length does not fit its PDU")
        yield context_id, control, body[offset + 6 : offset + 4 + length]
        offset += 4 + length


def pdu_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """(PDU type, length of what follows the 6-byte header)."""
    kind, _, length = PDU_HEADER.unpack_from(data, offset)
    return kind, length
