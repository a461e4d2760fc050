"""Queries against the index, shared by C-FIND (find_scp.py) and QIDO-RS (qido.py).

Three parts, each in one place:

* :class:`Query`: the matching keys of a request and what to return, validated once whichever
  protocol it came from (:meth:`Query.from_identifier` for a C-FIND identifier, :meth:`Query.build`
  for QIDO-RS parameters). A bad request raises :class:`QueryError` with the DIMSE status to answer.
* :class:`Key`: attribute matching per PS3.4 C.2.2.2 (single value, universal, wildcard, date/time
  range, list of UIDs). PN matching is case-insensitive and also tries each component group; every
  other VR matches case-sensitively.
* :class:`QueryEngine`: chooses the Cassandra read that narrows a query best and matches the rest in
  Python, yielding result records (keyword -> value) lazily, page by page:

  ==========================  ===================================================================
  query names                 read (all prepared; SAI = Storage-Attached Index)
  ==========================  ===================================================================
  StudyInstanceUID (list)     studies by partition key, one read per UID
  PatientID (exact)           studies via SAI studies_patient_id_idx
  AccessionNumber (exact)     studies via SAI studies_accession_idx
  StudyDate (date or range)   studies via SAI studies_study_day_idx (open ranges too)
  ModalitiesInStudy (one)     studies via SAI studies_modalities_idx (CONTAINS)
  nothing of the above        studies of the 32 buckets via SAI studies_bucket_idx: wildcards such as
                              PatientName=Doe* and empty queries cannot use an index, so the listing
                              is read bucket by bucket (first pages in parallel, then paged) and
                              filtered here
  SeriesInstanceUID, no study series via SAI series_uid_idx, then their studies
  Modality, no study key      series via SAI series_modality_idx, then their studies
  SOPInstanceUID, no study    instance_locations by partition key, then the instance row
  series / instances          per study / per series partition
  PATIENT level               patients by partition key (PatientID) or its 32 buckets
  ==========================  ===================================================================

Results come in index order (token order within a read; bucket order for listings), which is stable
between identical queries, so QIDO-RS ``offset`` pages are consistent.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomgrid.core.audit import AuditObject, patient_object
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.index_rows import parse_da
from dicomgrid.core.uids import is_valid_uid

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

# DIMSE statuses of a refused query (QIDO-RS answers 400 for both).
IDENTIFIER_MISMATCH = 0xA900  # the identifier's structure: level, keys allowed at it, unique keys
UNABLE_TO_PROCESS = 0xC000  # a value: malformed date/range/UID/number, control characters, too long
INDEX_UNAVAILABLE = 0xC001  # the metadata store failed while answering
OUT_OF_RESOURCES = 0xA700  # the query would read more index rows than its scan budget allows

MAX_KEYS = 128
MAX_UIDS = 1000
# Longest value accepted per VR (PS3.5 6.2), ranges included (DA "YYYYMMDD-YYYYMMDD", TM likewise).
MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 17, "DS": 16, "IS": 12, "LO": 64, "PN": 194, "SH": 16,
             "TM": 27, "UI": 64, "US": 5, "UR": 1024}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Level(IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


MODEL_LEVELS = {
    PATIENT_ROOT_FIND: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
    STUDY_ROOT_FIND: (Level.STUDY, Level.SERIES, Level.IMAGE),
}


class QueryCancelled(Exception):
    """The requester cancelled (C-CANCEL) while the index was being read."""


class QueryError(ValueError):
    """A request that cannot be answered as asked; ``status`` is the DIMSE failure to send."""

    def __init__(self, status: int, comment: str, tag: int | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.tag = tag


class ScanBudgetExceeded(QueryError):
    """The query has read its budget of index rows (``[limits] query_scan_budget_rows``) and is stopped:
    a wildcard over the whole index would otherwise tie up the site's Cassandra for one requester.
    C-FIND answers 0xA700 (out of resources), QIDO-RS 413 (PS3.18 10.6.3: the search was too broad)."""

    def __init__(self, budget: int) -> None:
        super().__init__(OUT_OF_RESOURCES, f"query too broad: over {budget} index rows; add keys")
        self.budget = budget


@dataclass(frozen=True)
class Attribute:
    """A queryable attribute: its level and the index column it is read from (None: computed)."""

    keyword: str
    level: Level
    column: str | None
    matching: bool = True  # False: a return key only (PS3.4: its value in a request shall be empty)

    @property
    def tag(self) -> int:
        return tag_for_keyword(self.keyword)  # type: ignore[return-value]

    @property
    def vr(self) -> str:
        return dictionary_VR(self.tag)


def _attributes(level: Level, *specs: tuple[str, str | None] | tuple[str, str | None, bool]) -> list[Attribute]:
    return [Attribute(spec[0], level, spec[1], *spec[2:]) for spec in specs]


ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in [
        *_attributes(
            Level.PATIENT,
            ("PatientID", "patient_id"),
            ("PatientName", "patient_name"),
            ("IssuerOfPatientID", "issuer_of_patient_id"),
            ("PatientBirthDate", "patient_birth_date"),
            ("PatientSex", "patient_sex"),
            ("NumberOfPatientRelatedStudies", None, False),
            ("NumberOfPatientRelatedSeries", None, False),
            ("NumberOfPatientRelatedInstances", None, False),
        ),
        *_attributes(
            Level.STUDY,
            ("StudyInstanceUID", "study_uid"),
            ("StudyDate", "study_date"),
            ("StudyTime", "study_time"),
            ("AccessionNumber", "accession_number"),
            ("StudyID", "study_id"),
            ("StudyDescription", "study_description"),
            ("ReferringPhysicianName", "referring_physician_name"),
            ("ModalitiesInStudy", "modalities_in_study"),
            ("SOPClassesInStudy", "sop_classes_in_study"),
            ("NumberOfStudyRelatedSeries", "number_of_series", False),
            ("NumberOfStudyRelatedInstances", "number_of_instances", False),
        ),
        *_attributes(
            Level.SERIES,
            ("SeriesInstanceUID", "series_uid"),
            ("Modality", "modality"),
            ("SeriesNumber", "series_number"),
            ("SeriesDescription", "series_description"),
            ("BodyPartExamined", "body_part_examined"),
            ("SeriesDate", "series_date"),
            ("SeriesTime", "series_time"),
            ("NumberOfSeriesRelatedInstances", "number_of_instances", False),
        ),
        *_attributes(
            Level.IMAGE,
            ("SOPInstanceUID", "sop_instance_uid"),
            ("SOPClassUID", "sop_class_uid"),
            ("InstanceNumber", "instance_number"),
            ("Rows", "rows"),
            ("Columns", "columns"),
            ("NumberOfFrames", "number_of_frames"),
            ("AvailableTransferSyntaxUID", "transfer_syntax_uid"),
        ),
    ]
}
# Return keys valid at every level, answered from the site rather than the index.
SITE_KEYS = ("RetrieveAETitle", "InstanceAvailability", "RetrieveURL")
# Keys that may carry several values besides UIDs (PS3.4 C.6.2.1.2: any of the modalities).
MULTI_VALUED = {"ModalitiesInStudy"}
PATIENT_COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")
UNIQUE_KEYS = {Level.PATIENT: "PatientID", Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID",
               Level.IMAGE: "SOPInstanceUID"}


def attributes_at(level: Level) -> list[Attribute]:
    """The attributes a query at ``level`` may match or return (its own and those of higher levels)."""
    return [a for a in ATTRIBUTES.values() if a.level <= level]


# -- matching (PS3.4 C.2.2.2) ---------------------------------------------------------------------


def glob_match(pattern: str, text: str) -> bool:
    """``*`` (any run) and ``?`` (one character) wildcard matching of a whole value.

    Greedy with backtracking to the last ``*`` only: O(len(pattern) * len(text)) at worst, so a
    hostile pattern cannot blow up the way a regular expression with many ``.*`` can.
    """
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] in ("?", text[t]):
            p, t = p + 1, t + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, t, p + 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def _pn_forms(value: str) -> list[str]:
    """A person name as compared: case-folded, trailing empty components dropped, whole and per group."""
    groups = [group.rstrip("^") for group in value.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    whole = "=".join(groups).casefold()
    return [whole, *(g.casefold() for g in groups if g and g.casefold() != whole)]


_TM = re.compile(r"([01]\d|2[0-3])(?:([0-5]\d)(?:([0-5]\d|60)(?:\.(\d{1,6}))?)?)?")


def parse_tm(value: str, *, upper: bool = False) -> int | None:
    """A TM value as microseconds since midnight; missing parts count as their lowest (or highest)."""
    m = _TM.fullmatch(value)
    if m is None:
        return None
    hh, mm, ss, frac = m.groups()
    fill = "9" if upper else "0"
    minutes = int(mm) if mm else (59 if upper else 0)
    seconds = int(ss) if ss else (59 if upper else 0)
    micros = int((frac or "").ljust(6, fill)) if (frac or ss) else (999_999 if upper else 0)
    return ((int(hh) * 60 + minutes) * 60 + seconds) * 1_000_000 + micros


def _as_int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class Key:
    """One matching key: how a record's value is compared with what the request gave."""

    attribute: Attribute
    kind: str  # "single" | "wildcard" | "range" | "uids"
    values: tuple[str, ...]
    test: Callable[[Any], bool] = field(repr=False, compare=False)
    bounds: tuple[Any, Any] | None = None  # a range's (first, last); None stands for open

    def matches(self, value: Any) -> bool:
        """An absent or empty value matches no key; a multi-valued one matches if any value does."""
        if isinstance(value, (set, frozenset, list, tuple)):
            return any(self.test(v) for v in value if v not in (None, ""))
        return value not in (None, "") and self.test(value)


