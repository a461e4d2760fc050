"""The consumers' reads of the DICOM index (C-FIND, QIDO-RS, retrieve, ingest's version look-up).

Every read names a partition key or a Storage-Attached Index: never ALLOW FILTERING. Results are paged
with ``fetch_size`` and consumed lazily, so a large answer is never held in memory at once; what the
indexes cannot express is matched in Python by :mod:`dicomgrid.consumers.query`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.events import InstanceRef, StoredVersion
from dicomgrid.core.index_rows import STUDY_BUCKETS

# Large IN lists load a single coordinator: instances are asked for in slices of this many.
IN_SLICE = 100
# What a retrieve needs of an instance row: decoding the other ten columns of every row of a study
# cost the retrieve services more than the query's round trip.
_STORED_COLUMNS = "study_uid, series_uid, sop_instance_uid, sop_class_uid, transfer_syntax_uid, sha256"


@dataclass(frozen=True)
class StoredInstance:
    """One indexed instance and the payload that holds it."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str

    @property
    def ref(self) -> InstanceRef:
        return InstanceRef(self.study_uid, self.sop_instance_uid, self.sop_class_uid)

    @classmethod
    def from_row(cls, row: Any) -> "StoredInstance":
        return cls(
            row.study_uid, row.series_uid, row.sop_instance_uid, row.sop_class_uid, row.transfer_syntax_uid, row.sha256
        )


