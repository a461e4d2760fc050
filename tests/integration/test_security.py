"""Security on the running grid: DICOM TLS with DCMTK (client certificates mapped to AE titles, unknown
ones refused), bearer tokens on DICOMweb (401, 403, 200, each audited) and per-site credentials on the
payload transfer endpoint (a forged site token refused)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from lxml import etree

from dicomgrid import schemas
from dicomgrid.core import pki
from dicomgrid.core.audit import to_xml
from dicomgrid.core.tokens import PeerTokens
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from tests.dicom_samples import make_instance, to_part10
from tests.grid import MAPPED_CERT_IDENTITY, web

pytestmark = [pytest.mark.cluster]


def _cli(grid, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomgrid", "--config", str(grid.config_file), *args],
                          capture_output=True, text=True, timeout=120)


def _dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_dcmtk_tool(tool), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def certs(grid, tmp_path_factory) -> Path:
    """Client certificates: ECHOSCU's and the mapped modality's from the grid's CA (`dicomgrid secrets
    cert`), and one for ECHOSCU from a CA the grid does not know."""
    out = tmp_path_factory.mktemp("certs")
    for title in ("ECHOSCU", MAPPED_CERT_IDENTITY):
        made = _cli(grid, "secrets", "cert", title, "--out", str(out))
        assert made.returncode == 0, made.stderr
    pki.make_ca(out / "rogue-ca.pem", "rogue")
    pki.issue_certificate(out / "rogue-ca.pem", out / "rogue.pem", out / "rogue-key.pem", "ECHOSCU")
    return out


def _tls(certs: Path, name: str, grid) -> list[str]:
    return ["+tls", str(certs / f"{name}-key.pem"), str(certs / f"{name}.pem"), "+cf", str(grid.config.tls_ca_file)]


def _audits(tap, predicate, count: int = 1, timeout: float = 30.0) -> list[dict]:
    seen = tap.collect(lambda records: sum(1 for r in records if predicate(r)) >= count, timeout=timeout)
    found = [r for r in seen if predicate(r)]
    assert len(found) >= count, [r["outcome_description"] for r in seen][-20:]
    validator = schemas.audit_message_schema()
    for record in found:
        schemas.validate_event(schemas.TOPIC_AUDIT, record)
        assert validator.validate(etree.fromstring(to_xml(record))), validator.error_log
    return found


def test_dcmtk_over_tls_with_a_client_certificate(grid, certs, tmp_path: Path):
    site = grid.site("A")
    port = str(site.dicom_tls_port)
    echo = _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", site.ae_title, *_tls(certs, "ECHOSCU", grid), site.dicom_host, port)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    # Anonymous TLS (no client certificate) is allowed with client_certificates = "optional".
    anonymous = _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", site.ae_title, "+tla", "+cf", str(grid.config.tls_ca_file),
                       site.dicom_host, port)
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    path = tmp_path / "ct.dcm"
    path.write_bytes(to_part10(make_instance()))
    # The modality's certificate (CN modality-1.example.test) speaks for STORESCU through tls.ae_identities.
    stored = _dcmtk("storescu", "-d", "-aet", "STORESCU", "-aec", site.ae_title, *_tls(certs, MAPPED_CERT_IDENTITY, grid),
                    site.dicom_host, port, str(path))
    assert stored.returncode == 0, stored.stderr[-2000:]
    assert re.search(r"DIMSE Status\s*:\s*0x0000: Success", stored.stderr), stored.stderr[-2000:]


def test_a_certificate_for_another_ae_or_from_an_unknown_ca_is_refused_and_audited(grid, certs, taps):
    site = grid.site("A")
    port = str(site.dicom_tls_port)
    tap = taps(schemas.TOPIC_AUDIT)
    # ECHOSCU's certificate used with the calling AE title FINDSCU: rejected (calling AE not recognised).
    other_ae = _dcmtk("echoscu", "-aet", "FINDSCU", "-aec", site.ae_title, *_tls(certs, "ECHOSCU", grid), site.dicom_host, port)
    assert other_ae.returncode != 0 and "Calling AE Title Not Recognized" in other_ae.stdout + other_ae.stderr
    # The mapped certificate speaks for STORESCU only.
    mapped = _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", site.ae_title, *_tls(certs, MAPPED_CERT_IDENTITY, grid),
                    site.dicom_host, port)
    assert mapped.returncode != 0
    # A certificate from a CA the grid does not trust: the handshake fails.
    rogue = _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", site.ae_title, *_tls(certs, "rogue", grid), site.dicom_host, port)
    assert rogue.returncode != 0
    # Plain DICOM on the TLS port: refused too.
    plain = _dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", site.ae_title, site.dicom_host, port)
    assert plain.returncode != 0

    alerts = _audits(tap, lambda r: r["event"] == "Security Alert" and r["site"] == "A"
                     and ("does not speak for calling AE" in r["outcome_description"]
                          or "client certificate not accepted" in r["outcome_description"]), count=3)
    descriptions = [a["outcome_description"] for a in alerts]
    assert any("'FINDSCU'" in d for d in descriptions) and any("not accepted" in d for d in descriptions)
    assert all(a["event_code"]["code"] == "110113" and a["outcome"] == 4 for a in alerts)
    assert all(t["code"] == "110126" for a in alerts for t in a["event_type_codes"])  # Node Authentication


def test_dicomweb_wants_a_token_with_the_right_scope_and_audits_refusals(grid, taps):
    site = grid.site("B")
    base = f"http://{site.http_host}:{site.http_port}/dicomweb/studies"
    tap = taps(schemas.TOPIC_AUDIT)
    import httpx

    missing = httpx.get(base, params={"PatientID": "SEC-NOBODY"}, timeout=10)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(base, headers={"Authorization": "Bearer not.a.token"}, timeout=10).status_code == 401
    # `dicomgrid token issue` as the README shows it.
    issued = _cli(grid, "token", "issue", "--scope", "read", "--ttl", "10m", "--subject", "sec-reader")
    assert issued.returncode == 0, issued.stderr
    reader = {"Authorization": f"Bearer {issued.stdout.strip()}"}
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + to_part10(make_instance()) + b"\r\n--B--\r\n"
    stow = httpx.post(base, content=body, timeout=30, headers={
        **reader, "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
    assert stow.status_code == 403 and 'scope="write"' in stow.headers["www-authenticate"]
    assert httpx.get(base, params={"PatientID": "SEC-NOBODY"}, headers=reader, timeout=10).status_code == 200
    assert web.get(f"http://{site.http_host}:{site.http_port}/health").status_code == 200

    unauthenticated = _audits(tap, lambda r: r["event"] == "User Authentication" and r["site"] == "B", count=2)
    assert all(r["event_code"]["code"] == "110114" and r["outcome"] == 4 for r in unauthenticated)
    assert {t["code"] for r in unauthenticated for t in r["event_type_codes"]} == {"110122"}  # Login
    assert {r["outcome_description"].split(": ", 1)[1] for r in unauthenticated} >= {"missing bearer token", "not a JWT"}
    (forbidden,) = _audits(tap, lambda r: r["event"] == "Security Alert" and r["site"] == "B"
                           and "write scope" in r["outcome_description"])
    assert forbidden["event_code"]["code"] == "110113" and forbidden["outcome"] == 4
    assert [t["code"] for t in forbidden["event_type_codes"]] == ["110132"]  # Use of Restricted Function
    assert forbidden["participants"][0]["user_id"] == "sec-reader"


def test_payload_endpoint_takes_only_the_asking_sites_own_signature(grid, taps):
    site_b = grid.site("B")
    url = f"http://{site_b.http_host}:{site_b.http_port}/internal/payloads/{'0' * 64}"
    import httpx

    # A's own token, addressed to B: authorised (the digest is unknown, hence 404).
    own = PeerTokens(grid.config, "A").for_site("B")
    assert httpx.get(url, headers={"Authorization": f"Bearer {own}"}, timeout=10).status_code == 404
    tap = taps(schemas.TOPIC_AUDIT)
    # The same claims signed with a key that is not A's: refused.
    claims = jwt.decode(own, options={"verify_signature": False})
    forged = jwt.encode({**claims, "jti": "forged"}, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                        headers={"kid": "site:A"})
    assert httpx.get(url, headers={"Authorization": f"Bearer {forged}"}, timeout=10).status_code == 401
    # B's own key cannot speak for A either (B verifies A's tokens with A's public key only).
    b_key = pki.load_private_key(grid.config.site_token_key_files("B")[0])
    as_b = jwt.encode(claims, b_key, algorithm="EdDSA", headers={"kid": "site:A"})
    assert httpx.get(url, headers={"Authorization": f"Bearer {as_b}"}, timeout=10).status_code == 401
    # A grid token with read and write but not replicate: forbidden.
    response = web.get(url, timeout=10)
    assert response.status_code == 403
    refused = _audits(tap, lambda r: r["site"] == "B" and "/internal/payloads" in r["outcome_description"], count=3)
    assert sorted(r["event"] for r in refused) == ["Security Alert", "User Authentication", "User Authentication"]