def _text_test(attribute: Attribute, values: Sequence[str]) -> tuple[str, Callable[[Any], bool]]:
    wild = any("*" in v or "?" in v for v in values)
    if attribute.vr == "PN":
        patterns = [_pn_forms(v)[0] for v in values]
        if wild:
            return "wildcard", lambda got: any(glob_match(p, f) for p in patterns for f in _pn_forms(str(got)))
        return "single", lambda got: any(p in _pn_forms(str(got)) for p in patterns)
    if wild:
        return "wildcard", lambda got: any(glob_match(p, str(got)) for p in values)
    wanted = set(values)
    return "single", lambda got: str(got) in wanted


def _range(attribute: Attribute, value: str) -> Key:
    """DA and TM: a single value or a range ``a-b``, ``-b``, ``a-`` (PS3.4 C.2.2.2.5)."""
    first, sep, last = value.partition("-")
    if attribute.vr == "DA":
        lo, hi = parse_da(first) if first else None, parse_da(last) if last else None
        parse: Callable[[str], Any] = parse_da
    else:
        lo, hi = parse_tm(first) if first else None, parse_tm(last, upper=True) if last else None
        parse = parse_tm
    if not sep:
        hi = parse_tm(first, upper=True) if attribute.vr == "TM" else lo
    bad = (first and lo is None) or (last and hi is None) or (sep and not (first or last)) or value.count("-") > 1
    if bad or (lo is not None and hi is not None and lo > hi):
        raise QueryError(UNABLE_TO_PROCESS, f"{attribute.keyword}: malformed {attribute.vr} value or range",
                         attribute.tag)

    def test(got: Any) -> bool:
        point = parse(str(got))
        return point is not None and (lo is None or point >= lo) and (hi is None or point <= hi)

    return Key(attribute, "range", (value,), test, (lo, hi))


