"""C-GET sub-operations over the direct link, against a pynetdicom C-GET SCU on a real socket.

The site AE runs its retrieve service over a blob store and a stand-in index; the requestor's storage
handler answers with whatever status a test asks for, so the paths handed back to pynetdicom (warnings,
failures, cancels) run too. Byte identity, counts, and the corrupt-copy contract are checked.
"""

from __future__ import annotations

import os
from io import BytesIO
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from dicomgrid.consumers.retrieve_scp import RetrieveService
from dicomgrid.core.dicomfile import canonical_file_meta
from dicomgrid.core.dimse import SiteAE
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.sub_operations import SUCCESS, DirectLink
from tests.grid import free_port
from tests.unit.peer_sites import FakeLedger, corrupt, site_config, site_context

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"


@dataclass
class FakeIndex:
    items: list[StoredInstance] = field(default_factory=list)

    def find_instances(self, study: str, series: str | None = None, sops: Any = ()) -> list[StoredInstance]:
        return [i for i in self.items if i.study_uid == study]

    def patients_of(self, uids: Any) -> dict[str, tuple[str | None, str | None]]:
        return {}


@dataclass
class Site:
    site: Any
    port: int
    index: FakeIndex
    stored: dict[str, bytes]  # SOP Instance UID -> data set bytes as stored


def _data_set(sop_instance: str, size: int) -> bytes:
    """An explicit VR data set: SOP Class and Instance UIDs, then OB pixel-ish bytes of ``size``."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.PixelData = os.urandom(size)
    ds["PixelData"].VR = "OB"
    buffer = BytesIO()
    fp = DicomFileLike(buffer)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return buffer.getvalue()


@pytest.fixture
def site(tmp_path: Path, pynetdicom_settings) -> Iterator[Site]:
    config = site_config(tmp_path, {"A": free_port()})
    context = site_context(config, "A", FakeLedger())
    index = FakeIndex()
    context.index = index  # type: ignore[assignment]
    stored = {}
    # Sizes around the requestor's fragment size, and one several PDUs long.
    for number, size in enumerate([10, 16_000, 16_372, 40_000, 200_000, 0]):
        uid = f"{SERIES}.{number + 1}"
        body = _data_set(uid, size)
        ref = context.blobs.put_bytes(canonical_file_meta(CTImageStorage, uid, ExplicitVRLittleEndian) + body)
        index.items.append(StoredInstance(STUDY, SERIES, uid, CTImageStorage, ExplicitVRLittleEndian, ref.sha256))
        stored[uid] = body
    ae = SiteAE(config, "A", [RetrieveService(context)], context.audit)
    listeners = ae.serve(spool_dir=tmp_path / "spool", block=False)
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = False
    try:
        yield Site(context, config.site("A").dicom_port, index, stored)
    finally:
        listeners.shutdown()
        listeners.server_close()


@dataclass
class Retrieved:
    responses: list[Dataset]
    received: dict[str, bytes]
    identifier: Dataset | None = None  # of the final response

    @property
    def final(self) -> Dataset:
        return self.responses[-1]


def c_get(site: Site, statuses: dict[str, int] | None = None, cancel_after: int | None = None,
          max_pdu: int = 16_384, cancel_before_response: int | None = None) -> Retrieved:
    received: dict[str, bytes] = {}
    got_enough = threading.Event()

    def on_store(event: evt.Event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        received[uid] = bytes(event.request.DataSet.getvalue())
        if cancel_after is not None and len(received) >= cancel_after:
            got_enough.set()
        if len(received) == cancel_before_response:
            # Queued before this sub-operation's response: the site reads it while waiting for that.
            event.assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelGet)
        return (statuses or {}).get(uid, 0x0000)

    ae = AE(ae_title="GETSCU")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", site.port, ae_title="GRID_A", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = STUDY
    responses, final_identifier = [], None
    try:
        for status, final_identifier in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet,
                                                         msg_id=7):
            responses.append(status)
            if cancel_after is not None and got_enough.is_set() and status.Status == 0xFF00:
                assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelGet)
                cancel_after = None
    finally:
        assoc.release()
    return Retrieved(responses, received, final_identifier)


@pytest.fixture
def handed_back(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many responses pynetdicom's own path waited for (the rest were read by the link)."""
    calls: list[int] = []
    original = DirectLink._await_pynetdicom

    def counted(self: DirectLink) -> Dataset:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(DirectLink, "_await_pynetdicom", counted)
    return calls


