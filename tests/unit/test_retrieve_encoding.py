"""Retrieve sub-operation command sets and PDUs, encoded directly, are byte for byte pynetdicom's."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from dicomgrid.core import dimse_commands as commands
from dicomgrid.core import ul
from dicomgrid.core.dicomfile import canonical_file_meta, data_set_offset, split_file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
GET_STUDY = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE_PATIENT = "1.2.840.10008.5.1.4.1.2.1.2"


def _command_set(message_class: type, primitive: object) -> bytes:
    message = message_class()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize("message_id, sop_class, sop_instance, aet, originator_id", [
    (1, CT, "1.2.3.4", None, None),  # odd and even UID lengths, no Move Originator
    (65535, SC, "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567", "MOVESCU", 7),
    (3, "1.2", "1.23", "ABCDEFGHIJKLMNOP", 0),  # a 16-character AE title, Move Originator Message ID 0
    (42, CT, "2.25.1", "A", 65535),  # odd-length AE title is padded with a space
])
def test_c_store_rq_command_set_matches_pynetdicom(message_id, sop_class, sop_instance, aet, originator_id):
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = aet
    primitive.MoveOriginatorMessageID = originator_id
    primitive.DataSet = io.BytesIO(b"\x08\x00\x16\x00")
    expected = _command_set(C_STORE_RQ, primitive)
    assert commands.c_store_rq(message_id, sop_class, sop_instance, move_originator_aet=aet,
                          move_originator_id=originator_id) == expected


@pytest.mark.parametrize("primitive_class, message_class, command_field, model", [
    (C_GET, C_GET_RSP, commands.C_GET_RSP, GET_STUDY),
    (C_MOVE, C_MOVE_RSP, commands.C_MOVE_RSP, MOVE_PATIENT),
])
@pytest.mark.parametrize("counts", [(199, 1, 0, 0), (0, 65535, 3, 2), (10, 0, 0, 0)])
def test_pending_retrieve_response_matches_pynetdicom(primitive_class, message_class, command_field, model, counts):
    primitive = primitive_class()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.AffectedSOPClassUID = model
    primitive.Status = 0xFF00
    (primitive.NumberOfRemainingSuboperations, primitive.NumberOfCompletedSuboperations,
     primitive.NumberOfFailedSuboperations, primitive.NumberOfWarningSuboperations) = counts
    assert commands.retrieve_pending_rsp(command_field, 9, model, *counts) == _command_set(message_class, primitive)


def _pynetdicom_pdus(tmp_path: Path, data: bytes, max_pdu: int) -> list[bytes]:
    """The PDUs pynetdicom writes for a C-STORE-RQ whose data set it streams from a file."""
    path = tmp_path / "instance.dcm"
    meta = canonical_file_meta(CT, "1.2.3.4", ExplicitVRLittleEndian)
    path.write_bytes(meta + data)
    primitive = C_STORE()
    primitive.MessageID = 5
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    primitive.Priority = 2
    primitive._dataset_path = (path, len(meta))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return [P_DATA_TF(pdata).encode() for pdata in message.encode_msg(3, max_pdu)]


@pytest.mark.parametrize("size", [0, 1, 1000, 16_378, 16_379, 50_000])
@pytest.mark.parametrize("max_pdu", [16_384, 131_072, 0])
def test_c_store_pdus_match_pynetdicom(tmp_path, size, max_pdu):
    data = os.urandom(size)
    mine = ul.p_data_pdus(3, commands.c_store_rq(5, CT, "1.2.3.4"), memoryview(data), max_pdu)
    assert b"".join(mine) == b"".join(_pynetdicom_pdus(tmp_path, data, max_pdu))


def test_a_command_set_larger_than_a_pdu_is_fragmented():
    command = commands.c_store_rq(1, CT, "1.2.3." + "4" * 58, move_originator_aet="MOVESCU", move_originator_id=1)
    pdus = b"".join(ul.p_data_pdus(1, command, None, 64))
    fragments, offset = [], 0
    while offset < len(pdus):
        _, _, length = ul.PDU_HEADER.unpack_from(pdus, offset)
        item_length, context_id, control = ul.PDV_HEADER.unpack_from(pdus, offset + 6)
        assert length == item_length + 4 <= 64 and context_id == 1 and control & 0x01
        fragments.append((control, pdus[offset + 12:offset + 6 + length]))
        offset += 6 + length
    assert [c for c, _ in fragments] == [0x01] * (len(fragments) - 1) + [0x03]
    assert b"".join(f for _, f in fragments) == command


def test_received_command_values_are_read_from_a_c_store_response():
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 77
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    primitive.Status = 0xB000
    values = commands.parse_command(_command_set(C_STORE_RSP, primitive))
    assert values.us(0x0100) == commands.C_STORE_RSP and values.us(0x0120) == 77 and values.us(0x0900) == 0xB000
    assert values.us(0x0800) == commands.NO_DATA_SET
    with pytest.raises(ValueError):
        commands.parse_command(_command_set(C_STORE_RSP, primitive)[:-3])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_data_set_offset_of_the_grids_file_meta_and_of_other_meta_groups(syntax):
    body = b"\x08\x00\x16\x00" + os.urandom(100)
    grid_file = canonical_file_meta(CT, "1.2.3.4.5", syntax) + body
    assert grid_file[data_set_offset(grid_file):] == body

    # A meta group written by pydicom with more elements, and one without a group length first.
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.SourceApplicationEntityTitle = "SOURCE"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    written = buffer.getvalue()
    _, end = split_file_meta(io.BytesIO(written))
    assert data_set_offset(written + body) == end
    without_group_length = written[:132] + written[144:end]
    assert data_set_offset(without_group_length + body) == end - 12
