"""The benchmark harness's pure helpers: multipart counting, the seeded scale set, percentiles."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread

from bench.scale_set import ScaleSet, queries
from bench.stats import percentile, summary
from bench.wado import PartCounter, boundary_of


def _multipart(boundary: str, parts: list[bytes]) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts)
    return body + b"--" + boundary.encode() + b"--\r\n"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_part_counter_counts_parts_whatever_the_chunking(chunk: int) -> None:
    body = _multipart("b0undary", [b"\x00" * 100, b"DICM" * 50, b""])
    counter = PartCounter("b0undary")
    for start in range(0, len(body), chunk):
        counter.feed(body[start:start + chunk])
    assert counter.parts == 3


def test_boundary_of_reads_quoted_and_bare_boundaries() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary=abc') == "abc"
    assert boundary_of('multipart/related; boundary="x-y"; type="application/dicom"') == "x-y"
    with pytest.raises(ValueError):
        boundary_of("application/dicom")


def test_scale_set_is_a_seeded_prefix_stream() -> None:
    scale = ScaleSet(50, seed=3)
    whole = list(scale.items())
    assert [s.index for s in whole] == list(range(50))
    assert list(scale.items(20)) == whole[20:]
    again = list(ScaleSet(50, seed=3).items())
    assert [(s.study_uid, s.patient_id, s.study_date) for s in again] == \
        [(s.study_uid, s.patient_id, s.study_date) for s in whole]
    assert len({s.study_uid for s in whole}) == 50
    study = whole[7]
    assert study.event()["event_id"] == again[7].event()["event_id"]  # a resumed load upserts the same rows


def test_scale_study_is_the_same_in_both_archives() -> None:
    study = next(ScaleSet(10).items(4))
    event, ds = study.event(), dcmread(io.BytesIO(study.dicom()))
    assert (ds.PatientID, ds.StudyDate, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
        event["patient"]["id"], event["study"]["date"], event["study"]["uid"], event["series"]["uid"],
        event["instance"]["sop_instance_uid"])


def test_scale_queries_are_the_same_list_every_time() -> None:
    scale = ScaleSet(1000)
    first = queries(scale, {"patient": 5, "range": 2})
    assert first == queries(scale, {"patient": 5, "range": 2})
    assert [q.kind for q in first] == ["patient"] * 5 + ["range"] * 2
    start, end = first[-1].keys["StudyDate"].split("-")
    assert int(end) > int(start)


def test_percentile_and_summary() -> None:
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 51
    assert percentile(values, 0.99) == 99
    assert summary([])["p50"] is None
    assert summary([2.0, 4.0])["mean"] == 3.0