@pytest.mark.parametrize("max_pdu", [16_384, 0])
def test_every_instance_arrives_byte_identical_with_pending_counts(site: Site, max_pdu: int, handed_back: list[int]):
    result = c_get(site, max_pdu=max_pdu)
    assert handed_back == []
    assert result.received == site.stored
    pending = [r for r in result.responses if r.Status == 0xFF00]
    total = len(site.stored)
    assert [(r.NumberOfRemainingSuboperations, r.NumberOfCompletedSuboperations, r.NumberOfFailedSuboperations,
             r.NumberOfWarningSuboperations) for r in pending] == [(total - n, n, 0, 0) for n in range(1, total + 1)]
    assert result.final.Status == 0x0000 and result.final.NumberOfCompletedSuboperations == total
    audit = site.site.audit.records[-1]
    assert "6 completed, 0 warning, 0 failed" in audit["description"]


def test_warning_and_failure_statuses_go_through_pynetdicom(site: Site, handed_back: list[int]):
    uids = sorted(site.stored)
    result = c_get(site, statuses={uids[1]: 0xB000, uids[3]: 0xA700})
    assert len(handed_back) == 2
    final = result.final
    assert final.Status == 0xB000  # sub-operations failed or warned
    assert (final.NumberOfCompletedSuboperations, final.NumberOfWarningSuboperations,
            final.NumberOfFailedSuboperations) == (4, 1, 1)
    assert set(result.received) == set(uids)
    # The sub-operations after the handed-back ones went direct again, on the same association.
    assert "4 completed, 1 warning, 1 failed" in site.site.audit.records[-1]["description"]


def test_c_cancel_between_sub_operations_stops_the_retrieve(site: Site):
    result = c_get(site, cancel_after=2)
    assert result.final.Status == 0xFE00
    assert 2 <= len(result.received) < len(site.stored)
    assert result.final.NumberOfRemainingSuboperations == len(site.stored) - len(result.received)


def test_a_c_cancel_ahead_of_a_response_is_handed_to_pynetdicom_with_the_response(site: Site,
                                                                                handed_back: list[int]):
    result = c_get(site, cancel_before_response=2)
    assert handed_back == [1]
    assert result.final.Status == 0xFE00
    assert len(result.received) == 2
    assert result.final.NumberOfCompletedSuboperations == 2
    assert result.final.NumberOfRemainingSuboperations == len(site.stored) - 2


def test_a_corrupt_copy_is_never_sent_and_is_moved_aside(site: Site):
    victim = site.index.items[3]
    corrupt(site.site.blobs.path(victim.sha256))
    result = c_get(site)
    assert victim.sop_instance_uid not in result.received  # no peer has it: the sub-operation failed
    assert {uid: site.stored[uid] for uid in result.received} == result.received
    assert result.final.NumberOfFailedSuboperations == 1
    assert result.identifier is not None and result.identifier.FailedSOPInstanceUIDList == victim.sop_instance_uid
    assert len(list((site.site.blobs.root / "quarantine").iterdir())) == 1


def test_an_association_without_pynetdicoms_dul_internals_gets_no_link():
    assert DirectLink.of(SimpleNamespace(dul=SimpleNamespace(socket=None))) is None  # type: ignore[arg-type]


def test_the_status_shared_by_successful_sub_operations_cannot_be_changed():
    assert SUCCESS.Status == 0x0000 and SUCCESS.get("Status") == 0x0000
    for change in (lambda: setattr(SUCCESS, "Status", 0xA700), lambda: SUCCESS.__setitem__(0x00000900, None),
                   lambda: delattr(SUCCESS, "Status"), lambda: SUCCESS.__delitem__(0x00000900),
                   lambda: setattr(SUCCESS, "ErrorComment", "changed")):
        with pytest.raises(TypeError):
            change()
    assert SUCCESS.Status == 0x0000 and list(SUCCESS.keys()) == [0x00000900]