def make_key(attribute: Attribute, values: Sequence[str]) -> Key | None:
    """The key for ``values`` given for ``attribute``; None for universal matching (PS3.4 C.2.2.2.3)."""
    name, tag, vr = attribute.keyword, attribute.tag, attribute.vr
    values = [v.strip() for v in values if v.strip()]
    if not values or all(set(v) == {"*"} for v in values):
        return None
    for v in values:
        if len(v) > MAX_CHARS.get(vr, 64):
            raise QueryError(UNABLE_TO_PROCESS, f"{name}: value longer than {vr} allows", tag)
        if _CONTROL.search(v):
            raise QueryError(UNABLE_TO_PROCESS, f"{name}: control characters in value", tag)
    if not attribute.matching:
        raise QueryError(IDENTIFIER_MISMATCH, f"{name} is a return key and cannot be matched", tag)
    if vr == "UI":
        if len(values) > MAX_UIDS:
            raise QueryError(UNABLE_TO_PROCESS, f"{name}: more than {MAX_UIDS} UIDs", tag)
        if not all(is_valid_uid(v) for v in values):
            raise QueryError(UNABLE_TO_PROCESS, f"{name}: not a valid UID (wildcards are not allowed)", tag)
        uids = tuple(dict.fromkeys(values))
        wanted = set(uids)
        return Key(attribute, "uids", uids, lambda got: got in wanted)
    if len(values) > 1 and name not in MULTI_VALUED:
        raise QueryError(UNABLE_TO_PROCESS, f"{name}: several values are allowed only for UIDs", tag)
    if vr in ("DA", "TM"):
        return _range(attribute, values[0])
    if vr in ("IS", "US"):
        number = _as_int(values[0])
        if number is None:
            raise QueryError(UNABLE_TO_PROCESS, f"{name}: not an integer (wildcards are not allowed)", tag)
        return Key(attribute, "single", (values[0],), lambda got: _as_int(got) == number)
    kind, test = _text_test(attribute, values)
    return Key(attribute, kind, tuple(values), test)


