"""DCMTK's findscu queries both sites (Study Root -S, Patient Root -P, keys with -k) for the corpus of
tests/integration/test_query.py, sent once to site A: the responses must be exactly the expected sets.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomgrid.core.config import SiteConfig
from dicomgrid.deploy.local.dcmtk import dcmtk_tool
from tests.integration.test_query import CANCEL_SERIES_SIZE, STUDY_CASES, Corpus, build_corpus, cancel_series, ingest

pytestmark = [
    pytest.mark.interop,
    pytest.mark.cluster,
    pytest.mark.skipif(dcmtk_tool("findscu") is None, reason="DCMTK findscu is not installed"),
]


@pytest.fixture(scope="module")
def corpus(grid) -> Corpus:
    built = build_corpus()
    ingest(grid, built)
    return built


def findscu(
    site: SiteConfig, out: Path, keys: dict[str, Any], model: str = "-S", extra: tuple[str, ...] = (),
    debug: bool = False,
) -> tuple[list[Dataset], str]:
    """Run findscu; return the responses it extracted (-X) and its log (-d shows statuses and comments)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [dcmtk_tool("findscu"), "-d" if debug else "-v", model, "-aet", "FINDSCU", "-aec", site.ae_title,
            "-X", "-od", str(out), *extra]
    for keyword, value in keys.items():
        value = "\\".join(value) if isinstance(value, list) else value
        args += ["-k", keyword if value is None else f"{keyword}={value}"]
    args += [site.dicom_host, str(site.dicom_port)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
    log = done.stdout + done.stderr
    assert "Association Accepted" in log, log
    return [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))], log


def final_status(log: str) -> str:
    lines = [line for line in log.splitlines() if "Received Final Find Response" in line]
    assert lines, log
    return lines[-1]


@pytest.fixture(scope="module", params=["A", "B"])
def site(request, grid, corpus) -> SiteConfig:
    return grid.site(request.param)


@pytest.mark.parametrize("name, keys, expected", STUDY_CASES, ids=[case[0] for case in STUDY_CASES])
def test_study_root_study_level(site, corpus, tmp_path, name, keys, expected):
    responses, log = findscu(site, tmp_path, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": None,
                                              **keys(corpus)})
    assert "Success" in final_status(log)
    assert {str(r.StudyInstanceUID) for r in responses} == corpus.uids(*expected)
    assert len(responses) == len(expected)


def test_returned_values_and_character_set(site, corpus, tmp_path):
    responses, log = findscu(site, tmp_path, {
        "SpecificCharacterSet": "ISO_IR 192", "QueryRetrieveLevel": "STUDY", "PatientName": f"Müller{corpus.run}*",
        "PatientID": None, "StudyDate": None, "ModalitiesInStudy": None, "NumberOfStudyRelatedInstances": None,
    })
    assert "Success" in final_status(log)
    (match,) = responses
    assert match.SpecificCharacterSet == "ISO_IR 192"
    assert str(match.PatientName) == f"Müller{corpus.run}^Jürgen"
    assert (match.PatientID, match.StudyDate, match.ModalitiesInStudy) == (corpus.pid("P3"), "20240102", "CT")
    assert int(match.NumberOfStudyRelatedInstances) == 1
    assert {e.keyword for e in match} == {"SpecificCharacterSet", "QueryRetrieveLevel", "PatientName", "PatientID",
                                          "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                                          "StudyInstanceUID"}


def test_patient_root_patient_and_image_levels(site, corpus, tmp_path):
    responses, log = findscu(site, tmp_path, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": f"{corpus.run}-P*", "PatientName": None,
        "NumberOfPatientRelatedStudies": None}, model="-P")
    assert "Success" in final_status(log)
    assert {(r.PatientID, int(r.NumberOfPatientRelatedStudies)) for r in responses} == {
        (corpus.pid("P1"), 3), (corpus.pid("P2"), 2), (corpus.pid("P3"), 1)}
    series_uid, _, sops = corpus.series["S2"][0]
    responses, log = findscu(site, tmp_path, {
        "QueryRetrieveLevel": "IMAGE", "PatientID": corpus.pid("P1"), "StudyInstanceUID": corpus.uid("S2"),
        "SeriesInstanceUID": series_uid, "SOPInstanceUID": None, "InstanceNumber": None}, model="-P")
    assert "Success" in final_status(log)
    assert {(str(r.SOPInstanceUID), int(r.InstanceNumber)) for r in responses} == {(sops[0], 1), (sops[1], 2)}


def test_series_level(site, corpus, tmp_path):
    responses, _ = findscu(site, tmp_path, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": corpus.uid("S5"),
                                            "SeriesInstanceUID": None, "Modality": None})
    assert {(str(r.SeriesInstanceUID), r.Modality) for r in responses} == {
        (uid, modality) for uid, modality, _ in corpus.series["S5"]}


@pytest.mark.parametrize(
    "keys, model, status",
    [
        ({"QueryRetrieveLevel": "WORLD", "PatientID": "X"}, "-S", "a900"),
        ({"QueryRetrieveLevel": "PATIENT", "PatientID": "X"}, "-S", "a900"),
        ({"QueryRetrieveLevel": "STUDY", "SOPInstanceUID": None}, "-S", "a900"),
        ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2024-01-01"}, "-S", "c000"),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "' OR 1=1 --"}, "-S", "c000"),
    ],
)
def test_refused_identifiers(site, tmp_path, keys, model, status):
    responses, log = findscu(site, tmp_path, keys, model=model, debug=True)
    assert responses == []
    (status_line,) = [line for line in log.splitlines() if "DIMSE Status" in line]
    assert f": 0x{status}" in status_line, log
    assert "ErrorComment" in log, log


@pytest.mark.parametrize("payload", ["' OR 1=1 --", "*'; DROP TABLE studies; --", "\\' OR ''='"])
def test_injection_in_matching_keys(site, corpus, tmp_path, payload):
    for keyword in ("PatientID", "PatientName", "StudyDescription", "ReferringPhysicianName"):
        responses, log = findscu(site, tmp_path, {"QueryRetrieveLevel": "STUDY", keyword: payload,
                                                  "StudyInstanceUID": None})
        assert responses == [], (keyword, payload)
    responses, _ = findscu(site, tmp_path, {"QueryRetrieveLevel": "STUDY", "PatientID": corpus.pid("P1"),
                                            "StudyInstanceUID": None})
    assert {str(r.StudyInstanceUID) for r in responses} == corpus.uids("S1", "S2", "S3")


def test_cancel_after_first_response(grid, tmp_path):
    study, series = cancel_series(grid)
    responses, log = findscu(grid.site("A"), tmp_path, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SeriesInstanceUID": series,
        "SOPInstanceUID": None}, extra=("--cancel", "1"))
    assert "Cancel" in final_status(log), log
    assert 1 <= len(responses) < CANCEL_SERIES_SIZE
