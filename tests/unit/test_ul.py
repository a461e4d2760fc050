"""The storage path's own PDU and command set codecs, held against pynetdicom's and pydicom's."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dimse_messages import C_STORE_RQ as C_STORE_RQ_MESSAGE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from dicomgrid.core import ul
from dicomgrid.core.dimse_commands import (
    AFFECTED_SOP_INSTANCE_UID,
    C_STORE_RQ,
    CommandError,
    c_echo_rsp,
    c_store_rsp,
    parse_command,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _pynetdicom_request(*, roles: bool = True, identity: bool = False, max_pdu: int = 16384,
                        ct_syntaxes: tuple[str, ...] = ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1")) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = ul.APPLICATION_CONTEXT
    primitive.calling_ae_title = "STORESCU"
    primitive.called_ae_title = "GRID_A"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 2)
    contexts = [build_context(CT, list(ct_syntaxes)), build_context(MR)]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    items = []
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    items.append(length)
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    items.append(implementation)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PEER_1"
    items.append(version)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 4
    items.append(window)
    if roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = CT, True, False
        items.append(role)
    if identity:
        user = UserIdentityNegotiation()
        user.user_identity_type, user.primary_field = 1, b"alice"
        items.append(user)
    primitive.user_information = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_associate_request_as_pynetdicom_encodes_it():
    request = ul.parse_associate_rq(_pynetdicom_request(identity=True))
    assert (request.protocol_version, request.called_ae, request.calling_ae) == (1, "GRID_A", "STORESCU")
    assert request.application_context == ul.APPLICATION_CONTEXT
    assert [(c.context_id, c.abstract_syntax) for c in request.contexts] == [(1, CT), (3, MR)]
    assert request.contexts[0].transfer_syntaxes == ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1")
    assert request.max_pdu == 16384
    assert (request.implementation_class_uid, request.implementation_version_name) == ("1.2.3.4", "PEER_1")
    assert request.async_ops == (4, 4)
    assert request.roles == {CT: (1, 0)}
    assert request.other_items == {0x58}


@pytest.mark.parametrize("cut", [1, 10, 80, 100])
def test_truncated_associate_request_is_refused(cut):
    data = bytearray(_pynetdicom_request())
    del data[-cut:]
    struct.pack_into(">L", data, 2, len(data) - 6)
    with pytest.raises(ul.ULError):
        ul.parse_associate_rq(bytes(data))


def test_associate_accept_decodes_in_pynetdicom():
    request = ul.parse_associate_rq(_pynetdicom_request())
    contexts = [ul.AcceptedContext(1, ul.ACCEPTANCE, CT, "1.2.840.10008.1.2.4.70"),
                ul.AcceptedContext(3, ul.TRANSFER_SYNTAXES_NOT_SUPPORTED, MR, "")]
    data = ul.encode_associate_ac(request, contexts, max_pdu=262144, implementation_class_uid="1.2.826.0.1",
                                  implementation_version_name="GRID_1", roles={CT: (1, 0)})
    pdu = A_ASSOCIATE_AC()
    pdu.decode(data)
    primitive = pdu.to_primitive()
    assert primitive.called_ae_title == "GRID_A" and primitive.calling_ae_title == "STORESCU"
    assert primitive.application_context_name == ul.APPLICATION_CONTEXT
    results = [(c.context_id, c.result, c.transfer_syntax[0] if c.result == 0 else None)
               for c in primitive.presentation_context_definition_results_list]
    assert results == [(1, 0, "1.2.840.10008.1.2.4.70"), (3, 4, None)]
    by_type = {type(item).__name__: item for item in primitive.user_information}
    assert by_type["MaximumLengthNotification"].maximum_length_received == 262144
    assert by_type["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.826.0.1"
    assert by_type["ImplementationVersionNameNotification"].implementation_version_name == "GRID_1"
    window = by_type["AsynchronousOperationsWindowNegotiation"]
    assert (window.maximum_number_operations_invoked, window.maximum_number_operations_performed) == (1, 1)
    role = by_type["SCP_SCU_RoleSelectionNegotiation"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, True, False)


@pytest.mark.parametrize("max_pdu", [0, 16, 100, 16384])
def test_p_data_fragments_to_the_peers_limit(max_pdu):
    data = bytes(range(256)) * 3
    out = memoryview(ul.encode_p_data(5, data, command=True, max_pdu=max_pdu))
    received, offset, controls = bytearray(), 0, []
    while offset < len(out):
        kind, length = ul.pdu_header(out, offset)
        assert kind == ul.P_DATA_TF
        assert max_pdu == 0 or length <= max_pdu
        pdu = P_DATA_TF()
        pdu.decode(bytes(out[offset : offset + 6 + length]))
        for context_id, control, fragment in ul.iter_pdvs(out[offset + 6 : offset + 6 + length]):
            assert context_id == 5
            controls.append(control)
            received += fragment
        assert [item.presentation_context_id for item in pdu.presentation_data_value_items] == [5]
        offset += 6 + length
    assert bytes(received) == data
    assert all(c & ul.PDV_COMMAND for c in controls)
    assert [c & ul.PDV_LAST for c in controls] == [0] * (len(controls) - 1) + [ul.PDV_LAST]


def test_pdv_longer_than_its_pdu_is_refused():
    body = struct.pack(">LBB", 100, 1, 3) + b"x" * 10
    with pytest.raises(ul.ULError):
        list(ul.iter_pdvs(memoryview(body)))


def _encoded_by_pynetdicom(message_class, primitive_class, **fields) -> bytes:
    """The command set bytes pynetdicom sends for a DIMSE primitive with ``fields``."""
    primitive = primitive_class()
    for name, value in fields.items():
        setattr(primitive, name, value)
    message = message_class()
    message.primitive_to_message(primitive)
    out = bytearray()
    for p_data in message.encode_msg(1, 0):
        for _context_id, pdv in p_data.presentation_data_value_list:
            if pdv[0] & ul.PDV_COMMAND:
                out += pdv[1:]
    return bytes(out)


@pytest.mark.parametrize("status, comment", [(0x0000, None), (0xA700, "out of resources: disk"),
                                             (0xC001, "odd length comment"), (0xA900, "x" * 80 + "\\y")])
@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.840.113619.2.55.3.604688119.969.1268071029.320"])
def test_c_store_response_equals_pydicoms_encoding(status, comment, instance):
    fields = dict(AffectedSOPClassUID=CT, MessageIDBeingRespondedTo=7, Status=status,
                  AffectedSOPInstanceUID=instance)
    if comment:
        fields["ErrorComment"] = comment.replace("\\", "/")[:64]
    expected = _encoded_by_pynetdicom(C_STORE_RSP, C_STORE, **fields)
    assert c_store_rsp(CT, instance, 7, status, comment) == expected


def test_c_store_response_with_an_offending_element_equals_pydicoms_encoding():
    fields = dict(AffectedSOPClassUID=CT, MessageIDBeingRespondedTo=3, Status=0xC001,
                  AffectedSOPInstanceUID="1.2.3", OffendingElement=[0x00001000], ErrorComment="invalid UID")
    expected = _encoded_by_pynetdicom(C_STORE_RSP, C_STORE, **fields)
    assert c_store_rsp(CT, "1.2.3", 3, 0xC001, "invalid UID", 0x00001000) == expected


def test_c_echo_response_equals_pydicoms_encoding():
    expected = _encoded_by_pynetdicom(C_ECHO_RSP, C_ECHO, AffectedSOPClassUID="1.2.840.10008.1.1",
                                      MessageIDBeingRespondedTo=65535, Status=0)
    assert c_echo_rsp(65535) == expected


def test_command_set_as_pydicom_encodes_it():
    data = _encoded_by_pynetdicom(C_STORE_RQ_MESSAGE, C_STORE, AffectedSOPClassUID=CT, MessageID=12, Priority=0,
                                  AffectedSOPInstanceUID="1.2.3", MoveOriginatorApplicationEntityTitle="MOVER",
                                  DataSet=BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00"))
    command = parse_command(data)
    assert command.field == C_STORE_RQ and command.has_data_set
    assert command.us(0x0110) == 12
    assert command.text(AFFECTED_SOP_INSTANCE_UID) == "1.2.3"
    assert command.text(0x1030) == "MOVER"


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x01\x02", struct.pack("<HHL", 0x0008, 0x0016, 0),
                                  struct.pack("<HHL", 0, 0x100, 40) + b"xx"])
def test_undecodable_command_set_is_refused(data):
    with pytest.raises(CommandError):
        parse_command(data)


def test_response_echoes_an_undecodable_uid_without_failing():
    data = c_store_rsp(CT, "1.2.\ufffd3", 1, 0xC001, "invalid")
    assert parse_command(data).text(AFFECTED_SOP_INSTANCE_UID) == "1.2.?3"
