"""C-FIND / QIDO-RS matching (PS3.4 C.2.2.2), identifier validation and query planning, without a cluster."""

from __future__ import annotations

import datetime as dt
import io
import time
from collections import namedtuple
from typing import Any

import pytest
from cassandra.util import SortedSet
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom.dsutils import decode, encode

from dicomgrid.consumers.qido import BadRequest, parse_search
from dicomgrid.consumers.query import (
    ATTRIBUTES,
    IDENTIFIER_MISMATCH,
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    OUT_OF_RESOURCES,
    UNABLE_TO_PROCESS,
    Level,
    Query,
    QueryCancelled,
    QueryEngine,
    QueryError,
    ScanBudgetExceeded,
    SiteAnswers,
    glob_match,
    make_key,
    parse_tm,
)
from dicomgrid.core.config import LimitsConfig
from dicomgrid.core.index_rows import parse_da, study_bucket

SITE = SiteAnswers("GRID_A", "http://127.0.0.1:8081/dicomweb")


def key(keyword: str, *values: str):
    return make_key(ATTRIBUTES[keyword], list(values))


def matches(keyword: str, query_value: str, stored: Any) -> bool:
    k = key(keyword, query_value)
    return True if k is None else k.matches(stored)


def refused(keyword: str, *values: str) -> int:
    with pytest.raises(QueryError) as info:
        key(keyword, *values)
    return info.value.status


# -- single value, universal, wildcard -------------------------------------------------------------


def test_single_value_is_exact_and_case_sensitive_except_person_names():
    assert matches("PatientID", "PAT-1", "PAT-1")
    assert not matches("PatientID", "PAT-1", "pat-1")
    assert not matches("PatientID", "PAT", "PAT-1")
    assert matches("PatientName", "doe^jane", "DOE^Jane")
    assert not matches("PatientName", "Doe", "Doe^Jane")


def test_person_names_ignore_trailing_empty_components_and_match_any_component_group():
    assert matches("PatientName", "Doe^Jane", "Doe^Jane^^^")
    assert matches("PatientName", "Yamada^Tarou", "Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert matches("PatientName", "山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert matches("PatientName", "山田*", "Yamada^Tarou=山田^太郎")


@pytest.mark.parametrize("value", ["", "*", "**", "  "])
def test_empty_or_star_only_is_universal(value):
    assert key("PatientName", value) is None
    assert key("StudyDate", value) is None
    assert key("StudyInstanceUID", value) is None


def test_universal_matches_records_without_the_attribute():
    query = Query.build(Level.STUDY, {"PatientName": ["*"], "AccessionNumber": []})
    assert query.matches({"PatientName": None}, Level.PATIENT, Level.STUDY)


def test_a_key_never_matches_an_empty_record_value():
    assert not matches("PatientID", "X", None)
    assert not matches("PatientName", "*a*", "")
    assert not matches("StudyDate", "20240101-", None)


@pytest.mark.parametrize(
    "pattern, text, expected",
    [
        ("Doe*", "Doe^Jane", True),
        ("?oe*", "Roe^Richard", True),
        ("?oe*", "Doe", True),
        ("?oe*", "oe", False),
        ("*", "", True),
        ("a*b*c", "aXXbYYc", True),
        ("a*b*c", "aXXbYY", False),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("*x", "x", True),
        ("50%_*", "50%_off", True),
        ("[a-z]*", "abc", False),
        (".*", "anything", False),
    ],
)
def test_glob_match(pattern, text, expected):
    assert glob_match(pattern, text) is expected


def test_wildcards_are_literal_otherwise_and_case_sensitive_outside_person_names():
    assert matches("PatientName", "DOE*", "doe^jane")
    assert matches("StudyDescription", "CT*", "CT HEAD")
    assert not matches("StudyDescription", "ct*", "CT HEAD")
    assert not matches("PatientID", "' OR 1=1 --*", "PAT-1")
    assert not matches("PatientID", "*'; DROP TABLE studies; --", "PAT-1")


def test_hostile_wildcard_patterns_stay_fast():
    started = time.monotonic()
    assert not glob_match("*a" * 30 + "b", "a" * 1024)
    assert time.monotonic() - started < 1.0


# -- dates and times ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, day, expected",
    [
        ("20240102", "20240102", True),
        ("20240102", "20240103", False),
        ("20240101-20240131", "20240131", True),
        ("20240101-20240131", "20240201", False),
        ("-20240101", "20231231", True),
        ("-20240101", "20240102", False),
        ("20240101-", "20991231", True),
        ("20240101-", "20231231", False),
        ("20240101-", "2024-01-05", False),  # an unparseable stored date matches no range
    ],
)
def test_date_single_and_ranges(value, day, expected):
    assert matches("StudyDate", value, day) is expected


