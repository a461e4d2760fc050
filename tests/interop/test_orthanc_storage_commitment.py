"""A real Storage Commitment SCU: Orthanc pushes instances to site A, then asks A to commit them.

Orthanc sends the N-ACTION, releases that association at once, and takes the N-EVENT-REPORT on its own
DICOM port, where the grid's ``remote_aes`` says ORTHANC listens; ``GET /storage-commitment/{id}``
shows what the report said.
"""

from __future__ import annotations

import time

import httpx
import pytest
from pydicom.uid import generate_uid

from dicomgrid import schemas
from dicomgrid.core.ledger import ReplicaLedger
from tests.dicom_samples import make_instance, to_part10
from tests.grid import wait_for
from tests.interop.conftest import Orthanc

pytestmark = [pytest.mark.interop, pytest.mark.cluster]

CT = "1.2.840.10008.5.1.4.1.1.2"


def pushed_by_orthanc(orthanc: Orthanc, count: int) -> list[tuple[str, str]]:
    """Upload ``count`` new CT instances to Orthanc and have it C-STORE them to site A; their (class, UID)."""
    study, series = generate_uid(), generate_uid()
    ids, refs = [], []
    for number in range(1, count + 1):
        ds = make_instance(study_uid=study, series_uid=series, InstanceNumber=number, patient_id="INTEROP-STGCMT")
        response = httpx.post(f"{orthanc.url}/instances", content=to_part10(ds), timeout=30)
        assert response.status_code == 200, response.text
        ids.append(response.json()["ID"])
        refs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    response = httpx.post(f"{orthanc.url}/modalities/{orthanc.grid_modality}/store",
                          json={"Resources": ids, "Synchronous": True}, timeout=60)
    assert response.status_code == 200, f"{response.text}; Orthanc log: {orthanc.log}"
    assert response.json()["FailedInstancesCount"] == 0
    return refs


def commit(orthanc: Orthanc, refs: list[tuple[str, str]], timeout: float = 30.0) -> tuple[dict, float]:
    """Ask site A through Orthanc; Orthanc's view of the transaction once decided, and how long that took."""
    started = time.monotonic()
    response = httpx.post(
        f"{orthanc.url}/modalities/{orthanc.grid_modality}/storage-commitment",
        json={"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i in refs]}, timeout=30,
    )
    assert response.status_code == 200, f"{response.text}; Orthanc log: {orthanc.log}"
    transaction = response.json()["ID"]

    def decided() -> dict | None:
        state = httpx.get(f"{orthanc.url}/storage-commitment/{transaction}", timeout=10).json()
        return state if state["Status"] != "Pending" else None

    state = wait_for(decided, timeout=timeout, interval=0.05)
    return {**state, "ID": transaction}, time.monotonic() - started


def listed(entries: list[dict] | None) -> list[tuple]:
    return [(e["SOPClassUID"], e["SOPInstanceUID"], *(() if "FailureReason" not in e else (e["FailureReason"],)))
            for e in entries or []]


def test_orthanc_is_told_success_once_every_instance_is_replicated(grid, orthanc, taps, metadata_dc1):
    tap = taps(schemas.TOPIC_AUDIT)
    refs = pushed_by_orthanc(orthanc, 3)

    state, seconds = commit(orthanc, refs)
    print(f"\nOrthanc: storage-commitment request -> Success in {seconds:.3f} s")

    assert state["Status"] == "Success", state
    assert state["RemoteAET"] == grid.site("A").ae_title
    assert sorted(listed(state["Success"])) == sorted(refs) and not state.get("Failures")
    # It was true when the report went: both sites hold a verified copy of each.
    ledger = ReplicaLedger(metadata_dc1.db)
    for _, uid in refs:
        assert ledger.verified_sites(metadata_dc1.instance_location(uid).sha256) == {"A", "B"}
    # The report went to Orthanc's own DICOM port, on an association the grid opened.
    peer = grid.config.remote_aes[orthanc.aet]
    delivered = tap.collect(lambda seen: any(
        state["ID"] in r["outcome_description"] and "delivered" in r["outcome_description"] for r in seen), timeout=15)
    (record,) = [r for r in delivered if state["ID"] in r["outcome_description"] and "delivered" in
                 r["outcome_description"]]
    assert record["outcome"] == 0
    assert {(p["ae_title"], p["network_address"], p["role"]) for p in record["participants"] if not p["requestor"]} >= {
        (orthanc.aet, f"{peer.host}:{peer.port}", "Destination")}


def test_orthanc_is_told_which_instance_is_unknown(grid, orthanc):
    (known,) = pushed_by_orthanc(orthanc, 1)
    unknown = (CT, generate_uid())

    state, _ = commit(orthanc, [known, unknown])

    assert state["Status"] == "Failure", state
    assert listed(state["Success"]) == [known]
    assert listed(state["Failures"]) == [(*unknown, 0x0112)]


def test_orthanc_stores_and_asks_for_commitment_in_one_job(grid, orthanc):
    # What a PACS set up to commit every push does: Orthanc's store job sends the N-ACTION itself.
    ds = make_instance(patient_id="INTEROP-STGCMT")
    oid = httpx.post(f"{orthanc.url}/instances", content=to_part10(ds), timeout=30).json()["ID"]
    job = httpx.post(f"{orthanc.url}/modalities/{orthanc.grid_modality}/store",
                     json={"Resources": [oid], "StorageCommitment": True, "Synchronous": True}, timeout=60).json()
    transaction = job["StorageCommitmentTransactionUID"]

    def decided() -> dict | None:
        state = httpx.get(f"{orthanc.url}/storage-commitment/{transaction}", timeout=10).json()
        return state if state["Status"] != "Pending" else None

    state = wait_for(decided, timeout=30, interval=0.05)
    assert state["Status"] == "Success", state
    assert listed(state["Success"]) == [(str(ds.SOPClassUID), str(ds.SOPInstanceUID))]
