"""Limits and logs on a running site: no patient data in the service logs, and requests beyond a limit
refused cleanly (a status or HTTP error, an audit record) while the site goes on serving.

The PHI test queries the session grid's own services. The limit tests run a second HTTP service and
DICOM listener of site A in this process, on free ports, with small limits, over the session's real
cluster (its index, its Kafka topics): the session grid keeps the shipped limits for every other test.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from pydicom.uid import generate_uid

from dicomgrid import schemas
from dicomgrid.consumers import dimse_services
from dicomgrid.core.dimse import SiteAE
from dicomgrid.core.site import open_site
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from dicomgrid.http import create_http_app, guarded_protocol
from tests.dicom_samples import make_instance, to_part10
from tests.grid import bearer, free_port, wait_for, web

pytestmark = [pytest.mark.cluster]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary=B'


def multipart(*parts: bytes) -> bytes:
    return b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts) + b"--B--\r\n"


def grid_logs(grid) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((grid.config.root / "logs").glob(f"{grid.config.name}-*.log*")))


# -- no PHI in the service logs ------------------------------------------------------------------------


def test_a_c_find_and_a_qido_rs_with_a_patient_name_leave_no_name_in_the_logs(grid, taps):
    site_a, site_b = grid.site("A"), grid.site("B")
    name, patient_id = "Quixotezebulon^Amaranth", "PHI-TEST-80417"
    audit_tap = taps(schemas.TOPIC_AUDIT)
    found = subprocess.run(
        [require_dcmtk_tool("findscu"), "-aec", site_a.ae_title, "-S", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"PatientName={name}*", "-k", "StudyInstanceUID", site_a.dicom_host, str(site_a.dicom_port)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert found.returncode == 0, found.stdout + found.stderr
    response = web.get(f"http://{site_b.http_host}:{site_b.http_port}/dicomweb/studies",
                         params={"PatientName": name, "PatientID": patient_id}, timeout=10)
    assert response.status_code == 200
    # Both queries are audited, with the keys they asked for: the audit trail is where identities live.
    audits = audit_tap.collect(lambda seen: sum(a["event"] == "Query" and name in str(a) for a in seen) >= 2)
    assert sum(a["event"] == "Query" and name in str(a) for a in audits) >= 2

    def logged() -> str | None:
        text = grid_logs(grid)
        # Each service has written its line for the query by now (the log is written as the query ends).
        return text if text.count('"c-find"') and text.count('"qido-rs"') else None

    text = wait_for(logged, timeout=10)
    for value in (name, "Quixotezebulon", "Amaranth", patient_id):
        assert value not in text, f"{value!r} is in the service logs"
    c_find = [line for line in text.splitlines() if '"c-find"' in line and "PatientName" in line]
    assert c_find, "the C-FIND's log line names the keys it matched on"


# -- a site with small limits ----------------------------------------------------------------------------


@pytest.fixture
def limited_site(grid, pynetdicom_settings) -> Iterator:
    """Site A's HTTP service and DICOM listener, in this process on free ports, with small limits."""
    limits = grid.config.limits.model_copy(update={
        "stow_max_request_bytes": 256 * 1024, "stow_max_parts": 2, "qido_max_results": 3, "qido_max_offset": 10,
        "query_scan_budget_rows": 3})
    site = grid.site("A").model_copy(update={"dicom_port": free_port(), "dicom_tls_port": free_port(),
                                             "http_port": free_port()})
    config = grid.config.model_copy(update={"sites": [site, grid.site("B")], "limits": limits})
    context = open_site(config, "A", "test-limits")
    server = uvicorn.Server(uvicorn.Config(create_http_app(context), host=site.http_host, port=site.http_port,
                                           log_config=None, access_log=False, http=guarded_protocol(config.connections)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    listener = SiteAE(config, "A", dimse_services(context), context.audit).serve(
        spool_dir=config.site_storage("A") / "incoming", block=False)
    base = f"http://{site.http_host}:{site.http_port}/dicomweb"
    wait_for(lambda: server.started or None, timeout=10)
    try:
        yield site, base, config
    finally:
        listener.shutdown()
        listener.server_close()
        server.should_exit = True
        thread.join(10)
        context.close()


def test_stow_rs_beyond_its_limits_gets_413_stores_nothing_and_the_site_keeps_serving(grid, limited_site, taps):
    site, base, config = limited_site
    audit_tap, stored_tap = taps(schemas.TOPIC_AUDIT), taps()
    study = generate_uid()
    three = [make_instance(study_uid=study) for _ in range(3)]
    with httpx.Client(timeout=30, headers=bearer(grid.config)) as client:
        too_many = client.post(f"{base}/studies", content=multipart(*(to_part10(ds) for ds in three)),
                               headers={"Content-Type": CONTENT_TYPE})
        big = make_instance(study_uid=study, pixel_bytes=300 * 1024)  # over the 256 KiB body limit
        too_big = client.post(f"{base}/studies", content=multipart(to_part10(big)), headers={"Content-Type": CONTENT_TYPE})

        def chunked():
            payload = multipart(to_part10(big))
            for i in range(0, len(payload), 16 * 1024):
                yield payload[i:i + 16 * 1024]

        too_big_chunked = client.post(f"{base}/studies", content=chunked(), headers={"Content-Type": CONTENT_TYPE})
    assert too_many.status_code == 413 and "more than 2 parts" in too_many.json()["error"]
    assert too_big.status_code == 413 and "larger than 262144 bytes" in too_big.json()["error"]
    assert too_big_chunked.status_code == 413
    # The site still stores what is within the limits, on a new connection.
    fits = web.post(f"{base}/studies", content=multipart(*(to_part10(ds) for ds in three[:2])),
                      headers={"Content-Type": CONTENT_TYPE}, timeout=30)
    assert fits.status_code == 200, fits.text
    # Events are published before a STOW-RS answers: everything announced so far is on the topic.
    events = stored_tap.catch_up()
    announced = {e["instance"]["sop_instance_uid"] for e in events if e["study"]["uid"] == study}
    assert announced == {three[0].SOPInstanceUID, three[1].SOPInstanceUID}, "nothing of a refused request is stored"
    refusals = audit_tap.collect(lambda seen: sum(a["outcome_description"].startswith("STOW-RS refused with 413")
                                                  for a in seen) >= 3)
    refused = [a for a in refusals if a["outcome_description"].startswith("STOW-RS refused with 413")]
    assert len(refused) == 3
    for audit in refused:
        schemas.validate_event(schemas.TOPIC_AUDIT, audit)


def test_qido_rs_caps_and_scan_budget_on_a_real_index(grid, limited_site, taps):
    site, base, config = limited_site
    audit_tap = taps(schemas.TOPIC_AUDIT)
    study = generate_uid()
    patient = f"LIMITS-{study[-8:]}"
    # Three studies of one patient and one of another, in two requests (the part limit is 2): the index
    # then holds more study rows than the scan budget of 3, the patient no more.
    for patients in ((patient, patient), (patient, f"OTHER-{study[-8:]}")):
        parts = [to_part10(make_instance(study_uid=generate_uid(), patient_id=p)) for p in patients]
        response = web.post(f"{base}/studies", content=multipart(*parts), headers={"Content-Type": CONTENT_TYPE},
                              timeout=30)
        assert response.status_code == 200, response.text

    def indexed():
        found = web.get(f"{base}/studies", params={"PatientID": patient, "limit": "3"}, timeout=10)
        return found if found.status_code == 200 and len(found.json()) == 3 else None

    wait_for(indexed, timeout=30)
    clamped = web.get(f"{base}/studies", params={"PatientID": patient, "limit": "1000"}, timeout=10)
    assert clamped.status_code == 200 and len(clamped.json()) == 3
    assert re.search(r'299 dicomgrid: "The limit exceeds the maximum of 3 results', clamped.headers["Warning"])
    deep = web.get(f"{base}/studies", params={"PatientID": patient, "offset": "1000000000"}, timeout=10)
    assert deep.status_code == 400 and "offset is limited to 10" in deep.text
    # A wildcard no index can narrow reads every study row of the grid: past the budget of 3, refused.
    broad = web.get(f"{base}/studies", params={"PatientName": "NOBODY-AT-ALL*"}, timeout=30)
    assert broad.status_code == 413 and "too broad" in broad.text
    assert web.get(f"{base}/studies", params={"PatientID": patient}, timeout=10).status_code == 200
    audits = audit_tap.collect(lambda seen: sum("query too broad" in a["outcome_description"] for a in seen) >= 1)
    assert any(a["event"] == "Query" and "query too broad" in a["outcome_description"] for a in audits)

    # C-FIND: the same wildcard ends with 0xA700 (out of resources); the association carries on.
    done = subprocess.run(
        [require_dcmtk_tool("findscu"), "-d", "-aec", site.ae_title, "-S", "-k", "QueryRetrieveLevel=STUDY",
         "-k", "PatientName=NOBODY-AT-ALL*", "-k", "StudyInstanceUID", site.dicom_host, str(site.dicom_port)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    output = done.stdout + done.stderr
    assert re.search(r"Status\s*:\s*0xa700", output, re.IGNORECASE), output[-2000:]
    assert "query too broad" in output
    indexed_find = subprocess.run(
        [require_dcmtk_tool("findscu"), "-aec", site.ae_title, "-S", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"PatientID={patient}", "-k", "StudyInstanceUID", site.dicom_host, str(site.dicom_port)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert indexed_find.returncode == 0, indexed_find.stdout + indexed_find.stderr
    audits = audit_tap.collect(lambda seen: any("C-FIND refused" in a["outcome_description"]
                                                and "too broad" in a["outcome_description"] for a in seen))
    assert any(a["event"] == "Query" and "C-FIND refused" in a["outcome_description"] for a in audits)