# -- the query ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """What to match and what to return, at one level."""

    level: Level
    keys: dict[str, Key]  # non-universal keys, by keyword
    returned: tuple[str, ...]  # keywords answered (index attributes and SITE_KEYS), unique keys excluded
    model: str | None = None  # the C-FIND information model; None for QIDO-RS
    unsupported: tuple[tuple[int, str], ...] = ()  # (tag, VR) of keys not indexed: answered empty

    @classmethod
    def build(
        cls,
        level: Level,
        keys: Mapping[str, Sequence[str]],
        *,
        model: str | None = None,
        unsupported: Sequence[tuple[int, str]] = (),
    ) -> Query:
        """Validate keys (keyword -> values; no values: return only) for a query at ``level``."""
        if len(keys) + len(unsupported) > MAX_KEYS:
            raise QueryError(IDENTIFIER_MISMATCH, f"more than {MAX_KEYS} keys")
        matching: dict[str, Key] = {}
        for keyword, values in keys.items():
            if keyword in SITE_KEYS:
                if any(v.strip() for v in values):
                    raise QueryError(IDENTIFIER_MISMATCH, f"{keyword} is a return key and cannot be matched",
                                     tag_for_keyword(keyword))
                continue
            attribute = ATTRIBUTES[keyword]
            if attribute.level > level:
                raise QueryError(IDENTIFIER_MISMATCH, f"{keyword} is not allowed at the {level.name} level",
                                 attribute.tag)
            key = make_key(attribute, values)
            if key is not None:
                matching[keyword] = key
        returned = tuple(k for k in keys if k not in cls._unique_keys(level, model))
        query = cls(level, matching, returned, model, tuple(unsupported))
        if model is not None:
            query._check_hierarchy()
        return query

    @classmethod
    def from_identifier(cls, identifier: Dataset, model: str) -> Query:
        """A C-FIND request identifier under ``model`` (Patient Root or Study Root)."""
        try:
            level_name = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
            keys: dict[str, list[str]] = {}
            unsupported: list[tuple[int, str]] = []
            for elem in identifier:
                keyword = elem.keyword
                if elem.tag.group in (0x0000, 0x0002):
                    raise QueryError(IDENTIFIER_MISMATCH, f"element {elem.tag} does not belong in an identifier",
                                     elem.tag)
                if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                    continue
                if keyword in ATTRIBUTES or keyword in SITE_KEYS:
                    keys[keyword] = _element_values(elem)
                else:
                    unsupported.append((int(elem.tag), elem.VR))
        except QueryError:
            raise
        except Exception as exc:  # pydicom raises many types for undecodable values
            raise QueryError(UNABLE_TO_PROCESS, f"identifier cannot be decoded: {type(exc).__name__}") from exc
        levels = MODEL_LEVELS[model]
        if level_name not in Level.__members__ or Level[level_name] not in levels:
            allowed = "/".join(lv.name for lv in levels)
            raise QueryError(IDENTIFIER_MISMATCH, f"QueryRetrieveLevel must be {allowed}", 0x00080052)
        return cls.build(Level[level_name], keys, model=model, unsupported=unsupported)

    @staticmethod
    def _unique_keys(level: Level, model: str | None) -> list[str]:
        """Unique keys of the query level and above, always answered (PS3.4 C.4.1.2.3)."""
        top = Level.PATIENT if model == PATIENT_ROOT_FIND or level == Level.PATIENT else Level.STUDY
        return [UNIQUE_KEYS[lv] for lv in Level if top <= lv <= level]

    def _check_hierarchy(self) -> None:
        """C-FIND is hierarchical: each level above the query level is named by its unique key."""
        for upper in self._unique_keys(self.level, self.model)[:-1]:
            key = self.keys.get(upper)
            if key is None or key.kind not in ("single", "uids") or (upper == "PatientID" and len(key.values) > 1):
                raise QueryError(
                    IDENTIFIER_MISMATCH,
                    f"a {self.level.name} query needs {upper} (hierarchical search)",
                    ATTRIBUTES[upper].tag,
                )

    # -- what the engine asks ---------------------------------------------------------------------

    def uids(self, keyword: str) -> tuple[str, ...] | None:
        key = self.keys.get(keyword)
        return key.values if key is not None and key.kind == "uids" else None

    def exact(self, keyword: str) -> str | None:
        """The one literal value of a case-sensitive key, as an index can look it up."""
        key = self.keys.get(keyword)
        if key is None or key.kind != "single" or len(key.values) != 1 or key.attribute.vr == "PN":
            return None
        return key.values[0]

    def day_range(self, keyword: str) -> tuple[dt.date | None, dt.date | None] | None:
        key = self.keys.get(keyword)
        return key.bounds if key is not None and key.kind == "range" and key.attribute.vr == "DA" else None

    def matches(self, record: Mapping[str, Any], *levels: Level) -> bool:
        """Whether the record's attributes of ``levels`` satisfy every key of those levels."""
        return all(key.matches(record.get(kw)) for kw, key in self.keys.items() if key.attribute.level in levels)

    def wants(self, keyword: str) -> bool:
        return keyword in self.returned

    # -- the answer -------------------------------------------------------------------------------

    def response(self, record: Mapping[str, Any], site: SiteAnswers) -> Dataset:
        """The identifier of one match: the requested keys and the unique keys, nothing else.

        Text is answered in UTF-8 (ISO_IR 192) whenever any value is not ASCII.
        """
        ds = Dataset()
        keywords = list(dict.fromkeys([*self._unique_keys(self.level, self.model), *self.returned]))
        for keyword in keywords:
            value = site.value(keyword, record, self.level) if keyword in SITE_KEYS else record.get(keyword)
            tag = tag_for_keyword(keyword)
            vr = dictionary_VR(tag)
            ds.add(DataElement(tag, vr, _dicom_value(value), validation_mode=pydicom_config.IGNORE))
        for tag, vr in self.unsupported:
            ds.add(DataElement(tag, vr, None, validation_mode=pydicom_config.IGNORE))
        if self.model is not None:
            ds.QueryRetrieveLevel = self.level.name
        if not all(_is_ascii(e.value) for e in ds if e.VR in _TEXT_VRS):
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    def describe(self) -> dict[str, Any]:
        """The query for audit records (values shortened): the audit trail is where query keys go."""
        return {
            "level": self.level.name,
            "keys": {kw: "\\".join(key.values)[:256] for kw, key in self.keys.items()},
            "returned": list(self.returned),
        }

    def shape(self) -> dict[str, Any]:
        """The query for the process log: its level and which keys it matches on, never their values."""
        return {"level": self.level.name, "matching_keys": sorted(self.keys)}

    def patient(self) -> list[AuditObject]:
        """The patient object of the query's audit record, when it names one patient."""
        key = self.keys.get("PatientID")
        values = list(key.values) if key is not None else []
        if len(values) != 1 or any(ch in values[0] for ch in "*?\\"):
            return []
        return patient_object(values[0])


