"""Abuse of a running site: hostile values a sender may put in an instance."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from dicomgrid import schemas
from tests.dicom_samples import make_instance, to_part10
from tests.grid import wait_for

pytestmark = [pytest.mark.cluster]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def run_timed(argv: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)
    return done, time.monotonic() - started


# -- over-long indexed text ------------------------------------------------------------------------


def stow(site, *instances: bytes) -> httpx.Response:
    body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in instances)
    return httpx.post(f"http://{site.http_host}:{site.http_port}/dicomweb/studies", content=body + b"--B--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}, timeout=30)


def test_indexed_text_over_1024_characters_is_refused_and_up_to_1024_served_whole(grid, taps, tmp_path: Path):
    site_a, site_b = grid.site("A"), grid.site("B")
    tap = taps()
    audit_tap = taps(schemas.TOPIC_AUDIT)
    study = generate_uid()
    at_limit = "Doe^" + "J" * 1020  # 1,024 characters
    over = make_instance(study_uid=study, patient_name=at_limit + "e")
    huge = make_instance(study_uid=study, patient_name="Doe^" + "J" * 9996)

    # A PACS (DCMTK storescu) sending a 10,000-character name is told why, not "success".
    path = tmp_path / "huge.dcm"
    path.write_bytes(to_part10(huge))
    sent, _ = run_timed(["storescu", "-d", "-aec", site_a.ae_title, site_a.dicom_host, str(site_a.dicom_port), str(path)])
    assert re.search(r"Status\s*:\s*0xc002", sent.stdout + sent.stderr, re.IGNORECASE), sent.stdout[-2000:]
    assert "indexed attribute too long: PatientName" in sent.stdout + sent.stderr
    # STOW-RS: 1,025 characters refused (FailureReason 0xC002), 1,024 stored.
    fits = make_instance(study_uid=study, patient_name=at_limit)
    response = stow(site_b, to_part10(over), to_part10(fits))
    assert response.status_code == 202, response.text
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [over.SOPInstanceUID] and failed["00081197"]["Value"] == [0xC002]

    audits = audit_tap.collect(lambda seen: sum("indexed attribute too long" in a["outcome_description"]
                                               for a in seen) >= 2)
    refused = [a for a in audits if "indexed attribute too long" in a["outcome_description"]]
    assert len(refused) == 2 and all("PatientName" in a["outcome_description"] for a in refused)
    assert not any("JJJJ" in json.dumps(a) for a in refused), "no patient data in audit records"
    # Nothing of the refused ones was announced; the one at the limit is served whole by QIDO-RS.
    events = tap.collect(lambda seen: any(e["instance"]["sop_instance_uid"] == fits.SOPInstanceUID for e in seen))
    assert {e["instance"]["sop_instance_uid"] for e in events} & {over.SOPInstanceUID, huge.SOPInstanceUID} == set()

    def served() -> list[dict]:
        found = httpx.get(f"http://{site_a.http_host}:{site_a.http_port}/dicomweb/studies",
                          params={"StudyInstanceUID": study}, timeout=10)
        return found.json() if found.status_code == 200 else []

    (found,) = wait_for(served, timeout=30)
    assert found["00100010"]["Value"] == [{"Alphabetic": at_limit}]
    assert found["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances: only the one at the limit
