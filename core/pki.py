"""The grid's development key material: a local CA, a TLS certificate per site, token signing keys.

``dicomgrid secrets init`` (run by ``make run``, and by ``dicomgrid up`` in development) makes whatever
of it is missing, at the paths the config names (by default under ``<data_dir>/secrets/``):

* a CA (``tls/<grid>-ca.pem`` and its key), whose subject names it a development CA;
* per site a certificate issued by it (``tls/<grid>-site-<name>.pem`` and ``-key.pem``): subject CN the
  site's AE title (so the certificate speaks for that AE when the site calls out), subjectAltName its
  DICOM and HTTP hosts plus ``localhost`` and ``127.0.0.1``, usable as server and client certificate;
* the grid's token signing key pair (Ed25519), which ``dicomgrid token issue`` signs with;
* per site a token key pair (Ed25519) it signs its requests to other sites' payload endpoints with;
* the audit chain's signing key.

Private keys are written readable by their owner only and never overwritten. A production grid brings
its own certificates; one issued by a development CA is refused there (:mod:`dicomgrid.core.production`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicomgrid.core.audit_log import load_signing_key
from dicomgrid.core.config import GridConfig

# The organization every certificate made here carries; what marks development material.
DEVELOPMENT_ORGANIZATION = "dicomgrid development"
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=825)


class KeyMaterialError(RuntimeError):
    """Key material the config names is missing and cannot be made here, or is unusable."""


def _write_private(path: Path, pem: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _write_public(path: Path, pem: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, path)


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ca_key_file(ca_file: Path) -> Path:
    """Where the development CA's key lives: beside its certificate."""
    return ca_file.with_name(ca_file.stem + "-key.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVELOPMENT_ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def make_ca(cert_path: Path, grid: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(f"{grid} development CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(ca_key_file(cert_path), _private_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(ca_file: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key_path = ca_key_file(ca_file)
    if not key_path.exists():
        raise KeyMaterialError(f"a certificate is missing and cannot be issued here: the CA key {key_path} "
                               f"is not on this host (bring the certificate, or the CA's key)")
    cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{key_path} is not an EC private key")
    return cert, key


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue_certificate(ca_file: Path, cert_path: Path, key_path: Path, common_name: str,
                      hosts: list[str] = (), validity: dt.timedelta = LEAF_VALIDITY) -> None:  # type: ignore[assignment]
    """A certificate (server and client use) from the development CA at ``ca_file``; CN ``common_name``,
    subjectAltName ``hosts`` (and localhost) when there are any."""
    ca_cert, ca_key = _load_ca(ca_file)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        # A server's names; a client certificate (no hosts) speaks only through its CN.
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(list(hosts))), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(key_path, _private_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def make_key_pair(private_path: Path, public_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    _write_private(private_path, _private_pem(key))
    _write_public(public_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise KeyMaterialError(f"key file {path} does not exist (run `dicomgrid secrets init`)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyMaterialError(f"key file {path} does not exist (run `dicomgrid secrets init`)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyMaterialError(f"{path} is not an Ed25519 public key")
    return key


def is_development_certificate(path: Path) -> bool:
    """Whether the certificate at ``path`` was made by a development CA (:func:`make_ca`)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    names = [*cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME),
             *cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return any(attr.value == DEVELOPMENT_ORGANIZATION for attr in names)


@dataclass
class Made:
    """What :func:`ensure_material` made, and what was there already."""

    created: list[Path] = field(default_factory=list)
    present: list[Path] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"created {p}" for p in self.created]
        lines.append(f"{len(self.present)} file(s) already present" if self.present else "nothing was present")
        return "\n".join(lines)


def needs_tls(config: GridConfig) -> bool:
    return (config.tls.http or any(config.dicom_tls_port(s.name) for s in config.sites)
            or any(peer.tls for peer in config.remote_aes.values()))


def missing_material(config: GridConfig) -> list[Path]:
    """Files the grid's services need and that do not exist."""
    wanted: list[Path] = []
    if needs_tls(config):
        wanted.append(config.tls_ca_file)
        for site in config.sites:
            wanted.extend(config.site_tls_files(site.name))
    wanted.extend(config.token_key_files[1:])
    for site in config.sites:
        wanted.extend(config.site_token_key_files(site.name))
    return [p for p in wanted if not p.exists()]


def ensure_material(config: GridConfig) -> Made:
    """Make the key material the config names and that does not exist yet (idempotent)."""
    made = Made()

    def need(path: Path, *also: Path) -> bool:
        (made.present if path.exists() else made.created).extend([path, *also])
        return not path.exists()

    if needs_tls(config):
        ca = config.tls_ca_file
        if need(ca):
            make_ca(ca, config.name)
        for site in config.sites:
            cert, key = config.site_tls_files(site.name)
            if cert.exists() != key.exists():
                raise KeyMaterialError(f"site {site.name}: {cert if cert.exists() else key} exists without "
                                       f"{key if cert.exists() else cert}")
            if need(cert, key):
                issue_certificate(ca, cert, key, site.ae_title, [site.dicom_host, site.http_host])
    for private, public in [config.token_key_files, *(config.site_token_key_files(s.name) for s in config.sites)]:
        if not public.exists() and private.exists():
            raise KeyMaterialError(f"{public} is missing but {private} exists: export its public half")
        if need(public, private):
            make_key_pair(private, public)
    if need(config.audit_signing_key_file):
        load_signing_key(config.audit_signing_key_file)
    return made