def test_date_keys_expose_bounds_for_the_index():
    query = Query.build(Level.STUDY, {"StudyDate": ["20240101-"]})
    assert query.day_range("StudyDate") == (dt.date(2024, 1, 1), None)
    query = Query.build(Level.STUDY, {"StudyDate": ["20240102"]})
    assert query.day_range("StudyDate") == (dt.date(2024, 1, 2), dt.date(2024, 1, 2))


@pytest.mark.parametrize(
    "value", ["2024", "20241301", "20240230", "2024-01-01", "-", "20240101-20230101", "20240101--", "2024010a",
              "20240101-20240102-20240103", "*2024*"]
)
def test_malformed_dates_and_ranges_are_refused(value):
    assert refused("StudyDate", value) == UNABLE_TO_PROCESS


def test_times():
    assert parse_tm("10") == 10 * 3600 * 1_000_000
    assert parse_tm("10", upper=True) == (10 * 3600 + 59 * 60 + 59) * 1_000_000 + 999_999
    assert parse_tm("101500.5") == (10 * 3600 + 15 * 60) * 1_000_000 + 500_000
    assert parse_tm("25") is None and parse_tm("10:15") is None
    assert matches("StudyTime", "10", "101500")
    assert matches("StudyTime", "1000-1030", "101500.123")
    assert not matches("StudyTime", "1000-1014", "101500")
    assert matches("StudyTime", "-0900", "085959")
    assert refused("StudyTime", "1030-1000") == UNABLE_TO_PROCESS
    assert refused("StudyTime", "99") == UNABLE_TO_PROCESS


# -- UIDs, numbers, lengths, control characters ------------------------------------------------------


def test_list_of_uids():
    k = key("StudyInstanceUID", "1.2.3", "1.2.4", "1.2.3")
    assert k.kind == "uids" and k.values == ("1.2.3", "1.2.4")
    assert k.matches("1.2.4") and not k.matches("1.2.5")


@pytest.mark.parametrize("value", ["1.2.*", "' OR 1=1 --", "1.2.03", "1." + "9" * 70, "abc"])
def test_bad_uids_are_refused(value):
    assert refused("StudyInstanceUID", value) == UNABLE_TO_PROCESS


def test_numbers():
    assert matches("SeriesNumber", "3", 3)
    assert not matches("SeriesNumber", "3", 4)
    assert refused("SeriesNumber", "3*") == UNABLE_TO_PROCESS


def test_modalities_in_study_matches_any_of_several_values():
    assert matches("ModalitiesInStudy", "MR", {"CT", "MR"})
    k = key("ModalitiesInStudy", "MR", "US")
    assert k.matches({"CT", "US"}) and not k.matches({"CT", "SR"})


@pytest.mark.parametrize(
    "keyword, value",
    [("PatientID", "X" * 65), ("PatientName", "A" * 200), ("AccessionNumber", "A" * 17), ("Modality", "CT" * 9),
     ("PatientID", "PAT\x00-1"), ("PatientName", "Doe\r\nJane"), ("StudyDescription", "a\x1bb")],
)
def test_overlong_values_and_control_characters_are_refused(keyword, value):
    assert refused(keyword, value) == UNABLE_TO_PROCESS


def test_several_values_only_for_uids_and_modalities():
    assert refused("PatientID", "A", "B") == UNABLE_TO_PROCESS


def test_return_keys_cannot_be_matched():
    assert refused("NumberOfStudyRelatedInstances", "3") == IDENTIFIER_MISMATCH


