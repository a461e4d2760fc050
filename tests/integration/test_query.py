"""C-FIND and QIDO-RS on the real cluster: a corpus sent once by C-STORE to site A, queried at both sites.

Names, patient IDs and accession numbers carry a random token per run, so every expected result set is
exact whatever else the test keyspace holds; queries at site B read datacenter dc2, so they also show
the index replicated across datacenters.
"""

from __future__ import annotations

import os
import random
import shutil
import string
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicomgrid import schemas
from dicomgrid.core.config import SiteConfig
from dicomgrid.core.dimse import set_nodelay
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from tests.dicom_samples import make_instance, to_part10
from tests.grid import bearer, settle_reactor, wait_for

# Hostile identifiers are built on purpose; pydicom warns about each invalid value.
pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings(
    "ignore:(Invalid value for VR|The value length|The PN component length):UserWarning"
)]

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
PENDING = (0xFF00, 0xFF01)

# study key: (patient, StudyDate, StudyTime, StudyDescription, [(Modality, instances), ...])
LAYOUT = {
    "S1": ("P1", "20230115", "081500", "CT CHEST", [("CT", 2), ("SR", 1)]),
    "S2": ("P1", "20240102", "101500", "MR BRAIN", [("MR", 2)]),
    "S3": ("P1", "20240320", "140000", "CT ABDOMEN", [("CT", 1)]),
    "S4": ("P2", "20231231", "235959", "US NECK", [("US", 1)]),
    "S5": ("P2", "20240701", "093000", "CT MR FOLLOW-UP", [("CT", 1), ("MR", 1)]),
    "S6": ("P3", "20240102", "120000", "CT HEAD", [("CT", 1)]),
}


@dataclass
class Corpus:
    """The studies of one run; ``uid("S1")`` etc. map layout keys to the UIDs sent."""

    run: str
    patients: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # key -> (id, name, sex)
    study_uids: dict[str, str] = field(default_factory=dict)
    series: dict[str, list[tuple[str, str, list[str]]]] = field(default_factory=dict)  # study -> (uid, modality, sops)
    datasets: list[Dataset] = field(default_factory=list)

    def uid(self, study: str) -> str:
        return self.study_uids[study]

    def uids(self, *studies: str) -> set[str]:
        return {self.study_uids[s] for s in studies}

    def pid(self, patient: str) -> str:
        return self.patients[patient][0]


def build_corpus() -> Corpus:
    run = "".join(random.choices(string.ascii_uppercase, k=8))
    corpus = Corpus(run)
    corpus.patients = {
        "P1": (f"{run}-P1", f"Doe{run}^Jane", "F"),
        "P2": (f"{run}-P2", f"Roe{run}^Richard", "M"),
        "P3": (f"{run}-P3", f"Müller{run}^Jürgen", "M"),
    }
    for key, (patient, date, time_, description, series_layout) in LAYOUT.items():
        study_uid = corpus.study_uids[key] = generate_uid()
        patient_id, name, sex = corpus.patients[patient]
        corpus.series[key] = []
        for number, (modality, count) in enumerate(series_layout, 1):
            series_uid = generate_uid()
            sops = []
            for instance in range(1, count + 1):
                ds = make_instance(
                    study_uid=study_uid, series_uid=series_uid, patient_id=patient_id, patient_name=name,
                    study_date=date, modality=modality,
                    sop_class=MRImageStorage if modality == "MR" else CTImageStorage,
                    StudyTime=time_, StudyDescription=description, AccessionNumber=f"{run}{key}", StudyID=key,
                    PatientSex=sex, PatientBirthDate="19800101", SeriesNumber=number, InstanceNumber=instance,
                    SpecificCharacterSet="ISO_IR 192",
                )
                corpus.datasets.append(ds)
                sops.append(ds.SOPInstanceUID)
            corpus.series[key].append((series_uid, modality, sops))
    return corpus


