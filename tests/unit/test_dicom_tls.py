"""The site AE's DICOM TLS port and per-service allow-lists, with pynetdicom as the peer (no cluster)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicomgrid.core import pki
from dicomgrid.core.config import GridConfig, load_config
from dicomgrid.core.dimse import Context, SiteAE
from dicomgrid.core.tls import client_context
from tests.grid import free_port
from tests.unit.peer_sites import RecordingAudit


class _Contexts:
    """A service that only accepts contexts (nothing is sent on them here)."""

    def contexts(self) -> list[Context]:
        return [Context(CTImageStorage), Context(StudyRootQueryRetrieveInformationModelFind)]

    def handlers(self) -> list:
        return []


def _config(tmp_path: Path, extra: str = "") -> GridConfig:
    path = tmp_path / "grid.toml"
    path.write_text(
        f'name = "tls"\ndata_dir = "{tmp_path}"\n{extra}\n'
        f'[[sites]]\nname = "A"\nae_title = "GRID_A"\ndicom_port = {free_port()}\ndicom_tls_port = {free_port()}\n'
        f'http_port = {free_port()}\nstorage_root = "{tmp_path / "A"}"\ncassandra_dc = "dc1"\n'
    )
    config = load_config(path)
    pki.ensure_material(config)
    return config


@pytest.fixture
def serve(tmp_path: Path, pynetdicom_settings) -> Iterator:
    started = []

    def start(extra: str = "") -> tuple[GridConfig, RecordingAudit]:
        config = _config(tmp_path, extra)
        audit = RecordingAudit()
        started.append(SiteAE(config, "A", [_Contexts()], audit).serve(spool_dir=tmp_path / "A" / "incoming", block=False))
        return config, audit

    yield start
    for listeners in started:
        listeners.shutdown()


def _associate(config: GridConfig, calling_ae: str, context: ssl.SSLContext | None, *contexts: str):
    site = config.site("A")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 5
    for uid in contexts or (Verification,):
        ae.add_requested_context(uid)
    port = site.dicom_tls_port if context is not None else site.dicom_port
    return ae.associate(site.dicom_host, port, ae_title=site.ae_title,
                        tls_args=(context, site.dicom_host) if context is not None else None)


def _client_cert(config: GridConfig, tmp_path: Path, cn: str) -> ssl.SSLContext:
    cert, key = tmp_path / f"{cn}.pem", tmp_path / f"{cn}-key.pem"
    pki.issue_certificate(config.tls_ca_file, cert, key, cn)
    context = client_context(config)
    context.load_cert_chain(cert, key)
    return context


def test_plain_and_tls_ports_serve_side_by_side(serve, tmp_path: Path):
    config, audit = serve()
    for context in (None, client_context(config), _client_cert(config, tmp_path, "ECHOSCU")):
        assoc = _associate(config, "ECHOSCU", context)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    # A certificate used with a calling AE title it does not speak for.
    assoc = _associate(config, "STORESCU", _client_cert(config, tmp_path, "OTHER"))
    assert assoc.is_rejected
    assert "does not speak for calling AE 'STORESCU'" in audit.records[-1]["description"]


def test_required_client_certificates_refuse_anonymous_tls(serve, tmp_path: Path):
    config, audit = serve('[tls]\nclient_certificates = "required"\nplain_dicom = false\n')
    assoc = _associate(config, "ECHOSCU", client_context(config))
    assert not assoc.is_established
    deadline = time.monotonic() + 5
    while not audit.records and time.monotonic() < deadline:
        time.sleep(0.05)
    assert audit.records and audit.records[-1]["event"] == "Security Alert"
    assert "DICOM TLS connection refused" in audit.records[-1]["description"]
    assoc = _associate(config, "ECHOSCU", _client_cert(config, tmp_path, "ECHOSCU"))
    assert assoc.is_established
    assoc.release()
    # The plain port is off.
    assert not _associate(config, "ECHOSCU", None).is_established


def test_service_allow_lists_reject_the_contexts_of_other_services(serve):
    config, audit = serve('[security.service_aes]\nquery = ["FINDSCU"]\nstorage = ["STORESCU"]\n')
    assoc = _associate(config, "STORESCU", None, Verification, StudyRootQueryRetrieveInformationModelFind, CTImageStorage)
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert Verification in accepted and CTImageStorage in accepted
    assert StudyRootQueryRetrieveInformationModelFind not in accepted
    assoc.release()
    assert audit.records[-1]["event"] == "Security Alert" and "may not use query" in audit.records[-1]["description"]
