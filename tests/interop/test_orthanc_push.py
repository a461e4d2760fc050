"""A real PACS pushes a study: Orthanc sends a five-instance study to site A with C-STORE."""

from __future__ import annotations

import io

import httpx
import pytest
from pydicom.uid import generate_uid

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.dicomfile import split_file_meta
from tests.dicom_samples import make_instance, to_part10
from dicomgrid.core.index_reader import IndexReader
from tests.grid import wait_for
from tests.interop.conftest import Orthanc

pytestmark = [pytest.mark.interop, pytest.mark.cluster]

INSTANCES = 5


def _data_set(part10: bytes) -> bytes:
    return part10[split_file_meta(io.BytesIO(part10))[1] :]


def make_study() -> tuple[str, dict[str, bytes]]:
    """One study of one series of five CT instances: its UID and its Part 10 files by SOP Instance UID."""
    study, series = generate_uid(), generate_uid()
    instances = [
        make_instance(study_uid=study, series_uid=series, InstanceNumber=number, patient_id="INTEROP-ORTHANC",
                      patient_name="Orthanc^Push", StudyDescription="Orthanc push interop")
        for number in range(1, INSTANCES + 1)
    ]
    return study, {ds.SOPInstanceUID: to_part10(ds) for ds in instances}


def upload(orthanc: Orthanc, files: dict[str, bytes]) -> str:
    """Store the files in Orthanc through its REST API; return the Orthanc ID of their study."""
    studies = set()
    for part10 in files.values():
        response = httpx.post(f"{orthanc.url}/instances", content=part10, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["Status"] == "Success"
        studies.add(response.json()["ParentStudy"])
    (study_id,) = studies
    return study_id


def indexed_study(store: IndexReader, study_uid: str):
    """The study row once the indexer has counted all its instances, else None."""
    row = store.study(study_uid)
    return row if row is not None and row.number_of_instances == INSTANCES else None


def test_orthanc_pushes_a_study_to_the_grid(grid, taps, orthanc, indexer_caught_up, metadata_dc1, metadata_dc2):
    study_uid, files = make_study()
    study_id = upload(orthanc, files)
    assert len(httpx.get(f"{orthanc.url}/studies/{study_id}/instances", timeout=10).json()) == INSTANCES
    tap = taps()

    response = httpx.post(f"{orthanc.url}/modalities/{orthanc.grid_modality}/store", content=study_id, timeout=60)

    assert response.status_code == 200, f"{response.status_code} {response.text}; Orthanc log: {orthanc.log}"
    report = response.json()
    assert report["InstancesCount"] == INSTANCES and report["FailedInstancesCount"] == 0, report
    assert report["RemoteAet"] == grid.site("A").ae_title

    def arrived(seen: list[dict]) -> list[dict]:
        return [e for e in seen if e["instance"]["sop_instance_uid"] in files]

    tap.collect(lambda seen: len(arrived(seen)) >= INSTANCES, timeout=30)
    events = arrived(tap.catch_up())
    assert sorted(e["instance"]["sop_instance_uid"] for e in events) == sorted(files)  # one event each
    blobs = BlobStore(grid.config.site_storage("A"), "A")
    for event in events:
        schemas.validate_event(schemas.TOPIC_INSTANCE_STORED, event)
        assert event["source"]["protocol"] == "DIMSE" and event["source"]["calling_ae"] == orthanc.aet
        assert event["study"]["uid"] == study_uid and event["schema_version"] == 2  # the indexer numbers it
        # What Orthanc was given is what the grid keeps: the data set byte for byte.
        stored = blobs.path(event["payload"]["sha256"]).read_bytes()
        assert _data_set(stored) == _data_set(files[event["instance"]["sop_instance_uid"]])

    for store in (metadata_dc1, metadata_dc2):
        row = wait_for(lambda: indexed_study(store, study_uid), timeout=60)
        assert row.number_of_series == 1 and row.patient_id == "INTEROP-ORTHANC"
        assert {r.sop_instance_uid for r in store.instances_of_study(study_uid)} == set(files)
        for event in events:
            location = store.instance_location(event["instance"]["sop_instance_uid"])
            assert location.sha256 == event["payload"]["sha256"] and location.study_uid == study_uid
            assert location.version == 1
