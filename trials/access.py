"""What a trial sees of the grid, and how its pseudonymous requests map back to stored instances.

A trial sees its member studies (those named, and every study of its member patients) and nothing else.
Requests name what the trial has seen, pseudonyms, which cannot be reversed: they are resolved by
pseudonymizing the member studies, their series and their instances and comparing. Trials are small
(tens to thousands of studies), and every request starts from the member list, so a non-member's study
cannot be reached by any UID.

Query results are built from the index, then de-identified by the same engine as retrieved instances
(the index record is made a data set first), so a study's pseudonymous UIDs, patient and shifted dates
are the same in a C-FIND answer, a QIDO-RS answer and the retrieved instances.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomgrid.consumers.payloads import Payloads
from dicomgrid.consumers.query import (
    _IMAGE_ATTRS,
    _SERIES_ATTRS,
    _STUDY_ATTRS,
    PATIENT_COUNTS,
    Level,
    Query,
    QueryCancelled,
    Record,
    _values,
)
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.site import SiteContext
from dicomgrid.trials.engine import Deidentifier, identifying_class, identifying_pixels, method_description
from dicomgrid.trials.profile import Profile
from dicomgrid.trials.store import Trial, TrialStore

# Payload digest -> why its pixels may show identity ('' when nothing says so); headers are read once.
_HEADER_CACHE_ENTRIES = 50_000


class _HeaderVerdicts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verdicts: OrderedDict[str, str] = OrderedDict()

    def get(self, digest: str, read: Callable[[], str]) -> str:
        with self._lock:
            if digest in self._verdicts:
                self._verdicts.move_to_end(digest)
                return self._verdicts[digest]
        verdict = read()
        with self._lock:
            self._verdicts[digest] = verdict
            while len(self._verdicts) > _HEADER_CACHE_ENTRIES:
                self._verdicts.popitem(last=False)
        return verdict


_VERDICTS = _HeaderVerdicts()


@dataclass(frozen=True)
class Release:
    """The instances a retrieve names: those released and those withheld (with the reason)."""

    released: list[StoredInstance]
    withheld: list[tuple[StoredInstance, str]]
    patients: dict[str, tuple[str, str]]  # original study UID -> original (Patient ID, name): audit trail only


class TrialAccess:
    """One trial at one site: its members, its de-identifier, its pseudonym maps."""

    def __init__(self, site: SiteContext, store: TrialStore, trial: Trial, payloads: Payloads,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.site = site
        self.store = store
        self.trial = trial
        self.payloads = payloads
        self.cancelled = cancelled
        self.pseudonyms = trial.pseudonyms()
        self.withheld_skipped = 0  # instances a query did not list because they are withheld
        self.deidentifier = Deidentifier(Profile(trial.options), self.pseudonyms, method_description(trial.name))

    # -- membership -----------------------------------------------------------------------------------

    def member_studies(self) -> list[Any]:
        """Index rows of the member studies (each once), in a stable order."""
        members = self.store.members(self.trial.name)
        index = self.site.index
        rows: dict[str, Any] = {}
        for row in index.studies_by_uid(members.studies):
            rows[row.study_uid] = row
        for patient in members.patients:
            for row in index.studies_by_patient_id(patient):
                rows[row.study_uid] = row
        return [rows[uid] for uid in sorted(rows)]

    def _check(self) -> None:
        if self.cancelled():
            raise QueryCancelled

    # -- de-identified records ----------------------------------------------------------------------

    def deidentify_record(self, record: Record) -> Record:
        ds = Dataset()
        for keyword, value in record.items():
            if value is None or value == "" or keyword in PATIENT_COUNTS:
                continue
            if isinstance(value, frozenset):
                value = sorted(value)
            tag = tag_for_keyword(keyword)
            ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE))
        self.deidentifier.deidentify(ds)
        out: Record = {}
        for keyword, value in record.items():
            if keyword in PATIENT_COUNTS:
                out[keyword] = value
                continue
            got = ds.get(keyword)
            if isinstance(value, frozenset):
                out[keyword] = frozenset(str(v) for v in (got if isinstance(got, (MultiValue, list)) else [got])
                                         if v not in (None, ""))
            elif got is None or got == "":
                out[keyword] = None
            elif isinstance(value, int):
                out[keyword] = value
            else:
                out[keyword] = str(got)
        return out

    def _studies(self, query: Query) -> Iterator[tuple[Any, Record, Record]]:
        """(row, original record, de-identified record) of member studies matching the study-level keys."""
        wanted = query.uids("StudyInstanceUID")
        for row in self.member_studies():
            self._check()
            if wanted is not None and self.pseudonyms.uid(row.study_uid) not in wanted:
                continue
            original = _values(row, _STUDY_ATTRS)
            record = self.deidentify_record(original)
            if query.matches(record, Level.PATIENT, Level.STUDY):
                yield row, original, record

    def _series(self, query: Query) -> Iterator[tuple[Record, Record, Record]]:
        wanted = query.uids("SeriesInstanceUID")
        for row, original, _ in self._studies(query):
            for series_row in self.site.index.series_of_study(row.study_uid):
                self._check()
                if wanted is not None and self.pseudonyms.uid(series_row.series_uid) not in wanted:
                    continue
                series_original = {**original, **_values(series_row, _SERIES_ATTRS)}
                record = self.deidentify_record(series_original)
                if query.matches(record, Level.SERIES):
                    yield original, series_original, record

    def find(self, query: Query) -> Iterator[Record]:
        """De-identified records matching a query (C-FIND or QIDO-RS), like QueryEngine.find."""
        if query.level == Level.PATIENT:
            yield from self._patients(query)
        elif query.level == Level.STUDY:
            for _, _, record in self._studies(query):
                yield record
        elif query.level == Level.SERIES:
            for _, _, record in self._series(query):
                yield record
        else:
            yield from self._instances(query)

    def _patients(self, query: Query) -> Iterator[Record]:
        seen: dict[str, tuple[Record, list[Any]]] = {}
        for row in self.member_studies():
            self._check()
            original = _values(row, _STUDY_ATTRS)
            patient = {k: v for k, v in original.items() if ATTRIBUTE_LEVEL.get(k) == Level.PATIENT}
            key = row.patient_id or f"study:{row.study_uid}"
            seen.setdefault(key, (patient, []))[1].append(row)
        for patient, rows in seen.values():
            record = self.deidentify_record({**patient, "StudyInstanceUID": rows[0].study_uid})
            record.pop("StudyInstanceUID")
            record.update(zip(PATIENT_COUNTS, (len(rows), sum(r.number_of_series or 0 for r in rows),
                                               sum(r.number_of_instances or 0 for r in rows))))
            if query.matches(record, Level.PATIENT):
                yield record

    def _instances(self, query: Query) -> Iterator[Record]:
        wanted = query.uids("SOPInstanceUID")
        for _, series_original, _ in self._series(query):
            rows = self.site.index.instances_of_series(series_original["StudyInstanceUID"],
                                                       series_original["SeriesInstanceUID"])
            for row in rows:
                self._check()
                if wanted is not None and self.pseudonyms.uid(row.sop_instance_uid) not in wanted:
                    continue
                if self.withheld(StoredInstance.from_row(row)):
                    self.withheld_skipped += 1
                    continue  # never listed: it would not be released either
                record = self.deidentify_record({**series_original, **_values(row, _IMAGE_ATTRS)})
                if query.matches(record, Level.IMAGE):
                    yield record

    # -- retrieve -------------------------------------------------------------------------------------

    def resolve(self, level: str, patient: str | None, studies: tuple[str, ...], series: tuple[str, ...],
                instances: tuple[str, ...]) -> Release:
        """The stored instances a retrieve of pseudonymous UIDs names (retrieve levels as in PS3.4 C.4.2)."""
        found: list[StoredInstance] = []
        patients: dict[str, tuple[str, str]] = {}
        wanted_studies = set(studies)
        for row in self.member_studies():
            pseudo_patient = self.pseudonyms.patient_id(self.deidentifier.patient_key(row.patient_id, row.study_uid))
            if patient and pseudo_patient != patient:
                continue
            if level != "PATIENT" and self.pseudonyms.uid(row.study_uid) not in wanted_studies:
                continue
            patients[row.study_uid] = (row.patient_id or "", row.patient_name or "")
            if level in ("PATIENT", "STUDY"):
                found += self.site.index.find_instances(row.study_uid)
                continue
            for series_row in self.site.index.series_of_study(row.study_uid):
                if self.pseudonyms.uid(series_row.series_uid) not in series:
                    continue
                items = self.site.index.find_instances(row.study_uid, series_row.series_uid)
                if level == "IMAGE":
                    items = [i for i in items if self.pseudonyms.uid(i.sop_instance_uid) in instances]
                found += items
        released, withheld = [], []
        for item in found:
            reason = self.withheld(item)
            if reason:
                withheld.append((item, reason))
            else:
                released.append(item)
        return Release(released, withheld, patients)

    def withheld(self, item: StoredInstance) -> str:
        """Why an instance is not released ('' if it is): its pixels may show identity."""
        if self.trial.allow_identifying_pixels:
            return ""
        if identifying_class(item.sop_class_uid):
            return identifying_pixels(_class_only(item.sop_class_uid)) or ""
        return _VERDICTS.get(item.sha256, lambda: self._header_verdict(item))

    def _header_verdict(self, item: StoredInstance) -> str:
        with self.payloads.open(item) as reader:
            reader.file.seek(0)
            header = dcmread(reader.file, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "BurnedInAnnotation", "RecognizableVisualFeatures"])
        return identifying_pixels(header) or ""

    def pseudonymous(self, item: StoredInstance) -> tuple[str, str, str]:
        """(study, series, SOP instance) pseudonyms of a stored instance."""
        uid = self.pseudonyms.uid
        return uid(item.study_uid), uid(item.series_uid), uid(item.sop_instance_uid)


def _class_only(sop_class_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    return ds


ATTRIBUTE_LEVEL = {a.keyword: a.level for a in _STUDY_ATTRS}
