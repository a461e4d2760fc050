"""The metadata-scale set: N synthetic studies, one instance each, the same in the grid and in Orthanc.

Everything follows from ``(studies, seed)``: study ``i`` of a set always has the same UIDs, PatientID,
name and StudyDate (the set is one seeded stream), so an interrupted load resumes where it stopped, and
the grid (loaded through its indexer, :meth:`ScaleStudy.event`) and Orthanc (loaded over REST,
:meth:`ScaleStudy.dicom`) hold the same rows. Patients grow with N (:data:`STUDIES_PER_PATIENT`), so a
PatientID query matches a few studies at every scale, while a 7-day StudyDate range matches more studies
the larger N is (studies spread over :data:`DAYS` days). Each N is its own set (its own keyspace and
Orthanc storage): a 10k measurement never runs over a 100k index.

The queries (:func:`queries`) are seeded too: both archives get the same list.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from bench.corpus import uid
from bench.dimse_clients import study_query

FORMAT_VERSION = 1
STUDIES_PER_PATIENT = 5
FIRST_DAY = dt.date(2015, 1, 1)
DAYS = 3650
RANGE_DAYS = 7
# Every instance of the set claims to have been received at this moment (the index keeps it).
RECEIVED_AT = "2025-01-01T00:00:00Z"


@dataclass(frozen=True)
class ScaleSet:
    studies: int
    seed: int = 1

    @property
    def tag(self) -> str:
        """Names the set in keyspaces, directories and grid names."""
        return f"v{FORMAT_VERSION}_{self.studies}_s{self.seed}"

    @property
    def patients(self) -> int:
        return max(1, self.studies // STUDIES_PER_PATIENT)

    @property
    def token(self) -> str:
        """The 12-digit token in every UID of the set (see :func:`bench.corpus.uid`)."""
        return f"9{FORMAT_VERSION:03d}{self.seed:08d}"

    def items(self, start: int = 0, stop: int | None = None) -> Iterator["ScaleStudy"]:
        """Studies ``start`` .. ``stop - 1`` (default: to the end of the set)."""
        rng = random.Random(f"dicomgrid-scale-{self.seed}")
        for index in range(self.studies if stop is None else min(stop, self.studies)):
            patient, day = rng.randrange(self.patients), rng.randrange(DAYS)
            if index >= start:
                yield ScaleStudy(self, index, patient, FIRST_DAY + dt.timedelta(days=day))


@dataclass(frozen=True)
class ScaleStudy:
    scale: ScaleSet
    index: int
    patient: int
    day: dt.date

    @property
    def patient_id(self) -> str:
        return f"SCALE{self.scale.seed}-{self.patient:06d}"

    @property
    def patient_name(self) -> str:
        return f"Scale^Patient{self.patient:06d}"

    @property
    def study_uid(self) -> str:
        return uid(self.scale.token, 1, self.index + 1)

    @property
    def series_uid(self) -> str:
        return uid(self.scale.token, 2, self.index + 1)

    @property
    def sop_instance_uid(self) -> str:
        return uid(self.scale.token, 3, self.index + 1)

    @property
    def study_date(self) -> str:
        return self.day.strftime("%Y%m%d")

    def event(self) -> dict[str, Any]:
        """The ``dicom.instance.stored`` event the grid's ingest would have published for this study."""
        digest = hashlib.sha256(self.sop_instance_uid.encode()).hexdigest()
        return {
            "event_id": str(uuid.uuid5(uuid.NAMESPACE_OID, self.sop_instance_uid)),
            "event_type": "dicom.instance.stored", "schema_version": 1, "occurred_at": RECEIVED_AT, "site": "A",
            "source": {"protocol": "IMPORT", "calling_ae": None, "called_ae": None, "peer_address": None},
            "patient": {"id": self.patient_id, "issuer": None, "name": self.patient_name,
                        "birth_date": "19700101", "sex": "O"},
            "study": {"uid": self.study_uid, "date": self.study_date, "time": "120000", "accession_number": None,
                      "id": None, "description": "scale", "referring_physician_name": None,
                      "specific_character_set": None},
            "series": {"uid": self.series_uid, "modality": "CT", "number": 1, "description": None,
                       "body_part_examined": None, "date": None, "time": None},
            "instance": {"sop_class_uid": CTImageStorage, "sop_instance_uid": self.sop_instance_uid,
                         "transfer_syntax_uid": ExplicitVRLittleEndian, "number": 1, "rows": None, "columns": None,
                         "number_of_frames": None},
            "payload": {"uri": f"blob://A/sha256/{digest}", "site": "A", "sha256": digest, "size": 1},
            "version": 1, "replaces": None,
        }

    def dicom(self) -> bytes:
        """A small Part 10 file (no pixel data) with the same patient, study, series and instance."""
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.StudyDate, ds.StudyTime = self.study_date, "120000"
        ds.Modality = "CT"
        ds.StudyDescription = "scale"
        ds.PatientName, ds.PatientID = self.patient_name, self.patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, 1
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = self.sop_instance_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()


@dataclass(frozen=True)
class ScaleQuery:
    kind: str  # "patient" | "range"
    keys: dict[str, str]

    def dataset(self) -> Dataset:
        return study_query(**self.keys)


QUERY_KINDS = {"patient": "by PatientID", "range": f"by StudyDate range ({RANGE_DAYS} days)"}


def queries(scale: ScaleSet, per_kind: dict[str, int]) -> list[ScaleQuery]:
    """The same seeded query list for every archive: ``per_kind`` queries of each kind."""
    rng = random.Random(f"dicomgrid-scale-queries-{scale.seed}-{scale.studies}")
    out = []
    for _ in range(per_kind.get("patient", 0)):
        patient = ScaleStudy(scale, 0, rng.randrange(scale.patients), FIRST_DAY)
        out.append(ScaleQuery("patient", {"PatientID": patient.patient_id}))
    for _ in range(per_kind.get("range", 0)):
        start = FIRST_DAY + dt.timedelta(days=rng.randrange(DAYS - RANGE_DAYS))
        end = start + dt.timedelta(days=RANGE_DAYS - 1)
        out.append(ScaleQuery("range", {"StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}"}))
    return out
