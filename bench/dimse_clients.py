"""pynetdicom clients the harness holds open over one association: C-FIND and C-STORE, one request at a time.

DCMTK's clients start a process per run; these are for measurements that need the time of every single
request (C-FIND latency percentiles, the moment a C-STORE succeeded). Like DCMTK with ``TCP_NODELAY=1``
they set TCP_NODELAY, without which every response would wait on a delayed ACK.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from dicomgrid.core.dimse import set_nodelay

SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)


@dataclass(frozen=True)
class FindAnswer:
    ms: float  # from sending the request until the final response
    matches: int


class _Client:
    calling_ae: str

    def __init__(self, host: str, port: int, called_ae: str) -> None:
        self.host, self.port, self.called_ae = host, port, called_ae
        self.assoc: Association | None = None

    def _ae(self) -> AE:
        raise NotImplementedError

    def __enter__(self) -> "_Client":
        assoc = self._ae().associate(self.host, self.port, ae_title=self.called_ae,
                                     evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        if not assoc.is_established:
            raise RuntimeError(f"association {self.calling_ae} -> {self.called_ae} at {self.host}:{self.port} failed")
        self.assoc = assoc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.assoc is not None:
            self.assoc.release()
            self.assoc = None


class FindClient(_Client):
    """Study Root C-FIND: each query timed, its matches counted."""

    calling_ae = "FINDSCU"

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        return ae

    def find(self, query: Dataset) -> FindAnswer:
        assert self.assoc is not None
        started = time.perf_counter()
        matches, final = 0, None
        for status, _identifier in self.assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code in PENDING:
                matches += 1
            else:
                final = code
        ms = (time.perf_counter() - started) * 1000
        if final != SUCCESS:
            raise RuntimeError(f"C-FIND to {self.called_ae} ended with status {final!r}")
        return FindAnswer(ms, matches)


class StoreClient(_Client):
    """C-STORE of CT images (as stored: Explicit VR Little Endian), one file per request."""

    calling_ae = "STORESCU"

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        return ae

    def store(self, path: Path) -> float:
        """Send one file; return ``time.monotonic()`` of its success response."""
        assert self.assoc is not None
        status = self.assoc.send_c_store(path)
        at = time.monotonic()
        code = getattr(status, "Status", None)
        if code != SUCCESS:
            raise RuntimeError(f"C-STORE of {path.name} to {self.called_ae}: status {code!r}")
        return at


def study_query(**keys: str) -> Dataset:
    """A STUDY-level identifier asking for what a worklist shows; ``keys`` are the matching keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
                    "NumberOfStudyRelatedInstances"):
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def instance_query(study_uid: str, series_uid: str, sop_instance_uid: str) -> Dataset:
    """An IMAGE-level identifier for one instance (unique keys of every level above, as PS3.4 asks)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_instance_uid
    ds.InstanceNumber = ""
    return ds
