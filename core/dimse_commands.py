"""DIMSE command sets (PS3.7 section 9 and annex E) the site sends and reads most, encoded directly.

A command set is a handful of group 0000 elements in Implicit VR Little Endian. Building one through
pydicom costs more than the rest of a small C-STORE: the storage path reads requests with
:func:`parse_command` and answers with :func:`c_store_rsp`; C-GET and C-MOVE sub-operations send
:func:`c_store_rq` and :func:`retrieve_pending_rsp`. The bytes are pynetdicom's (elements in tag order,
UIDs padded with NUL and AE titles with a space to even length); unit tests hold them equal.
"""

from __future__ import annotations

import struct

# Command Field values (PS3.7 E.1-1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_GET_RSP = 0x8010
C_MOVE_RSP = 0x8021
C_CANCEL_RQ = 0x0FFF
# Command Data Set Type: a data set follows (any value but 0x0101), or none does.
DATA_SET_PRESENT = 0x0001
NO_DATA_SET = 0x0101
PENDING = 0xFF00

AFFECTED_SOP_CLASS_UID = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
PRIORITY = 0x00000700
COMMAND_DATA_SET_TYPE = 0x00000800
STATUS = 0x00000900
OFFENDING_ELEMENT = 0x00000901
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE_UID = 0x00001000
MOVE_ORIGINATOR_AE_TITLE = 0x00001030
MOVE_ORIGINATOR_MESSAGE_ID = 0x00001031

VERIFICATION = "1.2.840.10008.1.1"

_ELEMENT = struct.Struct("<HHL")


class CommandError(ValueError):
    """A command set that cannot be read (the association is aborted)."""


class Command(dict[int, bytes]):
    """A decoded command set: tag -> raw value."""

    def us(self, tag: int) -> int | None:
        value = self.get(tag)
        return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None

    def text(self, tag: int) -> str | None:
        value = self.get(tag)
        return value.decode("ascii", "replace").strip(" \x00") if value is not None else None

    @property
    def field(self) -> int | None:
        return self.us(COMMAND_FIELD)

    @property
    def has_data_set(self) -> bool:
        return self.us(COMMAND_DATA_SET_TYPE) not in (None, NO_DATA_SET)


def parse_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode an Implicit VR Little Endian command set; raises :class:`CommandError`."""
    view = memoryview(data)
    command = Command()
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            raise CommandError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(view, offset)
        offset += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) outside the command group")
        if length == 0xFFFFFFFF or offset + length > end:
            raise CommandError(f"element (0000,{element:04X}) longer than the command set")
        command[element] = bytes(view[offset : offset + length])
        offset += length
    return command


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, tag, len(value)) + value


def _uid(uid: str) -> bytes:
    # A response echoes the request's UID even when it is invalid (and refused): never fail on it.
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _us(tag: int, value: int) -> bytes:
    return _element(tag, struct.pack("<H", value))


def _ae(title: str) -> bytes:
    raw = title.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _comment(text: str) -> bytes:
    # LO: at most 64 characters, no backslash, padded with a space to even length.
    raw = text.replace("\\", "/")[:64].encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _command_set(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def c_store_rsp(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int,
                error_comment: str | None = None, offending_element: int | None = None) -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2); ``offending_element`` is a tag such as 0x00001000."""
    elements = [
        _element(AFFECTED_SOP_CLASS_UID, _uid(sop_class_uid)),
        _element(COMMAND_FIELD, struct.pack("<H", C_STORE_RSP)),
        _element(MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", message_id)),
        _element(COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(STATUS, struct.pack("<H", status)),
    ]
    if offending_element is not None:
        elements.append(_element(OFFENDING_ELEMENT, struct.pack("<HH", offending_element >> 16, offending_element & 0xFFFF)))
    if error_comment:
        elements.append(_element(ERROR_COMMENT, _comment(error_comment)))
    elements.append(_element(AFFECTED_SOP_INSTANCE_UID, _uid(sop_instance_uid)))
    return _command_set(elements)


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str, *, priority: int = 2,
               move_originator_aet: str | None = None, move_originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set with a data set (PS3.7 9.3.1.1)."""
    elements = [
        _element(AFFECTED_SOP_CLASS_UID, _uid(sop_class_uid)),
        _us(COMMAND_FIELD, C_STORE_RQ),
        _us(MESSAGE_ID, message_id),
        _us(PRIORITY, priority),
        _us(COMMAND_DATA_SET_TYPE, DATA_SET_PRESENT),
        _element(AFFECTED_SOP_INSTANCE_UID, _uid(sop_instance_uid)),
    ]
    if move_originator_aet:
        elements.append(_element(MOVE_ORIGINATOR_AE_TITLE, _ae(move_originator_aet)))
    if move_originator_id is not None:
        elements.append(_us(MOVE_ORIGINATOR_MESSAGE_ID, move_originator_id))
    return _command_set(elements)


def retrieve_pending_rsp(command_field: int, message_id_being_responded_to: int, sop_class_uid: str,
                         remaining: int, completed: int, failed: int, warning: int) -> bytes:
    """A pending C-GET-RSP or C-MOVE-RSP without an identifier (PS3.7 9.3.3.2, 9.3.4.2)."""
    return _command_set([
        _element(AFFECTED_SOP_CLASS_UID, _uid(sop_class_uid)),
        _us(COMMAND_FIELD, command_field),
        _us(MESSAGE_ID_BEING_RESPONDED_TO, message_id_being_responded_to),
        _us(COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        _us(STATUS, PENDING),
        _us(0x00001020, remaining),
        _us(0x00001021, completed),
        _us(0x00001022, failed),
        _us(0x00001023, warning),
    ])


def c_echo_rsp(message_id: int, status: int = 0x0000) -> bytes:
    """A C-ECHO-RSP command set (PS3.7 9.3.5.2)."""
    return _command_set([
        _element(AFFECTED_SOP_CLASS_UID, _uid(VERIFICATION)),
        _element(COMMAND_FIELD, struct.pack("<H", C_ECHO_RSP)),
        _element(MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", message_id)),
        _element(COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(STATUS, struct.pack("<H", status)),
    ])
