"""TLS contexts of the grid: the site AEs' DICOM TLS ports, HTTPS, and the connections the grid makes.

* **DICOM TLS (PS3.15 B.1)**: each site AE listens with its own certificate on ``dicom_tls_port``
  (:func:`dicom_server_context`). Client certificates are asked for as ``tls.client_certificates``
  says; one that is presented must chain to the grid's CA and speak for the calling AE title the
  association uses (:func:`certificate_speaks_for`), or the association is rejected and audited.
* **Outgoing associations** (C-MOVE sub-operations, Storage Commitment reports to a remote AE with
  ``tls = true``, the supervisor's C-ECHO probe): :func:`client_context` verifies the peer's
  certificate (chain, and its host name) and presents the site's own certificate.
* **HTTPS**: uvicorn serves the site certificate (:func:`uvicorn_ssl`); the grid's HTTP clients verify
  with the grid's CA (:func:`client_context` without a site).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomgrid.core.config import GridConfig

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_CERTS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TlsSetupError(RuntimeError):
    """The certificates or keys the config names cannot be loaded."""


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load the certificate {cert} with its key {key}: {exc} "
                            f"(run `dicomgrid secrets init` for development ones)") from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load the CA certificates {ca_file}: {exc}") from exc


def dicom_server_context(config: GridConfig, site: str) -> ssl.SSLContext:
    """The context of a site AE's DICOM TLS port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[config.tls.minimum_version]
    _load_chain(context, *config.site_tls_files(site))
    context.verify_mode = _CLIENT_CERTS[config.tls.client_certificates]
    if context.verify_mode != ssl.CERT_NONE:
        _load_ca(context, config.tls_ca_file)
    return context


def client_context(config: GridConfig, site: str | None = None, *, ca_file: Path | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that trusts ``ca_file`` (default: the grid's CA) and, given a ``site``, presents
    that site's certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _VERSIONS[config.tls.minimum_version]
    context.check_hostname = check_hostname
    _load_ca(context, ca_file or config.tls_ca_file)
    if site is not None:
        _load_chain(context, *config.site_tls_files(site))
    return context


def remote_ae_tls(config: GridConfig, site: str, title: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association from ``site`` to the remote AE ``title`` (None: plain)."""
    peer = config.remote_aes.get(title)
    if peer is None or not peer.tls:
        return None
    ca_file = config.resolve(peer.ca_file) if peer.ca_file else None
    return client_context(config, site, ca_file=ca_file, check_hostname=peer.verify_hostname), peer.host


def uvicorn_ssl(config: GridConfig, site: str) -> dict[str, Any]:
    """uvicorn's ssl options for a site's HTTP service (empty when HTTPS is off)."""
    if not config.tls.http:
        return {}
    cert, key = config.site_tls_files(site)
    for path in (cert, key):
        if not path.exists():
            raise TlsSetupError(f"the site's TLS file {path} does not exist (run `dicomgrid secrets init`)")
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def http_verify(config: GridConfig) -> ssl.SSLContext | bool:
    """What the grid's HTTP clients verify the sites' HTTPS with (``verify=`` of httpx)."""
    return client_context(config) if config.tls.http else True


# -- who a client certificate speaks for -----------------------------------------------------------


def certificate_identities(cert: Mapping[str, Any] | None) -> list[str]:
    """The identities of a verified peer certificate (``SSLSocket.getpeercert()``): its subject's CN and
    the DNS names of its subjectAltName."""
    if not cert:
        return []
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    return list(dict.fromkeys(names))


def certificate_speaks_for(config: GridConfig, cert: Mapping[str, Any] | None, calling_ae: str) -> bool:
    """Whether a verified client certificate may be used with ``calling_ae``: one of its identities is
    mapped to that AE title in ``tls.ae_identities``, or, unmapped, is that AE title."""
    calling_ae = calling_ae.strip()
    for identity in certificate_identities(cert):
        mapped = config.tls.ae_identities.get(identity)
        if calling_ae in (mapped if mapped is not None else [identity]):
            return True
    return False