def _element_values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None or value == "" or elem.VR == "SQ":
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v) for v in items]


def _dicom_value(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value) or None
    return None if value == "" else value


_TEXT_VRS = ("PN", "LO", "SH", "LT", "ST", "UC", "UT")


def _is_ascii(value: Any) -> bool:
    values = value if isinstance(value, (MultiValue, list)) else [value]
    return all(v is None or str(v).isascii() for v in values)


@dataclass(frozen=True)
class SiteAnswers:
    """Return keys answered by the site itself: where to retrieve from and that it is online."""

    ae_title: str
    dicomweb_base: str  # e.g. http://host:port/dicomweb

    def value(self, keyword: str, record: Mapping[str, Any], level: Level) -> Any:
        if keyword == "RetrieveAETitle":
            return self.ae_title
        if keyword == "InstanceAvailability":
            return "ONLINE"
        url = f"{self.dicomweb_base}/studies/{record.get('StudyInstanceUID')}"
        if level >= Level.SERIES:
            url += f"/series/{record.get('SeriesInstanceUID')}"
        if level >= Level.IMAGE:
            url += f"/instances/{record.get('SOPInstanceUID')}"
        return url if level >= Level.STUDY else None


# -- the engine -----------------------------------------------------------------------------------

Record = dict[str, Any]
_PATIENT_ATTRS = [a for a in ATTRIBUTES.values() if a.level == Level.PATIENT and a.column]
_STUDY_ATTRS = _PATIENT_ATTRS + [a for a in ATTRIBUTES.values() if a.level == Level.STUDY and a.column]
_SERIES_ATTRS = [a for a in ATTRIBUTES.values() if a.level == Level.SERIES and a.column]
_IMAGE_ATTRS = [a for a in ATTRIBUTES.values() if a.level == Level.IMAGE and a.column]