def c_store(site: SiteConfig, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = [build_context(CTImageStorage), build_context(MRImageStorage)]
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def ingest(grid: Any, corpus: Corpus, timeout: float = 90.0) -> None:
    """Send the corpus to site A; return once both datacenters index every study and patient."""
    assert set(c_store(grid.site("A"), corpus.datasets)) == {0}
    expected = {corpus.uid(k): sum(n for _, n in layout[4]) for k, layout in LAYOUT.items()}
    for dc in ("dc1", "dc2"):
        store = grid.metadata(dc)
        try:
            def indexed() -> bool:
                rows = {r.study_uid: r.number_of_instances for r in store.studies_by_uid(expected)}
                patients = list(store.patients_by_id([p[0] for p in corpus.patients.values()]))
                return rows == expected and len(patients) == 3

            wait_for(indexed, timeout=timeout, interval=0.5)
        finally:
            store.db.close()


@pytest.fixture(scope="module")
def corpus(grid) -> Corpus:
    built = build_corpus()
    ingest(grid, built)
    return built


# -- a C-FIND client -------------------------------------------------------------------------------


class FindSCU:
    """One association to a site for several C-FINDs (TCP_NODELAY on, as a PACS should)."""

    def __init__(self, site: SiteConfig, calling_ae: str = "FINDSCU") -> None:
        ae = AE(ae_title=calling_ae)
        ae.requested_contexts = [build_context(STUDY_ROOT), build_context(PATIENT_ROOT), build_context(Verification)]
        self.assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title,
                                  evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        assert self.assoc.is_established

    def find(self, level: str, model: Any = STUDY_ROOT, charset: str | None = None,
             **keys: Any) -> tuple[list[Dataset], Dataset]:
        ds = Dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        matches, final = [], None
        for status, identifier in self.send_c_find(ds, model):
            assert status is not None, "no response from the SCP"
            if status.Status in PENDING:
                matches.append(identifier)
            else:
                final = status
        assert final is not None
        return matches, final

    def send_c_find(self, ds: Dataset, model: Any, **kwargs: Any) -> Iterator[tuple[Dataset, Dataset | None]]:
        """pynetdicom's ``send_c_find`` on this association, once its reactor is really paused (the
        association serves many operations in a row: :func:`tests.grid.settle_reactor`)."""
        settle_reactor(self.assoc)
        return self.assoc.send_c_find(ds, model, **kwargs)

    def echo(self) -> int:
        settle_reactor(self.assoc)
        return self.assoc.send_c_echo().Status

    def close(self) -> None:
        self.assoc.release()


@pytest.fixture(scope="module", params=["A", "B"])
def scu(request, grid, corpus) -> Iterator[tuple[FindSCU, SiteConfig]]:
    site = grid.site(request.param)
    client = FindSCU(site)
    yield client, site
    client.close()


def study_uids(matches: list[Dataset]) -> set[str]:
    return {str(m.StudyInstanceUID) for m in matches}


# -- C-FIND ----------------------------------------------------------------------------------------


STUDY_CASES = [
    ("patient id", lambda c: {"PatientID": c.pid("P1")}, ("S1", "S2", "S3")),
    ("wildcard *", lambda c: {"PatientName": f"Doe{c.run}*"}, ("S1", "S2", "S3")),
    ("wildcard ?", lambda c: {"PatientName": f"?oe{c.run}*"}, ("S1", "S2", "S3", "S4", "S5")),
    ("person names ignore case", lambda c: {"PatientName": f"doe{c.run.lower()}^JANE"}, ("S1", "S2", "S3")),
    ("closed date range", lambda c: {"PatientName": f"?oe{c.run}*", "StudyDate": "20240101-20240331"}, ("S2", "S3")),
    ("open start", lambda c: {"PatientName": f"?oe{c.run}*", "StudyDate": "-20231231"}, ("S1", "S4")),
    ("open end", lambda c: {"PatientName": f"?oe{c.run}*", "StudyDate": "20240320-"}, ("S3", "S5")),
    ("single date", lambda c: {"PatientID": c.pid("P1"), "StudyDate": "20240102"}, ("S2",)),
    ("list of UIDs", lambda c: {"StudyInstanceUID": [c.uid("S1"), c.uid("S4")]}, ("S1", "S4")),
    ("accession number", lambda c: {"AccessionNumber": f"{c.run}S5"}, ("S5",)),
    ("modality in study", lambda c: {"PatientName": f"?oe{c.run}*", "ModalitiesInStudy": "MR"}, ("S2", "S5")),
    ("modalities in study", lambda c: {"PatientName": f"?oe{c.run}*", "ModalitiesInStudy": ["US", "SR"]},
     ("S1", "S4")),
    ("time range", lambda c: {"PatientID": c.pid("P2"), "StudyTime": "2300-"}, ("S4",)),
    ("description wildcard", lambda c: {"PatientID": c.pid("P1"), "StudyDescription": "CT*"}, ("S1", "S3")),
    ("no match", lambda c: {"PatientID": f"{c.run}-NOBODY"}, ()),
]


@pytest.mark.parametrize("name, keys, expected", STUDY_CASES, ids=[case[0] for case in STUDY_CASES])
def test_study_level_matching(scu, corpus, name, keys, expected):
    client, _ = scu
    matches, final = client.find("STUDY", **keys(corpus))
    assert final.Status == 0x0000
    assert study_uids(matches) == corpus.uids(*expected)
    assert len(matches) == len(expected)


def test_empty_keys_return_values_and_only_what_was_asked(scu, corpus):
    client, site = scu
    requested = ["PatientName", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
                 "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                 "RetrieveAETitle", "InstanceAvailability"]
    matches, final = client.find("STUDY", PatientID=corpus.pid("P1"), **{k: "" for k in requested})
    assert final.Status == 0x0000
    by_uid = {str(m.StudyInstanceUID): m for m in matches}
    assert set(by_uid) == corpus.uids("S1", "S2", "S3")
    for m in matches:
        assert {e.keyword for e in m} == {*requested, "PatientID", "StudyInstanceUID", "QueryRetrieveLevel"}
    s1 = by_uid[corpus.uid("S1")]
    assert str(s1.PatientName) == f"Doe{corpus.run}^Jane"
    assert (s1.StudyDate, s1.StudyTime, s1.AccessionNumber) == ("20230115", "081500", f"{corpus.run}S1")
    assert list(s1.ModalitiesInStudy) == ["CT", "SR"]
    assert (int(s1.NumberOfStudyRelatedSeries), int(s1.NumberOfStudyRelatedInstances)) == (2, 3)
    assert s1.SOPClassesInStudy == CTImageStorage
    assert s1.RetrieveAETitle == site.ae_title and s1.InstanceAvailability == "ONLINE"


def test_non_ascii_names_in_utf8_and_latin1_requests(scu, corpus):
    client, _ = scu
    for charset in ("ISO_IR 192", "ISO_IR 100"):
        matches, final = client.find("STUDY", charset=charset, PatientName=f"Müller{corpus.run}*")
        assert final.Status == 0x0000
        assert study_uids(matches) == corpus.uids("S6")
        (match,) = matches
        assert match.SpecificCharacterSet == "ISO_IR 192"
        assert str(match.PatientName) == f"Müller{corpus.run}^Jürgen"


def test_series_level(scu, corpus):
    client, _ = scu
    matches, final = client.find("SERIES", StudyInstanceUID=corpus.uid("S5"), Modality="", SeriesNumber="",
                                 NumberOfSeriesRelatedInstances="")
    assert final.Status == 0x0000
    assert {(m.Modality, int(m.SeriesNumber), int(m.NumberOfSeriesRelatedInstances)) for m in matches} == {
        ("CT", 1, 1), ("MR", 2, 1)}
    assert {str(m.SeriesInstanceUID) for m in matches} == {uid for uid, _, _ in corpus.series["S5"]}
    matches, _ = client.find("SERIES", StudyInstanceUID=corpus.uid("S1"), Modality="SR")
    assert [str(m.SeriesInstanceUID) for m in matches] == [corpus.series["S1"][1][0]]
    matches, _ = client.find("SERIES", PATIENT_ROOT, PatientID=corpus.pid("P2"),
                             StudyInstanceUID=corpus.uid("S5"), Modality="MR")
    assert [m.Modality for m in matches] == ["MR"] and matches[0].PatientID == corpus.pid("P2")
    # The study belongs to another patient: no match.
    matches, final = client.find("SERIES", PATIENT_ROOT, PatientID=corpus.pid("P1"), StudyInstanceUID=corpus.uid("S5"))
    assert final.Status == 0x0000 and matches == []


def test_image_level(scu, corpus):
    client, _ = scu
    series_uid, _, sops = corpus.series["S1"][0]
    matches, final = client.find("IMAGE", StudyInstanceUID=corpus.uid("S1"), SeriesInstanceUID=series_uid,
                                 SOPInstanceUID="", InstanceNumber="", SOPClassUID="")
    assert final.Status == 0x0000
    assert {(str(m.SOPInstanceUID), int(m.InstanceNumber)) for m in matches} == {(sops[0], 1), (sops[1], 2)}
    assert {m.SOPClassUID for m in matches} == {CTImageStorage}
    matches, _ = client.find("IMAGE", StudyInstanceUID=corpus.uid("S1"), SeriesInstanceUID=series_uid,
                             SOPInstanceUID=[sops[1], generate_uid()])
    assert [str(m.SOPInstanceUID) for m in matches] == [sops[1]]
    matches, _ = client.find("IMAGE", PATIENT_ROOT, PatientID=corpus.pid("P1"), StudyInstanceUID=corpus.uid("S1"),
                             SeriesInstanceUID=series_uid, InstanceNumber="2")
    assert [str(m.SOPInstanceUID) for m in matches] == [sops[1]]
    assert {e.keyword for e in matches[0]} == {"QueryRetrieveLevel", "PatientID", "StudyInstanceUID",
                                               "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"}


def test_patient_level(scu, corpus):
    client, _ = scu
    counts = {"NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
              "NumberOfPatientRelatedInstances": ""}
    matches, final = client.find("PATIENT", PATIENT_ROOT, PatientName=f"?oe{corpus.run}*", PatientSex="", **counts)
    assert final.Status == 0x0000
    got = {(m.PatientID, m.PatientSex, int(m.NumberOfPatientRelatedStudies), int(m.NumberOfPatientRelatedSeries),
            int(m.NumberOfPatientRelatedInstances)) for m in matches}
    assert got == {(corpus.pid("P1"), "F", 3, 4, 6), (corpus.pid("P2"), "M", 2, 3, 3)}
    matches, _ = client.find("PATIENT", PATIENT_ROOT, PatientID=f"{corpus.run}-P*", PatientName="")
    assert {(m.PatientID, str(m.PatientName)) for m in matches} == {
        (p[0], p[1]) for p in corpus.patients.values()}
    matches, _ = client.find("PATIENT", PATIENT_ROOT, PatientID=corpus.pid("P3"))
    assert [m.PatientID for m in matches] == [corpus.pid("P3")]


REFUSALS = [
    ("unknown level", "WORLD", STUDY_ROOT, {"PatientID": "X"}, 0xA900),
    ("no level", None, STUDY_ROOT, {"PatientID": "X"}, 0xA900),
    ("patient level in study root", "PATIENT", STUDY_ROOT, {"PatientID": "X"}, 0xA900),
    ("key below the level", "STUDY", STUDY_ROOT, {"PatientID": "X", "SOPInstanceUID": ""}, 0xA900),
    ("series without study", "SERIES", STUDY_ROOT, {"Modality": "CT"}, 0xA900),
    ("study without patient (patient root)", "STUDY", PATIENT_ROOT, {"StudyDate": ""}, 0xA900),
    ("return key with a value", "STUDY", STUDY_ROOT, {"NumberOfStudyRelatedInstances": "3"}, 0xA900),
    ("malformed date", "STUDY", STUDY_ROOT, {"StudyDate": "2024-01-01"}, 0xC000),
    ("reversed range", "STUDY", STUDY_ROOT, {"StudyDate": "20240201-20240101"}, 0xC000),
    ("absurd length", "STUDY", STUDY_ROOT, {"PatientID": "X" * 5000}, 0xC000),
    ("several patient ids", "STUDY", STUDY_ROOT, {"PatientID": ["A", "B"]}, 0xC000),
]


@pytest.mark.parametrize("name, level, model, keys, status", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_identifiers_get_a_clear_failure(scu, name, level, model, keys, status):
    client, _ = scu
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    responses = list(client.send_c_find(ds, model))
    assert len(responses) == 1, "a refused query has no pending responses"
    final, identifier = responses[0]
    assert final.Status == status and identifier is None
    assert final.ErrorComment
    assert client.assoc.is_established and client.echo() == 0x0000


INJECTIONS = ["' OR 1=1 --", "*'; DROP TABLE studies; --", "X\\' OR ''='", "Y" * 5000, "a\x00b\r\nc",
              "%' ALLOW FILTERING"]
INJECTED_KEYS = ["PatientID", "PatientName", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
                 "ModalitiesInStudy", "StudyInstanceUID", "StudyDate", "StudyTime"]


def test_injection_attempts_match_nothing_or_fail_cleanly(grid, corpus):
    client = FindSCU(grid.site("A"))
    try:
        for keyword in INJECTED_KEYS:
            for payload in INJECTIONS:
                matches, final = client.find("STUDY", **{keyword: payload, "StudyInstanceUID": ""}
                                             if keyword != "StudyInstanceUID" else {keyword: payload})
                assert final.Status == 0x0000 and matches == [] or final.Status == 0xA900 or (
                    0xC000 <= final.Status <= 0xCFFF), (keyword, payload, hex(final.Status))
        # Nothing else affected: the corpus answers as before, on the same association.
        matches, final = client.find("STUDY", PatientID=corpus.pid("P1"))
        assert final.Status == 0x0000 and study_uids(matches) == corpus.uids("S1", "S2", "S3")
    finally:
        client.close()


CANCEL_SERIES_SIZE = 400
_cancel_series: dict[int, tuple[str, str]] = {}


def cancel_series(grid: Any) -> tuple[str, str]:
    """(study, series) UIDs of one large series, sent once per session (this module and the DCMTK tests).

    Large, so that the SCP is still streaming matches when a C-CANCEL sent after the first one arrives.
    """
    if id(grid) not in _cancel_series:
        study, series = generate_uid(), generate_uid()
        token = "".join(random.choices(string.ascii_uppercase, k=8))
        folder = Path(tempfile.mkdtemp(prefix="cancel-series-"))
        for n in range(1, CANCEL_SERIES_SIZE + 1):
            ds = make_instance(study_uid=study, series_uid=series, patient_id=f"{token}-C", InstanceNumber=n)
            (folder / f"{n:04d}.dcm").write_bytes(to_part10(ds))
        # DCMTK sends the 400 instances: a long pynetdicom C-STORE run occasionally loses a response
        # to its own reactor thread ("unexpected C-STORE service message") and waits out the timeout.
        site = grid.site("A")
        sent = subprocess.run(
            [require_dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", site.ae_title, site.dicom_host,
             str(site.dicom_port), "+sd", str(folder)],
            env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=300,
        )
        shutil.rmtree(folder, ignore_errors=True)
        assert sent.returncode == 0, sent.stderr[-2000:]
        store = grid.metadata("dc1")
        try:
            wait_for(lambda: len(list(store.instances_of_series(study, series))) == CANCEL_SERIES_SIZE,
                     timeout=90, interval=0.5)
        finally:
            store.db.close()
        _cancel_series[id(grid)] = (study, series)
    return _cancel_series[id(grid)]


def test_c_cancel_stops_the_query(grid):
    """A C-CANCEL after the first match ends the query with 0xFE00 before every match is sent."""
    study, series = cancel_series(grid)
    client = FindSCU(grid.site("A"))
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, ""
        responses = client.send_c_find(ds, STUDY_ROOT, msg_id=7)
        statuses = []
        for status, _ in responses:
            statuses.append(status.Status)
            if len(statuses) == 1:
                client.assoc.send_c_cancel(7, query_model=STUDY_ROOT)
        assert statuses[-1] == 0xFE00
        assert all(s in PENDING for s in statuses[:-1]) and len(statuses) - 1 < CANCEL_SERIES_SIZE
        assert client.find("STUDY", StudyInstanceUID=study)[1].Status == 0x0000
    finally:
        client.close()


def test_every_query_is_audited(grid, taps, corpus):
    tap = taps(schemas.TOPIC_AUDIT)
    client = FindSCU(grid.site("A"))
    try:
        client.find("STUDY", PatientID=corpus.pid("P2"))
        client.find("STUDY", StudyDate=f"{corpus.run}")
    finally:
        client.close()

    def queries(seen: list[dict]) -> list[dict]:
        return [a for a in seen if a["event"] == "Query" and corpus.run in str(a["objects"])]

    audits = queries(tap.collect(lambda seen: len(queries(seen)) >= 2, timeout=30))
    assert len(audits) == 2
    for audit in audits:
        schemas.validate_event(schemas.TOPIC_AUDIT, audit)
        assert audit["action"] == "E" and audit["site"] == "A"
        assert [p["user_id"] for p in audit["participants"] if p["requestor"]] == ["FINDSCU"]
        assert audit["objects"][0]["type"] == "query" and audit["objects"][0]["id"] == STUDY_ROOT
    success = next(a for a in audits if a["outcome"] == 0)
    assert success["objects"][0]["detail"]["keys"] == {"PatientID": corpus.pid("P2")}
    assert success["objects"][0]["detail"]["matches"] == 2
    refused = next(a for a in audits if a["outcome"] != 0)
    assert "0xC000" in refused["outcome_description"]
    assert refused["objects"][0]["detail"]["identifier"]["StudyDate"] == corpus.run


# -- QIDO-RS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["A", "B"])
def web(request, grid, corpus) -> Iterator[tuple[httpx.Client, str]]:
    site = grid.site(request.param)
    base = f"http://{site.http_host}:{site.http_port}/dicomweb"
    with httpx.Client(base_url=base, timeout=30, headers=bearer(grid.config, "read")) as client:
        yield client, base


def qido(client: httpx.Client, path: str, params: Any = None, status: int = 200) -> list[dict]:
    response = client.get(path, params=params, headers={"Accept": "application/dicom+json"})
    assert response.status_code == status, response.text
    if status != 200:
        return []
    assert response.headers["content-type"].startswith("application/dicom+json")
    return response.json()


def values(results: list[dict], tag: str) -> set[Any]:
    return {tuple(r[tag]["Value"]) if len(r[tag].get("Value", [])) > 1 else (r[tag].get("Value") or [None])[0]
            for r in results}


def test_qido_studies(web, corpus):
    client, base = web
    results = qido(client, "/studies", {"PatientID": corpus.pid("P1")})
    assert values(results, "0020000D") == corpus.uids("S1", "S2", "S3")
    s1 = next(r for r in results if r["0020000D"]["Value"] == [corpus.uid("S1")])
    assert s1["00100010"]["Value"] == [{"Alphabetic": f"Doe{corpus.run}^Jane"}]
    assert s1["00080061"]["Value"] == ["CT", "SR"]
    assert (s1["00201206"]["Value"], s1["00201208"]["Value"]) == ([2], [3])
    assert s1["00081190"]["Value"] == [f"{base}/studies/{corpus.uid('S1')}"]
    assert "00081030" not in s1  # StudyDescription is not a default attribute
    results = qido(client, "/studies", {"00100020": corpus.pid("P2"), "includefield": "StudyDescription"})
    assert values(results, "00081030") == {"US NECK", "CT MR FOLLOW-UP"}
    results = qido(client, "/studies", [("PatientName", f"?oe{corpus.run}*"), ("StudyDate", "20240101-20240331")])
    assert values(results, "0020000D") == corpus.uids("S2", "S3")
    results = qido(client, "/studies", {"StudyInstanceUID": f"{corpus.uid('S4')},{corpus.uid('S6')}"})
    assert values(results, "0020000D") == corpus.uids("S4", "S6")
    results = qido(client, "/studies", {"PatientName": f"Müller{corpus.run}*", "includefield": "all"})
    (s6,) = results
    assert s6["00100010"]["Value"] == [{"Alphabetic": f"Müller{corpus.run}^Jürgen"}]
    assert s6["00080005"]["Value"] == ["ISO_IR 192"] and s6["00100040"]["Value"] == ["M"]
    assert qido(client, "/studies", {"PatientID": f"{corpus.run}-NOBODY"}) == []


def test_qido_series_and_instances(web, corpus):
    client, _ = web
    s1_series = {uid for uid, _, _ in corpus.series["S1"]}
    results = qido(client, f"/studies/{corpus.uid('S1')}/series")
    assert values(results, "0020000E") == s1_series
    assert values(results, "00080060") == {"CT", "SR"}
    series_uid, _, sops = corpus.series["S1"][0]
    results = qido(client, f"/studies/{corpus.uid('S1')}/series/{series_uid}/instances")
    assert values(results, "00080018") == set(sops)
    results = qido(client, f"/studies/{corpus.uid('S1')}/instances", {"InstanceNumber": "1"})
    assert values(results, "00080018") == {sops[0], corpus.series["S1"][1][2][0]}
    # Across studies: series by study-level keys, by Modality, by SeriesInstanceUID.
    results = qido(client, "/series", {"PatientID": corpus.pid("P2"), "Modality": "MR"})
    assert values(results, "0020000E") == {corpus.series["S5"][1][0]}
    assert values(results, "00100020") == {corpus.pid("P2")}  # study attributes come along
    results = qido(client, "/series", {"Modality": "US", "PatientName": f"?oe{corpus.run}*"})
    assert values(results, "0020000E") == {corpus.series["S4"][0][0]}
    results = qido(client, "/series", {"SeriesInstanceUID": corpus.series["S6"][0][0]})
    assert values(results, "0020000D") == corpus.uids("S6")
    results = qido(client, "/instances", {"SOPInstanceUID": f"{sops[1]}\\{corpus.series['S3'][0][2][0]}"})
    assert values(results, "00080018") == {sops[1], corpus.series["S3"][0][2][0]}
    assert values(results, "00080060") == {"CT"}


def test_qido_paging(web, corpus):
    client, _ = web
    params = {"PatientName": f"?oe{corpus.run}*", "limit": "2"}
    seen: list[str] = []
    for offset in (0, 2, 4, 6):
        response = client.get("/studies", params={**params, "offset": str(offset)})
        assert response.status_code == 200
        page = [r["0020000D"]["Value"][0] for r in response.json()]
        assert len(page) == {0: 2, 2: 2, 4: 1, 6: 0}[offset]
        assert ("Warning" in response.headers) == (offset == 0 or offset == 2)
        seen += page
    assert len(seen) == 5 and set(seen) == corpus.uids("S1", "S2", "S3", "S4", "S5")


@pytest.mark.parametrize(
    "path, params, status",
    [
        ("/studies", {"NoSuchKeyword": "1"}, 400),
        ("/studies", {"StudyDate": "2024-01-01"}, 400),
        ("/studies", {"StudyInstanceUID": "' OR 1=1 --"}, 400),
        ("/studies", {"Modality": "CT"}, 400),
        ("/studies", {"limit": "-1"}, 400),
        ("/studies", {"PatientID": "x" * 500}, 400),
        ("/studies/not-a-uid/series", {}, 400),
        ("/series", {"00400275.00321060": "X"}, 400),
    ],
)
def test_qido_bad_requests(web, path, params, status):
    client, _ = web
    qido(client, path, params, status=status)


def test_qido_injection_attempts(web, corpus):
    client, _ = web
    for keyword in ["PatientID", "PatientName", "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
                    "StudyInstanceUID", "StudyDate"]:
        for payload in INJECTIONS:
            response = client.get("/studies", params={keyword: payload})
            assert response.status_code == 400 or (response.status_code == 200 and response.json() == []), (
                keyword, payload, response.status_code)
    assert values(qido(client, "/studies", {"PatientID": corpus.pid("P1")}), "0020000D") == corpus.uids(
        "S1", "S2", "S3")


def test_dicomweb_client_round_trip(grid, web, corpus):
    _, base = web
    client = DICOMwebClient(url=base, headers=bearer(grid.config, "read"))
    studies = client.search_for_studies(search_filters={"PatientID": corpus.pid("P2")})
    assert {s["0020000D"]["Value"][0] for s in studies} == corpus.uids("S4", "S5")
    series = client.search_for_series(study_instance_uid=corpus.uid("S5"))
    assert {s["0020000E"]["Value"][0] for s in series} == {uid for uid, _, _ in corpus.series["S5"]}
    mr_series = corpus.series["S5"][1]
    instances = client.search_for_instances(study_instance_uid=corpus.uid("S5"), series_instance_uid=mr_series[0])
    assert [i["00080018"]["Value"][0] for i in instances] == mr_series[2]
    assert client.search_for_studies(search_filters={"PatientID": f"{corpus.run}-NOBODY"}) == []
    paged = client.search_for_studies(search_filters={"PatientName": f"?oe{corpus.run}*"}, limit=2, get_remaining=True)
    assert {s["0020000D"]["Value"][0] for s in paged} == corpus.uids("S1", "S2", "S3", "S4", "S5")
