"""The operator's view of the running grid: /metrics summed over a site's processes, /health checking
real dependencies, `dicomgrid status`, the status page in a real browser, `import` and `export study`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from tests.dicom_samples import make_instance, to_part10
from tests.grid import bearer, wait_for, web
from tests.integration.test_ingest_grid import c_store

pytestmark = [pytest.mark.cluster]

SCREENSHOT_DIR = Path(os.environ.get("DICOMGRID_TEST_ARTIFACTS", Path(__file__).parents[2] / ".dicomgrid" / "artifacts"))


def url(grid, site: str, path: str) -> str:
    config = grid.site(site)
    return f"http://{config.http_host}:{config.http_port}{path}"


def samples(grid, site: str = "A") -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the site's /metrics, by (name, labels)."""
    text = httpx.get(url(grid, site, "/metrics"), timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls)


def cli(grid, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), *args],
                          capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_metrics_add_up_the_site_processes(grid):
    before, before_b = samples(grid), samples(grid, "B")
    instances = [make_instance(), make_instance()]
    assert c_store(grid.site("A"), instances) == [0, 0]
    assert web.get(url(grid, "A", f"/dicomweb/studies?StudyInstanceUID={instances[0].StudyInstanceUID}"),
                   timeout=10).status_code == 200

    def grew(name: str, by: float, **labels: str):
        return lambda: (now := samples(grid)) and value(now, name, **labels) - value(before, name, **labels) >= by

    # Counted by the receiver process, served by the http process.
    wait_for(grew("dicomgrid_instances_received_total", 2, site="A", via="DIMSE", status="0x0000"))
    wait_for(grew("dicomgrid_request_seconds_count", 2, site="A", operation="C-STORE"))
    assert value(samples(grid), "dicomgrid_received_bytes_total", site="A") > value(before, "dicomgrid_received_bytes_total", site="A")
    # By the processors (one consumer group across the sites: either site's indexer may take an
    # instance) and the replication worker of site B.
    indexed_before = value(before, "dicomgrid_instances_indexed_total") + value(before_b, "dicomgrid_instances_indexed_total")
    wait_for(lambda: value(samples(grid), "dicomgrid_instances_indexed_total")
             + value(samples(grid, "B"), "dicomgrid_instances_indexed_total") - indexed_before >= 2, timeout=60)
    copies_before = value(before_b, "dicomgrid_replication_requests_total", site="B")
    wait_for(lambda: value(samples(grid, "B"), "dicomgrid_replication_requests_total", site="B") - copies_before >= 2,
             timeout=60)
    assert value(samples(grid, "B"), "dicomgrid_replication_lag_seconds_count", site="B") >= 1
    # And this process's own request.
    assert value(samples(grid), "dicomgrid_request_seconds_count", site="A", operation="QIDO-RS") >= 1
    # No patient data in the labels.
    text = httpx.get(url(grid, "A", "/metrics"), timeout=10).text
    assert str(instances[0].PatientName) not in text and str(instances[0].PatientID) not in text


def test_health_checks_the_dependencies_of_the_site(grid):
    response = httpx.get(url(grid, "A", "/health"), timeout=20)
    assert response.status_code == 200, response.text
    checks = response.json()["checks"]
    assert set(checks) == {"kafka", "cassandra", "blob_store"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["cassandra"]["detail"].startswith(grid.site("A").cassandra_dc)
    assert httpx.get(url(grid, "A", "/health/live"), timeout=10).json()["status"] == "ok"


def test_status_reports_ingest_rate_and_replication(grid):
    instance = make_instance()
    assert c_store(grid.site("B"), [instance]) == [0]
    status = json.loads(cli(grid, "status", "--json", check=False).stdout)
    assert status["ingest_per_s"] > 0
    assert {s["site"] for s in status["replication"]["sites"]} == {"A", "B"}
    assert {s["name"] for s in status["services"]} >= {"A/http", "B/http", "A/processors", "B/replicator"}
    assert status["unavailable"] == {}
    text = cli(grid, "status", check=False).stdout
    assert "ingest: " in text and "replication: " in text and "under-replicated" in text


def test_the_status_page_renders_in_a_browser(grid, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (deploy/local/system-deps.sh)")
    page = url(grid, "A", "/status")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--window-size=1280,1000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert 'data-loaded="true"' in dom.stdout, dom.stderr[-2000:]
    assert "A/receiver-1" in dom.stdout and "under-replicated" in dom.stdout
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "status-page.png"
    done = subprocess.run([chromium, *flags, f"--screenshot={shot}", page], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_status_page_shows_no_patient_data(grid):
    instance = make_instance()
    assert c_store(grid.site("A"), [instance]) == [0]
    wait_for(lambda: httpx.get(url(grid, "A", "/status.json"), timeout=30).json()["recent_audit"], timeout=60)
    body = httpx.get(url(grid, "A", "/status.json"), timeout=30).text
    assert str(instance.PatientID) not in body and str(instance.PatientName) not in body
    # A viewer holding the audit scope sees whom the events name; a read token does not.
    assert str(instance.PatientID) not in httpx.get(url(grid, "A", "/status.json"), headers=bearer(grid.config, "read"),
                                                    timeout=30).text
    audited = wait_for(lambda: (text := httpx.get(url(grid, "A", "/status.json"), headers=bearer(grid.config, "audit"),
                                                  timeout=30).text) and str(instance.PatientID) in text and text,
                       timeout=30)
    assert str(instance.PatientID) in audited


def test_import_a_folder_and_export_the_study(grid, tmp_path):
    study = make_instance().StudyInstanceUID
    folder = tmp_path / "incoming" / "nested"
    folder.mkdir(parents=True)
    sent = [make_instance(study_uid=study) for _ in range(3)]
    for i, ds in enumerate(sent):
        (folder / f"{i}.dcm").write_bytes(to_part10(ds))
    (folder / "notes.txt").write_text("not DICOM")
    done = cli(grid, "import", str(tmp_path / "incoming"), "--site", "A", "--json")
    report = json.loads(done.stdout)
    assert report["statuses"] == {"0x0000": 3} and report["failed"] == []
    assert [Path(s["file"]).name for s in report["skipped"]] == ["notes.txt"]

    out = tmp_path / "export"
    wait_for(lambda: len(json.loads(cli(grid, "export", "study", study, str(out), "--site", "B", "--json",
                                        check=False).stdout)["failed"]) == 0, timeout=60, interval=2)
    files = sorted((out / study).rglob("*.dcm"))
    assert sorted(dcmread(f).SOPInstanceUID for f in files) == sorted(ds.SOPInstanceUID for ds in sent)
    assert not list(out.rglob("*.partial"))


def test_import_reports_refusals_and_exits_non_zero(grid, tmp_path):
    bad = make_instance()
    bad.StudyInstanceUID = "1.2.3." + "9" * 70  # longer than a UI value may be: refused with a status
    (tmp_path / "bad.dcm").write_bytes(to_part10(bad))
    done = cli(grid, "import", str(tmp_path), "--site", "A", check=False)
    assert done.returncode == 1
    assert "refused" in done.stdout and "bad.dcm" in done.stdout