def _values(row: Any, attributes: Iterable[Attribute]) -> Record:
    """A row's attributes by keyword; set columns (the driver's SortedSet) become frozensets."""
    record = {a.keyword: getattr(row, a.column) for a in attributes}  # type: ignore[arg-type]
    for keyword, value in record.items():
        if value is not None and not isinstance(value, (str, int)):
            record[keyword] = frozenset(value)
    return record


class QueryEngine:
    """Answers a :class:`Query` from the metadata store; generators, so callers can stop any time.

    ``cancelled`` is asked before each row read: a scan that finds few matches still stops promptly
    (raising :class:`QueryCancelled`) when the requester gives up. ``scan_budget`` bounds the index rows
    one engine reads (its queries together; an engine serves one request): the row past it raises
    :class:`ScanBudgetExceeded`. None: no bound.
    """

    def __init__(self, metadata: IndexReader, cancelled: Callable[[], bool] = lambda: False,
                 scan_budget: int | None = None) -> None:
        self.metadata = metadata
        self.cancelled = cancelled
        self.scan_budget = scan_budget
        self.rows_read = 0

    def _rows(self, rows: Iterable[Any]) -> Iterator[Any]:
        for row in rows:
            if self.cancelled():
                raise QueryCancelled
            self.rows_read += 1
            if self.scan_budget is not None and self.rows_read > self.scan_budget:
                raise ScanBudgetExceeded(self.scan_budget)
            yield row

    def find(self, query: Query) -> Iterator[Record]:
        finder = {
            Level.PATIENT: self.find_patients,
            Level.STUDY: self.find_studies,
            Level.SERIES: self.find_series,
            Level.IMAGE: self.find_instances,
        }[query.level]
        if not any(query.wants(k) for k in PATIENT_COUNTS):
            return finder(query)
        return self._with_patient_counts(query, finder(query))

    def find_patients(self, query: Query) -> Iterator[Record]:
        patient_id = query.exact("PatientID")
        rows = self.metadata.patients_by_id([patient_id]) if patient_id else self.metadata.all_patients()
        for row in self._rows(rows):
            record = _values(row, _PATIENT_ATTRS)
            if query.matches(record, Level.PATIENT):
                yield record

    def find_studies(self, query: Query) -> Iterator[Record]:
        for row in self._rows(self._studies(query)):
            record = _values(row, _STUDY_ATTRS)
            if query.matches(record, Level.PATIENT, Level.STUDY):
                yield record

    def find_series(self, query: Query) -> Iterator[Record]:
        for study, series in self._series(query):
            yield {**study, **series}

    def find_instances(self, query: Query) -> Iterator[Record]:
        sop_uids = query.uids("SOPInstanceUID")
        if sop_uids is not None and query.uids("StudyInstanceUID") is None and query.uids("SeriesInstanceUID") is None:
            yield from self._instances_by_uid(query, sop_uids)
            return
        for study, series in self._series(query):
            rows = self.metadata.instances_of_series(study["StudyInstanceUID"], series["SeriesInstanceUID"])
            for row in self._rows(rows):
                record = _values(row, _IMAGE_ATTRS)
                if query.matches(record, Level.IMAGE):
                    yield {**study, **series, **record}

    # -- plans ------------------------------------------------------------------------------------

    def _indexed_studies(self, query: Query) -> Iterable[Any] | None:
        """Study rows narrowed by the most selective index the query allows; None if none applies."""
        md = self.metadata
        if (uids := query.uids("StudyInstanceUID")) is not None:
            return md.studies_by_uid(uids)
        if patient_id := query.exact("PatientID"):
            return md.studies_by_patient_id(patient_id)
        if accession := query.exact("AccessionNumber"):
            return md.studies_by_accession(accession)
        if days := query.day_range("StudyDate"):
            return md.studies_by_day(*days)
        if modality := query.exact("ModalitiesInStudy"):
            return md.studies_by_modality(modality)
        return None

    def _studies(self, query: Query) -> Iterable[Any]:
        studies = self._indexed_studies(query)
        return self.metadata.all_studies() if studies is None else studies

    def _series(self, query: Query) -> Iterator[tuple[Record, Record]]:
        """(study, series) record pairs matching the query's study and series keys."""
        if query.uids("StudyInstanceUID") is None and (series_uids := query.uids("SeriesInstanceUID")):
            yield from self._join_studies(query, self.metadata.series_by_uid(series_uids))
            return
        studies = self._indexed_studies(query)
        if studies is None and (modality := query.exact("Modality")):
            yield from self._join_studies(query, self.metadata.series_by_modality(modality))
            return
        for row in self._rows(self.metadata.all_studies() if studies is None else studies):
            study = _values(row, _STUDY_ATTRS)
            if not query.matches(study, Level.PATIENT, Level.STUDY):
                continue
            for series_row in self._rows(self.metadata.series_of_study(row.study_uid)):
                series = _values(series_row, _SERIES_ATTRS)
                if query.matches(series, Level.SERIES):
                    yield study, series

    def _join_studies(self, query: Query, series_rows: Iterable[Any]) -> Iterator[tuple[Record, Record]]:
        """Series found by a series index, with their studies (read once per run of one study)."""
        current: tuple[str | None, Record | None] = (None, None)
        for series_row in self._rows(series_rows):
            series = _values(series_row, _SERIES_ATTRS)
            if not query.matches(series, Level.SERIES):
                continue
            if current[0] != series_row.study_uid:
                current = (series_row.study_uid, self._matching_study(query, series_row.study_uid))
            if current[1] is not None:
                yield current[1], series

    def _matching_study(self, query: Query, study_uid: str) -> Record | None:
        row = next(iter(self.metadata.studies_by_uid([study_uid])), None)
        if row is None:
            return None
        study = _values(row, _STUDY_ATTRS)
        return study if query.matches(study, Level.PATIENT, Level.STUDY) else None

    def _instances_by_uid(self, query: Query, sop_uids: Sequence[str]) -> Iterator[Record]:
        for location in self._rows(self.metadata.instance_locations_of(sop_uids)):
            row = self.metadata.instance_row(location.study_uid, location.series_uid, location.sop_instance_uid)
            if row is None:
                continue
            instance = _values(row, _IMAGE_ATTRS)
            if not query.matches(instance, Level.IMAGE):
                continue
            study = self._matching_study(query, location.study_uid)
            series_row = next(
                (s for s in self.metadata.series_of_study(location.study_uid) if s.series_uid == location.series_uid),
                None,
            )
            if study is None or series_row is None:
                continue
            series = _values(series_row, _SERIES_ATTRS)
            if query.matches(series, Level.SERIES):
                yield {**study, **series, **instance}

    def _with_patient_counts(self, query: Query, records: Iterator[Record]) -> Iterator[Record]:
        """Add NumberOfPatientRelated* counted from the patient's studies.

        Counted at query time, so they never go stale; the last patient's counts are reused, as the
        records of one patient usually come in a run.
        """
        last: tuple[str | None, tuple[int, int, int]] = (None, (0, 0, 0))
        for record in records:
            patient_id = record.get("PatientID")
            if patient_id and patient_id != last[0]:
                rows = list(self.metadata.study_counts_of_patient(patient_id))
                counts = (len(rows), sum(r.number_of_series or 0 for r in rows),
                          sum(r.number_of_instances or 0 for r in rows))
                last = (patient_id, counts)
            if patient_id:
                record.update(zip(PATIENT_COUNTS, last[1]))
            yield record