# -- C-FIND identifiers -----------------------------------------------------------------------------


def identifier(level: str | None, **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def status_of(ds: Dataset, model: str = STUDY_ROOT_FIND) -> int:
    with pytest.raises(QueryError) as info:
        Query.from_identifier(ds, model)
    assert info.value.comment
    return info.value.status


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("level", [None, "", "STUDIES", "FRAME", "study"])
def test_unknown_or_missing_level_is_refused(level):
    assert status_of(identifier(level, PatientID="")) == IDENTIFIER_MISMATCH


def test_patient_level_exists_only_in_patient_root():
    assert status_of(identifier("PATIENT", PatientID="")) == IDENTIFIER_MISMATCH
    assert Query.from_identifier(identifier("PATIENT", PatientID=""), PATIENT_ROOT_FIND).level is Level.PATIENT


@pytest.mark.parametrize(
    "level, keys",
    [
        ("STUDY", {"Modality": ""}),
        ("STUDY", {"SOPInstanceUID": ""}),
        ("PATIENT", {"StudyDate": ""}),
        ("SERIES", {"StudyInstanceUID": "1.2.3", "SOPClassUID": ""}),
    ],
)
def test_keys_below_the_level_are_refused(level, keys):
    assert status_of(identifier(level, **keys), PATIENT_ROOT_FIND if level == "PATIENT" else STUDY_ROOT_FIND) == (
        IDENTIFIER_MISMATCH
    )


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hierarchical_search_needs_the_unique_keys_above():
    assert status_of(identifier("SERIES", Modality="CT")) == IDENTIFIER_MISMATCH
    assert status_of(identifier("SERIES", StudyInstanceUID="*")) == IDENTIFIER_MISMATCH
    assert status_of(identifier("IMAGE", StudyInstanceUID="1.2.3")) == IDENTIFIER_MISMATCH
    assert status_of(identifier("STUDY", StudyDate=""), PATIENT_ROOT_FIND) == IDENTIFIER_MISMATCH
    assert status_of(identifier("STUDY", PatientID="P*"), PATIENT_ROOT_FIND) == IDENTIFIER_MISMATCH
    query = Query.from_identifier(identifier("IMAGE", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4"),
                                  STUDY_ROOT_FIND)
    assert query.level is Level.IMAGE


def test_response_holds_exactly_the_requested_and_unique_keys():
    query = Query.from_identifier(identifier("STUDY", PatientName="Doe*", StudyDate="", InstitutionName=""),
                                  STUDY_ROOT_FIND)
    record = {"PatientName": "Doe^Jane", "PatientID": "P1", "StudyDate": "20240102", "StudyInstanceUID": "1.2.3",
              "AccessionNumber": "A1"}
    answer = query.response(record, SITE)
    assert [e.keyword for e in answer] == ["StudyDate", "QueryRetrieveLevel", "InstitutionName", "PatientName",
                                           "StudyInstanceUID"]
    assert answer.StudyInstanceUID == "1.2.3" and answer.InstitutionName in (None, "")
    assert query.unsupported == ((0x00080080, "LO"),)
    assert "SpecificCharacterSet" not in answer


def test_patient_root_answers_carry_the_patient_id():
    query = Query.from_identifier(identifier("STUDY", PatientID="P1", StudyDate=""), PATIENT_ROOT_FIND)
    answer = query.response({"PatientID": "P1", "StudyInstanceUID": "1.2.3", "StudyDate": "20240101"}, SITE)
    assert {e.keyword for e in answer} == {"PatientID", "StudyInstanceUID", "StudyDate", "QueryRetrieveLevel"}


def test_non_ascii_answers_are_utf8():
    query = Query.from_identifier(identifier("STUDY", PatientName=""), STUDY_ROOT_FIND)
    answer = query.response({"PatientName": "Müller^Jürgen", "StudyInstanceUID": "1.2.3"}, SITE)
    assert answer.SpecificCharacterSet == "ISO_IR 192"


def test_requests_in_another_character_set_are_decoded():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Müller*"
    encoded = encode(ds, True, True)
    assert b"M\xfcller*" in encoded
    decoded = decode(io.BytesIO(encoded), True, True)
    query = Query.from_identifier(decoded, STUDY_ROOT_FIND)
    assert query.matches({"PatientName": "MÜLLER^Hans"}, Level.PATIENT)


def test_site_keys():
    query = Query.from_identifier(
        identifier("IMAGE", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4", RetrieveAETitle="",
                   InstanceAvailability="", RetrieveURL=""), STUDY_ROOT_FIND)
    record = {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "SOPInstanceUID": "1.2.3.4.5"}
    answer = query.response(record, SITE)
    assert answer.RetrieveAETitle == "GRID_A" and answer.InstanceAvailability == "ONLINE"
    assert answer.RetrieveURL == "http://127.0.0.1:8081/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
    assert status_of(identifier("STUDY", RetrieveAETitle="X")) == IDENTIFIER_MISMATCH


# -- QIDO-RS parameters -------------------------------------------------------------------------------


def test_qido_parameters_by_keyword_or_tag():
    search = parse_search(Level.STUDY, [("00100020", "P1"), ("StudyDate", "20240101-"), ("limit", "5"),
                                         ("offset", "2"), ("includefield", "StudyDescription,00081030")], {},
                          flat=True)
    assert set(search.query.keys) == {"PatientID", "StudyDate"}
    assert (search.limit, search.offset) == (5, 2)
    assert "StudyDescription" in search.query.returned and "PatientName" in search.query.returned


def test_qido_uid_lists_take_commas_or_backslashes():
    search = parse_search(Level.STUDY, [("StudyInstanceUID", "1.2.3,1.2.4\\1.2.5")], {}, flat=True)
    assert search.query.uids("StudyInstanceUID") == ("1.2.3", "1.2.4", "1.2.5")


def test_qido_includefield_all_and_fuzzymatching():
    search = parse_search(Level.SERIES, [("includefield", "all"), ("fuzzymatching", "true")],
                          {"StudyInstanceUID": "1.2.3"}, flat=False)
    assert {"NumberOfStudyRelatedSeries", "BodyPartExamined", "RetrieveAETitle"} <= set(search.query.returned)
    assert any("fuzzymatching" in w for w in search.warnings)


@pytest.mark.parametrize(
    "params",
    [
        [("NoSuchKeyword", "1")],
        [("PatientID", "A"), ("00100020", "B")],
        [("limit", "-1")],
        [("limit", "ten")],
        [("offset", "1"), ("offset", "2")],
        [("fuzzymatching", "maybe")],
        [("00400275.00321060", "X")],
        [("Modality", "CT")],  # a series attribute at the study level
        [("includefield", "NoSuchKeyword")],
    ],
)
def test_qido_bad_parameters(params):
    with pytest.raises(BadRequest):
        parse_search(Level.STUDY, params, {}, flat=True)


@pytest.mark.parametrize("params", [[("StudyDate", "2024-01-01")], [("StudyInstanceUID", "' OR 1=1 --")],
                                    [("PatientID", "x" * 100)], [("NumberOfStudyRelatedSeries", "2")]])
def test_qido_bad_values(params):
    with pytest.raises(QueryError):
        parse_search(Level.STUDY, params, {}, flat=True)


def test_qido_unsupported_attributes_are_ignored_with_a_warning():
    search = parse_search(Level.STUDY, [("InstitutionName", "X")], {}, flat=True)
    assert "InstitutionName" not in search.query.keys
    assert any("InstitutionName" in w for w in search.warnings)


# -- planning and exact results over a fake index -------------------------------------------------------

StudyRow = namedtuple("StudyRow", "study_uid patient_id patient_name issuer_of_patient_id patient_birth_date "
                                  "patient_sex study_date study_time accession_number study_id study_description "
                                  "referring_physician_name modalities_in_study sop_classes_in_study "
                                  "number_of_series number_of_instances bucket")
SeriesRow = namedtuple("SeriesRow", "study_uid series_uid modality series_number series_description "
                                    "body_part_examined series_date series_time number_of_instances")
InstanceRow = namedtuple("InstanceRow", "study_uid series_uid sop_instance_uid sop_class_uid instance_number rows "
                                        "columns number_of_frames transfer_syntax_uid")
PatientRow = namedtuple("PatientRow", "patient_id patient_name issuer_of_patient_id patient_birth_date patient_sex")
LocationRow = namedtuple("LocationRow", "sop_instance_uid study_uid series_uid")


class FakeIndex:
    """The read methods of IndexReader over lists (sets as the driver returns them); logs the reads used."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.studies: list[StudyRow] = []
        self.series: list[SeriesRow] = []
        self.instances: list[InstanceRow] = []

    def add(self, uid: str, patient: str, name: str, date: str, accession: str, series: dict[str, str]) -> None:
        self.studies.append(StudyRow(uid, patient, name, None, "19700101", "F", date, "101500", accession, "1",
                                     "desc", None, SortedSet(series.values()), SortedSet([CTImageStorage]), len(series),
                                     len(series), study_bucket(uid)))
        for n, (series_uid, modality) in enumerate(series.items(), 1):
            self.series.append(SeriesRow(uid, series_uid, modality, n, None, None, None, None, 1))
            self.instances.append(InstanceRow(uid, series_uid, f"{series_uid}.1", CTImageStorage, 1, 8, 8, None,
                                              "1.2.840.10008.1.2.1"))

    def _log(self, name: str) -> None:
        self.calls.append(name)

    def studies_by_uid(self, uids):
        self._log("studies_by_uid")
        return [s for u in uids for s in self.studies if s.study_uid == u]

    def studies_by_patient_id(self, pid):
        self._log("studies_by_patient_id")
        return [s for s in self.studies if s.patient_id == pid]

    def studies_by_accession(self, accession):
        self._log("studies_by_accession")
        return [s for s in self.studies if s.accession_number == accession]

    def studies_by_day(self, first, last):
        self._log("studies_by_day")
        return [s for s in self.studies
                if (d := parse_da(s.study_date)) and (first is None or d >= first) and (last is None or d <= last)]

    def studies_by_modality(self, modality):
        self._log("studies_by_modality")
        return [s for s in self.studies if modality in s.modalities_in_study]

    def all_studies(self):
        self._log("all_studies")
        return sorted(self.studies, key=lambda s: s.bucket)

    def series_of_study(self, uid):
        return [s for s in self.series if s.study_uid == uid]

    def series_by_uid(self, uids):
        self._log("series_by_uid")
        return [s for u in uids for s in self.series if s.series_uid == u]

    def series_by_modality(self, modality):
        self._log("series_by_modality")
        return [s for s in self.series if s.modality == modality]

    def instances_of_series(self, study_uid, series_uid):
        return [i for i in self.instances if (i.study_uid, i.series_uid) == (study_uid, series_uid)]

    def instance_locations_of(self, uids):
        self._log("instance_locations_of")
        return [LocationRow(i.sop_instance_uid, i.study_uid, i.series_uid) for u in uids for i in self.instances
                if i.sop_instance_uid == u]

    def instance_row(self, study_uid, series_uid, sop_uid):
        return next((i for i in self.instances if i.sop_instance_uid == sop_uid), None)

    def patients_by_id(self, pids):
        self._log("patients_by_id")
        return [p for p in self._patients() if p.patient_id in pids]

    def all_patients(self):
        self._log("all_patients")
        return self._patients()

    def _patients(self):
        seen = {s.patient_id: PatientRow(s.patient_id, s.patient_name, None, s.patient_birth_date, s.patient_sex)
                for s in self.studies}
        return list(seen.values())

    def study_counts_of_patient(self, pid):
        return [s for s in self.studies if s.patient_id == pid]


@pytest.fixture
def index() -> FakeIndex:
    fake = FakeIndex()
    fake.add("1.1", "P1", "Doe^Jane", "20240102", "A1", {"1.1.1": "CT", "1.1.2": "SR"})
    fake.add("1.2", "P1", "Doe^Jane", "20240315", "A2", {"1.2.1": "MR"})
    fake.add("1.3", "P2", "Roe^Richard", "20231231", "A3", {"1.3.1": "CT"})
    fake.add("1.4", "P3", "Müller^Jürgen", "20240601", "A4", {"1.4.1": "US"})
    return fake


def run(index: FakeIndex, level: Level, **keys: Any) -> tuple[list[dict], list[str]]:
    query = Query.build(level, {k: ([v] if isinstance(v, str) else list(v)) for k, v in keys.items()})
    return list(QueryEngine(index).find(query)), index.calls  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "keys, plan, expected",
    [
        ({"StudyInstanceUID": ["1.3", "1.1"]}, "studies_by_uid", ["1.3", "1.1"]),
        ({"PatientID": "P1"}, "studies_by_patient_id", ["1.1", "1.2"]),
        ({"AccessionNumber": "A3"}, "studies_by_accession", ["1.3"]),
        ({"StudyDate": "20240101-20240331"}, "studies_by_day", ["1.1", "1.2"]),
        ({"StudyDate": "-20240101"}, "studies_by_day", ["1.3"]),
        ({"ModalitiesInStudy": "CT"}, "studies_by_modality", ["1.1", "1.3"]),
        ({"ModalitiesInStudy": ["SR", "US"]}, "all_studies", ["1.1", "1.4"]),
        ({"PatientName": "?oe*"}, "all_studies", ["1.1", "1.2", "1.3"]),
        ({"PatientName": "MÜLLER*"}, "all_studies", ["1.4"]),
        ({"PatientID": "' OR 1=1 --"}, "studies_by_patient_id", []),
        ({"PatientID": "P1", "StudyDate": "20240301-"}, "studies_by_patient_id", ["1.2"]),
    ],
)
def test_study_plans_and_results(index, keys, plan, expected):
    records, calls = run(index, Level.STUDY, **keys)
    assert calls == [plan]
    assert sorted(r["StudyInstanceUID"] for r in records) == sorted(expected)


def test_series_and_instance_plans(index):
    records, calls = run(index, Level.SERIES, Modality="CT")
    assert calls == ["series_by_modality", "studies_by_uid", "studies_by_uid"]
    assert sorted(r["SeriesInstanceUID"] for r in records) == ["1.1.1", "1.3.1"]
    index.calls.clear()
    records, calls = run(index, Level.SERIES, SeriesInstanceUID="1.2.1")
    assert calls[0] == "series_by_uid" and [r["StudyInstanceUID"] for r in records] == ["1.2"]
    index.calls.clear()
    records, calls = run(index, Level.IMAGE, SOPInstanceUID="1.3.1.1")
    assert calls[0] == "instance_locations_of"
    assert [(r["StudyInstanceUID"], r["Modality"], r["SOPClassUID"]) for r in records] == [
        ("1.3", "CT", CTImageStorage)]
    index.calls.clear()
    records, _ = run(index, Level.IMAGE, StudyInstanceUID="1.1", Modality="SR")
    assert [r["SOPInstanceUID"] for r in records] == ["1.1.2.1"]


def test_patient_level_with_computed_counts(index):
    query = Query.build(Level.PATIENT, {"PatientName": ["Doe*"], "NumberOfPatientRelatedStudies": [],
                                        "NumberOfPatientRelatedSeries": [], "NumberOfPatientRelatedInstances": []})
    (record,) = QueryEngine(index).find(query)  # type: ignore[arg-type]
    assert (record["PatientID"], record["NumberOfPatientRelatedStudies"], record["NumberOfPatientRelatedSeries"],
            record["NumberOfPatientRelatedInstances"]) == ("P1", 2, 3, 3)


def test_a_cancelled_scan_stops_between_rows(index):
    reads = iter([False, False, True])
    engine = QueryEngine(index, cancelled=lambda: next(reads))  # type: ignore[arg-type]
    query = Query.build(Level.STUDY, {"PatientName": ["Nobody*"]})
    with pytest.raises(QueryCancelled):
        list(engine.find(query))


# -- the services over a fake index: statuses, audit, failures the cluster tests cannot provoke ----------


class RecordingAudit:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def record(self, action, event, outcome, description, participants, objects=()):
        self.records.append((action, event, outcome, description, participants, list(objects)))


class BrokenIndex(FakeIndex):
    def studies_by_patient_id(self, pid):
        raise OSError("no host available")


def site_context(index: FakeIndex, limits: LimitsConfig | None = None) -> Any:
    from types import SimpleNamespace

    site = SimpleNamespace(name="A", ae_title="GRID_A", http_host="127.0.0.1", http_port=8081)
    config = SimpleNamespace(limits=limits or LimitsConfig())
    return SimpleNamespace(site=site, index=index, audit=RecordingAudit(), config=config)


@pytest.fixture
def http(index):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from dicomgrid.consumers.qido import qido_routes

    def client(store: FakeIndex = index, limits: LimitsConfig | None = None):
        ctx = site_context(store, limits)
        return TestClient(Starlette(routes=qido_routes(ctx))), ctx.audit

    return client


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_qido_over_a_fake_index(http):
    client, audit = http()
    response = client.get("/dicomweb/studies", params={"PatientID": "P1", "includefield": "StudyDescription"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom+json"
    results = response.json()
    assert {r["0020000D"]["Value"][0] for r in results} == {"1.1", "1.2"}
    assert results[0]["00081190"]["Value"][0].startswith("http://testserver/dicomweb/studies/")
    assert client.get("/dicomweb/studies", params={"PatientID": "nobody"}).json() == []
    response = client.get("/dicomweb/studies", params={"PatientName": "*", "limit": "3", "fuzzymatching": "true"})
    assert len(response.json()) == 3 and response.headers["Warning"].count("299 dicomgrid") == 2
    assert client.get("/dicomweb/studies", params={"StudyDate": "yesterday"}).status_code == 400
    assert client.get("/dicomweb/studies", headers={"Accept": "application/dicom"}).status_code == 406
    assert [r[2] for r in audit.records] == [0, 0, 0, 4]
    assert all(r[1] == "Query" and r[5][0].type == "query" for r in audit.records)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_qido_answers_503_when_the_index_fails(http):
    client, audit = http(BrokenIndex())
    response = client.get("/dicomweb/studies", params={"PatientID": "P1"})
    assert response.status_code == 503
    assert audit.records[-1][2] == 8


class CancellingEvent:
    """A C-FIND event whose requester cancels after ``after`` responses (reported once, as pynetdicom does)."""

    def __init__(self, identifier: Dataset, after: int | None = None) -> None:
        from types import SimpleNamespace

        self.identifier = identifier
        self.request = SimpleNamespace(AffectedSOPClassUID=STUDY_ROOT_FIND)
        import queue

        # An association whose network thread keeps up: nothing waits in its send queue.
        self.assoc = SimpleNamespace(
            requestor=SimpleNamespace(ae_title="FINDSCU", address="127.0.0.1", port=1234),
            dul=SimpleNamespace(to_provider_queue=queue.Queue()),
            is_established=True,
        )
        self.after, self.sent, self.reported = after, 0, False

    @property
    def is_cancelled(self) -> bool:
        if self.after is not None and self.sent >= self.after and not self.reported:
            self.reported = True
            return True
        return False


def run_find(index: FakeIndex, event: CancellingEvent,
             limits: LimitsConfig | None = None) -> tuple[list[int], RecordingAudit]:
    from dicomgrid.consumers.find_scp import FindService

    ctx = site_context(index, limits)
    statuses = []
    for status, _ in FindService(ctx).on_find(event):
        statuses.append(status if isinstance(status, int) else status.Status)
        event.sent += 1
    return statuses, ctx.audit


def test_c_find_handler_statuses_and_audit(index):
    statuses, audit = run_find(index, CancellingEvent(identifier("STUDY", PatientName="*", InstitutionName="")))
    assert statuses == [0xFF01] * 4  # an unsupported key: pending with warning; pynetdicom adds the success
    statuses, audit = run_find(index, CancellingEvent(identifier("STUDY", PatientName="*"), after=2))
    assert statuses == [0xFF00, 0xFF00, 0xFE00]
    assert audit.records[-1][2] == 0 and "cancelled" in audit.records[-1][3]
    statuses, audit = run_find(BrokenIndex(), CancellingEvent(identifier("STUDY", PatientID="P1")))
    assert statuses == [0xC001] and audit.records[-1][2] == 8
    statuses, audit = run_find(index, CancellingEvent(identifier("WORLD", PatientID="P1")))
    assert statuses == [0xA900] and audit.records[-1][2] == 4
    assert audit.records[-1][5][0].detail["identifier"] == {"QueryRetrieveLevel": "WORLD", "PatientID": "P1"}


# -- limits: limit/offset caps and the scan budget ----------------------------------------------------


def test_qido_limit_above_the_maximum_is_clamped_with_a_warning():
    limits = LimitsConfig(qido_max_results=50)
    search = parse_search(Level.STUDY, [("limit", "5000")], {}, flat=True, limits=limits)
    assert search.limit == 50
    assert any("maximum of 50 results" in w for w in search.warnings)
    assert parse_search(Level.STUDY, [], {}, flat=True, limits=limits).limit == 50
    assert parse_search(Level.STUDY, [("limit", "7")], {}, flat=True, limits=limits).warnings == []


def test_qido_offset_beyond_the_cap_is_refused():
    limits = LimitsConfig(qido_max_offset=1000)
    assert parse_search(Level.STUDY, [("offset", "1000")], {}, flat=True, limits=limits).offset == 1000
    with pytest.raises(BadRequest, match="offset is limited to 1000"):
        parse_search(Level.STUDY, [("offset", "1001")], {}, flat=True, limits=limits)
    with pytest.raises(BadRequest):
        parse_search(Level.STUDY, [("offset", "1000000000")], {}, flat=True)


def test_the_scan_budget_stops_a_wildcard_scan(index):
    query = Query.build(Level.STUDY, {"PatientName": ["Nobody*"]})
    with pytest.raises(ScanBudgetExceeded) as info:
        list(QueryEngine(index, scan_budget=3).find(query))  # type: ignore[arg-type]
    assert info.value.status == OUT_OF_RESOURCES and len(info.value.comment) <= 64
    assert list(QueryEngine(index, scan_budget=4).find(query)) == []  # type: ignore[arg-type]
    # An indexed key reads only what it needs: the same budget is plenty.
    exact = Query.build(Level.STUDY, {"PatientID": ["P1"]})
    assert len(list(QueryEngine(index, scan_budget=3).find(exact))) == 2  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_qido_caps_and_scan_budget_over_a_fake_index(http):
    client, audit = http(limits=LimitsConfig(qido_max_results=2, qido_max_offset=10, query_scan_budget_rows=3))
    response = client.get("/dicomweb/studies", params={"PatientID": "P1", "limit": "100"})
    assert response.status_code == 200 and len(response.json()) == 2
    assert "maximum of 2 results" in response.headers["Warning"]
    response = client.get("/dicomweb/studies", params={"offset": "11"})
    assert response.status_code == 400 and "offset is limited to 10" in response.text
    response = client.get("/dicomweb/studies", params={"PatientName": "Nobody*"})
    assert response.status_code == 413 and "too broad" in response.text
    assert [r[2] for r in audit.records] == [0, 4, 4]
    assert "query too broad" in audit.records[-1][3]
    # The service goes on serving.
    assert client.get("/dicomweb/studies", params={"PatientID": "P2"}).status_code == 200


def test_c_find_over_its_scan_budget_ends_with_out_of_resources(index):
    limits = LimitsConfig(query_scan_budget_rows=3)
    statuses, audit = run_find(index, CancellingEvent(identifier("STUDY", PatientName="Nobody*")), limits)
    assert statuses == [OUT_OF_RESOURCES]
    assert audit.records[-1][2] == 4 and "query too broad" in audit.records[-1][3]
    statuses, _ = run_find(index, CancellingEvent(identifier("STUDY", PatientName="*")), limits)
    assert statuses == [0xFF00, 0xFF00, 0xFF00, OUT_OF_RESOURCES]  # what was found is sent, then the refusal