class IndexReader:
    """Index reads for one site's services, in its own datacenter."""

    QUERY_PAGE_ROWS = 500
    SCAN_PAGE_ROWS = 200

    def __init__(self, db: Cassandra) -> None:
        self.db = db

    def current_version(self, sop_instance_uid: str) -> Callable[[], StoredVersion | None]:
        """Start looking up the indexed payload of a SOP Instance UID; call the result to get it.

        Asynchronous so that ingest overlaps the lookup with writing the payload.
        """
        future = self.db.execute_async(
            "SELECT sha256, version FROM instance_locations WHERE sop_instance_uid = ?", (sop_instance_uid,), timeout=2.0
        )

        def result() -> StoredVersion | None:
            row = future.result().one()
            return StoredVersion(row.sha256, row.version) if row else None

        return result

    def max_version(self, sop_instance_uid: str) -> int:
        rows = self.db.execute("SELECT version FROM instance_versions WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return max((r.version for r in rows), default=0)

    def all_instances(self) -> Iterable[Any]:
        """Every indexed instance, study by study (a full scan, page by page: for exports only)."""
        return self.db.paged("SELECT * FROM instances", [()], self.SCAN_PAGE_ROWS * 5)

    def all_versions(self) -> Iterable[Any]:
        """Every stored version of every instance (a full scan, page by page: for healing jobs only)."""
        return self.db.paged(
            "SELECT sop_instance_uid, sha256, version, study_uid, size, received_site FROM instance_versions",
            [()], self.SCAN_PAGE_ROWS * 5,
        )

    def study(self, study_uid: str) -> Any:
        return self.db.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).one()

    def instances_of_study(self, study_uid: str) -> list[Any]:
        return list(self.db.execute("SELECT * FROM instances WHERE study_uid = ?", (study_uid,)))

    def patients_of(self, study_uids: Iterable[str]) -> dict[str, tuple[str | None, str | None]]:
        """(PatientID, PatientName) of each study (for the audit trail)."""
        return {row.study_uid: (row.patient_id, row.patient_name) for row in self.db.paged(
            "SELECT study_uid, patient_id, patient_name FROM studies WHERE study_uid = ?",
            [(uid,) for uid in dict.fromkeys(study_uids)], self.QUERY_PAGE_ROWS,
        )}

    def study_uids_of_patient(self, patient_id: str) -> list[str]:
        return sorted(row.study_uid for row in self.db.execute(
            "SELECT study_uid FROM studies WHERE patient_id = ?", (patient_id,)
        ))

    def find_instances(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uids: Iterable[str] = ()
    ) -> list[StoredInstance]:
        """The newest indexed version of the instances of a study, one of its series, or some of its instances.

        ``sop_instance_uids`` narrows a series (it needs ``series_uid``: the index is study/series/instance);
        they are asked for in slices of :data:`IN_SLICE`.
        """
        wanted = list(dict.fromkeys(sop_instance_uids))
        if series_uid is None:
            rows = list(self.db.execute(f"SELECT {_STORED_COLUMNS} FROM instances WHERE study_uid = ?", (study_uid,)))
        elif not wanted:
            rows = list(self.db.execute(
                f"SELECT {_STORED_COLUMNS} FROM instances WHERE study_uid = ? AND series_uid = ?", (study_uid, series_uid)
            ))
        else:
            rows = []
            for start in range(0, len(wanted), IN_SLICE):
                rows += self.db.execute(
                    f"SELECT {_STORED_COLUMNS} FROM instances WHERE study_uid = ? AND series_uid = ? "
                    "AND sop_instance_uid IN ?",
                    (study_uid, series_uid, wanted[start:start + IN_SLICE]),
                )
        return [StoredInstance.from_row(row) for row in rows]

    def instance_location(self, sop_instance_uid: str) -> Any:
        return self.db.execute(
            "SELECT * FROM instance_locations WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).one()

    # -- query reads (C-FIND, QIDO-RS) -----------------------------------------------------------

    def _buckets(self, cql: str) -> Iterable[Any]:
        return self.db.paged(cql, [(b,) for b in range(STUDY_BUCKETS)], self.SCAN_PAGE_ROWS)

    def studies_by_uid(self, study_uids: Iterable[str]) -> Iterable[Any]:
        return self.db.paged(
            "SELECT * FROM studies WHERE study_uid = ?", [(u,) for u in study_uids], self.QUERY_PAGE_ROWS
        )

    def studies_by_patient_id(self, patient_id: str) -> Iterable[Any]:
        return self.db.paged("SELECT * FROM studies WHERE patient_id = ?", [(patient_id,)], self.QUERY_PAGE_ROWS)

    def studies_by_accession(self, accession_number: str) -> Iterable[Any]:
        return self.db.paged(
            "SELECT * FROM studies WHERE accession_number = ?", [(accession_number,)], self.QUERY_PAGE_ROWS
        )

    def studies_by_day(self, first: dt.date | None, last: dt.date | None) -> Iterable[Any]:
        """Studies whose StudyDate lies in [first, last]; either bound may be open."""
        if first is not None and last is not None:
            cql, params = "SELECT * FROM studies WHERE study_day >= ? AND study_day <= ?", (first, last)
        elif first is not None:
            cql, params = "SELECT * FROM studies WHERE study_day >= ?", (first,)
        elif last is not None:
            cql, params = "SELECT * FROM studies WHERE study_day <= ?", (last,)
        else:
            raise ValueError("a study day range needs at least one bound")
        return self.db.paged(cql, [params], self.QUERY_PAGE_ROWS)

    def studies_by_modality(self, modality: str) -> Iterable[Any]:
        return self.db.paged(
            "SELECT * FROM studies WHERE modalities_in_study CONTAINS ?", [(modality,)], self.QUERY_PAGE_ROWS
        )

    def all_studies(self) -> Iterable[Any]:
        """Every study, bucket by bucket (for queries no index can narrow)."""
        return self._buckets("SELECT * FROM studies WHERE bucket = ?")

    def series_of_study(self, study_uid: str) -> Iterable[Any]:
        return self.db.paged("SELECT * FROM series WHERE study_uid = ?", [(study_uid,)], self.QUERY_PAGE_ROWS)

    def series_by_uid(self, series_uids: Iterable[str]) -> Iterable[Any]:
        return self.db.paged(
            "SELECT * FROM series WHERE series_uid = ?", [(u,) for u in series_uids], self.QUERY_PAGE_ROWS
        )

    def series_by_modality(self, modality: str) -> Iterable[Any]:
        return self.db.paged("SELECT * FROM series WHERE modality = ?", [(modality,)], self.QUERY_PAGE_ROWS)

    def instances_of_series(self, study_uid: str, series_uid: str) -> Iterable[Any]:
        return self.db.paged(
            "SELECT * FROM instances WHERE study_uid = ? AND series_uid = ?",
            [(study_uid, series_uid)],
            self.QUERY_PAGE_ROWS,
        )

    def instance_locations_of(self, sop_instance_uids: Iterable[str]) -> Iterable[Any]:
        return self.db.paged(
            "SELECT * FROM instance_locations WHERE sop_instance_uid = ?",
            [(u,) for u in sop_instance_uids],
            self.QUERY_PAGE_ROWS,
        )

    def instance_row(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Any:
        return self.db.execute(
            "SELECT * FROM instances WHERE study_uid = ? AND series_uid = ? AND sop_instance_uid = ?",
            (study_uid, series_uid, sop_instance_uid),
        ).one()

    def patients_by_id(self, patient_ids: Iterable[str]) -> Iterable[Any]:
        return self.db.paged(
            "SELECT * FROM patients WHERE patient_id = ?", [(p,) for p in patient_ids], self.QUERY_PAGE_ROWS
        )

    def all_patients(self) -> Iterable[Any]:
        return self._buckets("SELECT * FROM patients WHERE bucket = ?")

    def study_counts_of_patient(self, patient_id: str) -> Iterable[Any]:
        """(number_of_series, number_of_instances) of each study of a patient."""
        return self.db.paged(
            "SELECT number_of_series, number_of_instances FROM studies WHERE patient_id = ?",
            [(patient_id,)],
            self.QUERY_PAGE_ROWS,
        )
